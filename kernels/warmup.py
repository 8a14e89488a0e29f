"""Compile the serving kernels once, at startup, on the engine's real cache.

Why: Triton compiles a kernel variant the first time it sees a new key (constexprs + the
specialisation of each argument), 1-3 s per variant and per TP rank — mid-serving, on the
first request that needs it. The serving kernels keep every argument that changes from step
to step out of the key (their ``DO_NOT_SPECIALIZE`` lists; ``tests/kernels/
test_specialization.py`` checks that the keys of changing steps are one per kernel), so one
launch each here, with the engine's real cache, dtypes and widths, is the only compilation.
The launches read nothing (every row is empty).
"""

from __future__ import annotations

import torch

from . import dispatch
from .fused_decode import fused_decode_attention
from .paged import PagedKV
from .window_attention import window_tile


def warm_up(kv_cache: torch.Tensor, num_heads: int, head_size: int, table_width: int, *,
            stats: dict | None = None, decode: bool = False, window: int = 32) -> int:
    """Launch each serving kernel once on empty rows of one layer's cache.

    Args:
        kv_cache: one layer's vLLM GPU cache ``[num_blocks, Hkv, block_size, 2 * D]``.
        num_heads, head_size: this rank's query heads, D.
        table_width: the width of the block table the attention backend's kernel reads
            (vLLM's ``max_num_blocks_per_req``).
        stats: the backend's statistics buffers as ``fused_decode_attention`` keyword
            arguments (``slot``, ``park_ids``, ...), or None when its decode rows take none.
        decode: also the attention backend's decode kernel (the plugin's backend serves it).
        window: the largest observation window the policies use (its tile is what compiles).
    Returns:
        the number of kernels launched.
    """
    kv = PagedKV.from_vllm(kv_cache, head_size)
    dev, dtype = kv_cache.device, kv_cache.dtype
    table = torch.zeros(1, table_width, dtype=torch.int32, device=dev)
    empty = torch.zeros(1, dtype=torch.int32, device=dev)
    launched = 0
    if decode:
        query = torch.zeros(1, num_heads, head_size, dtype=dtype, device=dev)
        fused_decode_attention(query, kv.key, kv.value, table, empty, torch.empty_like(query),
                               head_size ** -0.5, **(stats or {}))
        launched += 2
    q_window = torch.zeros(1, num_heads, min(window, window_tile(window)), head_size,
                           dtype=dtype, device=dev)
    dispatch.window_attention(q_window, kv, table[:, :1].clone(), empty, head_size ** -0.5,
                              backend=dispatch.TRITON)
    gram = torch.zeros(num_heads, head_size, head_size, dtype=torch.float32, device=dev)
    dispatch.value_proj_norm(gram, kv, table[:, :1].clone(), empty, backend=dispatch.TRITON)
    return launched + 2
