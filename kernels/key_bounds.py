"""Quest bounds: per-block min/max keys, and the block score they give a decode query.

``score[h, b] = Σ_d max(q_d·min_d, q_d·max_d)`` upper-bounds ``q·k`` for every key of block
``b``, so ranking blocks by it finds the blocks a query may attend to without reading them.
Bounds are computed once per block (:func:`paged_block_key_bounds`) and, while the newest
block fills, folded forward token by token (``reference.update_key_bounds``: an in-place
``scatter_reduce_``, already a single kernel on GPU, so it has no Triton version).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference


@triton.jit
def _bounds_kernel(
    k_ptr, ids_ptr, cnt_ptr, min_ptr, max_ptr,
    s_kb, s_kt, s_kh, s_kd,
    HKV: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0)
    kvh = tl.program_id(1)
    blk = tl.load(ids_ptr + i).to(tl.int64)
    count = tl.load(cnt_ptr + i)
    offs_t = tl.arange(0, BLOCK_SIZE)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    ok = (offs_t < count)[:, None] & d_ok[None, :]
    ptr = k_ptr + blk * s_kb + offs_t[:, None] * s_kt + kvh * s_kh + offs_d[None, :] * s_kd
    lo = tl.min(tl.load(ptr, mask=ok, other=float("inf")), 0)  # empty block: +inf / -inf
    hi = tl.max(tl.load(ptr, mask=ok, other=float("-inf")), 0)
    out = (i * HKV + kvh) * HEAD_DIM + offs_d
    tl.store(min_ptr + out, lo, mask=d_ok)
    tl.store(max_ptr + out, hi, mask=d_ok)


@triton.jit
def _quest_kernel(
    q_ptr, min_ptr, max_ptr, nb_ptr, out_ptr,
    max_blocks,
    s_qr, s_qh, s_qd,
    G: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // G
    n_blocks = tl.load(nb_ptr + r)
    offs_b = tl.arange(0, BLOCK_B)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(q_ptr + r * s_qr + h * s_qh + offs_d * s_qd, mask=d_ok, other=0.0).to(tl.float32)
    for b0 in range(0, max_blocks, BLOCK_B):
        bb = b0 + offs_b
        live = bb < n_blocks
        off = ((r * max_blocks + bb[:, None]) * HKV + kvh) * HEAD_DIM + offs_d[None, :]
        ok = live[:, None] & d_ok[None, :]
        lo = tl.load(min_ptr + off, mask=ok, other=0.0).to(tl.float32)
        hi = tl.load(max_ptr + off, mask=ok, other=0.0).to(tl.float32)
        score = tl.sum(tl.maximum(q[None, :] * lo, q[None, :] * hi), 1)
        tl.store(out_ptr + (r * HQ + h) * max_blocks + bb, tl.where(live, score, float("-inf")),
                 mask=bb < max_blocks)


def paged_block_key_bounds(key_cache, block_ids, counts) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max key ``[n, Hkv, D]`` (key dtype) over the first ``counts[i]`` tokens of each block."""
    n = block_ids.numel()
    _, bs, hkv, d = key_cache.shape
    kmin = torch.empty(n, hkv, d, device=key_cache.device, dtype=key_cache.dtype)
    kmax = torch.empty_like(kmin)
    if n:
        _bounds_kernel[(n, hkv)](
            key_cache, block_ids, counts.to(torch.int32), kmin, kmax, *key_cache.stride(),
            HKV=hkv, BLOCK_SIZE=bs, HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d),
        )
    return kmin, kmax


def paged_key_bounds(key_cache, block_table, seq_lens) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of every entry of the block table ``[R, max_blocks, Hkv, D]`` (+inf/-inf past end)."""
    return reference.key_bounds(key_cache, block_table, seq_lens, paged_block_key_bounds)


def paged_quest_scores(query, key_min, key_max, num_blocks) -> torch.Tensor:
    """``[R, Hq, max_blocks]`` float32 Quest scores; blocks ``>= num_blocks[r]`` get -inf."""
    r_n, hq, d = query.shape
    max_blocks, hkv = key_min.shape[1], key_min.shape[2]
    key_min, key_max = key_min.contiguous(), key_max.contiguous()
    out = torch.empty(r_n, hq, max_blocks, device=query.device, dtype=torch.float32)
    _quest_kernel[(r_n, hq)](
        query, key_min, key_max, num_blocks.to(torch.int32), out, max_blocks, *query.stride(),
        G=hq // hkv, HQ=hq, HKV=hkv, HEAD_DIM=d,
        BLOCK_B=min(64, triton.next_power_of_2(max(max_blocks, 1))), BLOCK_D=triton.next_power_of_2(d),
    )
    return out
