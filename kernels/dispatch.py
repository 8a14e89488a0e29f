"""One entry point per statistic: the Triton kernel on NVIDIA GPUs, the torch reference elsewhere.

The plugin must also serve on the CPU backend (no Triton backend there), so ``backend="auto"``
picks Triton only when CUDA (not ROCm) is available and the tensors are on it.
``backend="triton"`` forces the kernels (e.g. on CPU under ``TRITON_INTERPRET=1``);
``backend="torch"`` forces the references.

What each path accepts (checked by :func:`check_inputs`; anything else raises ``ValueError``):

========  ======================================================================================
triton    layout ``nhd`` only: key/value ``[num_blocks, block_size, Hkv, D]``, any strides (an
          HND-strided view is fine); float16/bfloat16/float32 caches; block_size a power of
          two >= 16; head_dim <= 256; int32 block_table with contiguous rows, int32 seq_lens.
torch     layouts ``nhd``, ``cpu``, ``cpu_t`` (see ``paged.py``); any float dtype, any device.
neither   quantised (fp8) caches, ALiBi, sliding window, logit soft-capping, attention sinks:
          the decode *output* would differ from the engine's; the statistics assume plain
          softmax attention over the whole compacted row.
========  ======================================================================================
"""

from __future__ import annotations

import os

import torch

from . import reference
from .paged import NHD, PagedKV, WindowStats

AUTO, TRITON, TORCH = "auto", "triton", "torch"
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_TRITON_HEAD_DIM = 256


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def pick_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Resolve ``auto`` to ``triton`` (NVIDIA GPU, all tensors on it) or ``torch``."""
    if backend not in (AUTO, TRITON, TORCH):
        raise ValueError(f"backend must be one of {(AUTO, TRITON, TORCH)}, got {backend!r}")
    if backend != AUTO:
        return backend
    nvidia = torch.cuda.is_available() and torch.version.hip is None
    on_gpu = all(t.is_cuda for t in tensors)
    return TRITON if nvidia and on_gpu and triton_available() else TORCH


def check_inputs(backend: str, kv: PagedKV, query: torch.Tensor | None = None,
                 block_table: torch.Tensor | None = None, seq_lens: torch.Tensor | None = None) -> None:
    """Raise a clear ``ValueError`` for inputs the chosen path cannot read correctly."""
    _, bs, hkv, d = kv.key.shape
    if query is not None:
        hq, qd = query.shape[1], query.shape[-1]
        if qd != d or hq % hkv:
            raise ValueError(
                f"query has {hq} heads of dim {qd} but the {kv.layout!r} cache holds {hkv} KV heads "
                f"of dim {d}: head dims must match and query heads be a multiple of KV heads "
                "(is the cache in the layout it claims?)"
            )
    if block_table is not None and seq_lens is not None:
        if block_table.dim() != 2 or seq_lens.shape != (block_table.shape[0],):
            raise ValueError(f"block_table [R, max_blocks] and seq_lens [R] expected, got "
                             f"{tuple(block_table.shape)} and {tuple(seq_lens.shape)}")
    if backend == TORCH:
        return
    problems = []
    if kv.layout != NHD:
        problems.append(
            f"layout {kv.layout!r} is the vLLM CPU backend's; the Triton kernels read only the GPU "
            f"layout {NHD!r} (and Triton has no CPU backend): use backend='torch'"
        )
    if bs < 16 or bs & (bs - 1):
        problems.append(f"block_size {bs} is not a power of two >= 16")
    if d > MAX_TRITON_HEAD_DIM:
        problems.append(f"head_dim {d} > {MAX_TRITON_HEAD_DIM}")
    if kv.key.dtype not in _TRITON_DTYPES or kv.value.dtype not in _TRITON_DTYPES:
        problems.append(f"cache dtype {kv.key.dtype} (supported: {_TRITON_DTYPES})")
    if block_table is not None and (block_table.dtype != torch.int32 or block_table.stride(-1) != 1):
        problems.append("block_table must be int32 with contiguous rows")
    if seq_lens is not None and (seq_lens.dtype != torch.int32 or not seq_lens.is_contiguous()):
        problems.append("seq_lens must be a contiguous int32 tensor")
    devices = {t.device for t in (kv.key, kv.value, query, block_table, seq_lens) if t is not None}
    if len(devices) > 1:
        problems.append(f"tensors on several devices {sorted(map(str, devices))}")
    elif devices.pop().type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        problems.append("tensors are not on a CUDA device (set TRITON_INTERPRET=1 to interpret)")
    if problems:
        raise ValueError("Triton kernels cannot take these inputs: " + "; ".join(problems))


def window_attention(q_window, kv: PagedKV, block_table, seq_lens, scale=None, *, probs=True,
                     window_lens=None, causal=True, backend=AUTO) -> WindowStats:
    """Observation-window probabilities ``[R, Hq, W, max_T]`` and per-block sums; window query
    i sits at position ``seq_len - W + i`` (``causal``) or after every key (not)."""
    backend = pick_backend(backend, q_window, kv.key)
    check_inputs(backend, kv, q_window, block_table, seq_lens)
    if backend == TRITON:
        from .window_attention import paged_window_attention

        return paged_window_attention(q_window, kv.key, block_table, seq_lens, scale, probs=probs,
                                      window_lens=window_lens, causal=causal)
    result = reference.window_attention(q_window, kv.key, block_table, seq_lens, scale,
                                        window_lens, causal=causal)
    return result if probs else result._replace(probs=None)


def key_bounds(kv: PagedKV, block_table, seq_lens, *, backend=AUTO):
    """Quest min/max keys of every block-table entry, each ``[R, max_blocks, Hkv, D]``."""
    backend = pick_backend(backend, kv.key)
    check_inputs(backend, kv, None, block_table, seq_lens)
    if backend == TRITON:
        from .key_bounds import paged_key_bounds

        return paged_key_bounds(kv.key, block_table, seq_lens)
    return reference.key_bounds(kv.key, block_table, seq_lens)


def block_key_bounds(kv: PagedKV, block_ids, counts, *, backend=AUTO):
    """Min/max keys ``[n, Hkv, D]`` of the first ``counts[i]`` tokens of physical blocks ``block_ids``."""
    backend = pick_backend(backend, kv.key)
    check_inputs(backend, kv)
    if backend == TRITON:
        from .key_bounds import paged_block_key_bounds

        return paged_block_key_bounds(kv.key, block_ids, counts)
    return reference.block_key_bounds(kv.key, block_ids, counts)


update_key_bounds = reference.update_key_bounds  # in-place scatter_reduce_: one kernel either way


def quest_scores(query, key_min, key_max, num_blocks, *, backend=AUTO) -> torch.Tensor:
    """Quest block scores ``[R, Hq, max_blocks]`` (-inf past each request's blocks)."""
    backend = pick_backend(backend, query, key_min)
    if query.shape[1] % key_min.shape[2] or query.shape[-1] != key_min.shape[-1]:
        raise ValueError(f"query {tuple(query.shape)} does not match bounds {tuple(key_min.shape)}")
    if backend == TRITON:
        from .key_bounds import paged_quest_scores

        return paged_quest_scores(query, key_min, key_max, num_blocks)
    return reference.quest_scores(query, key_min, key_max, num_blocks)


def value_proj_norm(gram, kv: PagedKV, block_table, seq_lens, *, backend=AUTO) -> torch.Tensor:
    """``‖v_t W_O^h‖₂`` ``[R, Hq, max_T]`` from the paged values and ``gram = wo_gram(...)``."""
    backend = pick_backend(backend, gram, kv.value)
    check_inputs(backend, kv, gram[:, 0, :][None], block_table, seq_lens)
    if backend == TRITON:
        from .value_norm import paged_value_proj_norm

        return paged_value_proj_norm(gram, kv.value, block_table, seq_lens)
    return reference.value_proj_norm(gram, kv.value, block_table, seq_lens)


wo_gram = reference.wo_gram
