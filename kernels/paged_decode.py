"""Fused paged decode attention that also measures how much attention each block received.

Scheme (two phases, two launches; K and V are read once, in phase 1):

Phase 1, grid ``(request, KV head, split)``: flash-decoding over a contiguous range of the
request's blocks (splits keep a long single request from running on a handful of programs).
All query heads of the KV group are one tile, so GQA reads each K/V tile once. Per block it
computes the logits ``s``, the block's own max ``m_b``, ``l_b = Σ exp(s - m_b)`` and
``q_b = Σ exp(s - m_b)²`` and stores those three raw partials; the output accumulator uses the
usual online softmax and is stored unnormalised with its split's max and denominator.
Optionally the raw logits are stored too (for per-token probabilities).

Phase 2, grid ``(request, KV head)``: merges the splits into the output and the final row max
``m`` and denominator ``den``, then rescales each block's partials:
``mass = l_b · e^(m_b - m) / den`` and ``sq = q_b · e^(2(m_b - m)) / den²``, which are exactly the
block's Σp and Σp² (p = the final softmax). Logits become probabilities ``e^(s - m) / den``.

With ``stats=False`` the same kernels compute plain paged attention (the benchmark baseline).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .paged import DecodeStats

_TARGET_PROGRAMS = 256  # enough splits to fill a GPU when the batch is small


@triton.jit
def _decode_phase1(
    q_ptr, k_ptr, v_ptr, bt_ptr, sl_ptr,
    acc_ptr, ms_ptr, ls_ptr,  # per split: [R, Hq, S, D], [R, Hq, S], [R, Hq, S]
    mb_ptr, lb_ptr, qb_ptr,  # per block partials: [R, max_blocks, Hq]
    logit_ptr,  # [R, Hq, max_T]
    scale, blocks_per_split, num_splits, max_blocks,
    s_qr, s_qh, s_qd,
    s_kb, s_kt, s_kh, s_kd,
    s_vb, s_vt, s_vh, s_vd,
    s_btr,
    G: tl.constexpr, HQ: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, STATS: tl.constexpr, LOGITS: tl.constexpr,
):
    r = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(sl_ptr + r)
    n_blocks = tl.cdiv(seq_len, BLOCK_SIZE)
    b_start = split * blocks_per_split
    b_end = tl.minimum(b_start + blocks_per_split, n_blocks)
    if b_start >= n_blocks:
        return  # phase 2 only reads the splits that hold tokens

    offs_g = tl.arange(0, BLOCK_G)
    offs_t = tl.arange(0, BLOCK_SIZE)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < G
    d_ok = offs_d < HEAD_DIM
    heads = kvh * G + offs_g
    q = tl.load(q_ptr + r * s_qr + heads[:, None] * s_qh + offs_d[None, :] * s_qd,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32) * scale

    # this KV head's [BLOCK_SIZE, BLOCK_D] tile of a block, less the block offset
    k_tile = k_ptr + offs_t[:, None] * s_kt + kvh * s_kh + offs_d[None, :] * s_kd
    v_tile = v_ptr + offs_t[:, None] * s_vt + kvh * s_vh + offs_d[None, :] * s_vd

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    den = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for b in range(b_start, b_end):
        blk = tl.load(bt_ptr + r * s_btr + b).to(tl.int64)
        tok = b * BLOCK_SIZE + offs_t
        t_ok = tok < seq_len
        kv_mask = t_ok[:, None] & d_ok[None, :]
        k = tl.load(k_tile + blk * s_kb, mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")  # [BLOCK_G, BLOCK_SIZE]
        s = tl.where(t_ok[None, :], s, float("-inf"))
        m_b = tl.max(s, 1)  # finite: every visited block holds >= 1 token
        p = tl.exp(s - m_b[:, None])
        l_b = tl.sum(p, 1)
        if STATS:
            off = (r * max_blocks + b) * HQ + heads
            tl.store(mb_ptr + off, m_b, mask=g_ok)
            tl.store(lb_ptr + off, l_b, mask=g_ok)
            tl.store(qb_ptr + off, tl.sum(p * p, 1), mask=g_ok)
        if LOGITS:
            tl.store(logit_ptr + (r * HQ + heads[:, None]) * (max_blocks * BLOCK_SIZE) + tok[None, :],
                     s, mask=g_ok[:, None] & t_ok[None, :])
        v = tl.load(v_tile + blk * s_vb, mask=kv_mask, other=0.0).to(tl.float32)
        m_new = tl.maximum(m, m_b)
        alpha = tl.exp(m - m_new)
        beta = tl.exp(m_b - m_new)
        acc = acc * alpha[:, None] + tl.dot(p * beta[:, None], v, input_precision="ieee")
        den = den * alpha + l_b * beta
        m = m_new

    row = (r * HQ + heads) * num_splits + split
    tl.store(acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])
    tl.store(ms_ptr + row, m, mask=g_ok)
    tl.store(ls_ptr + row, den, mask=g_ok)


@triton.jit
def _decode_phase2(
    acc_ptr, ms_ptr, ls_ptr, mb_ptr, lb_ptr, qb_ptr, logit_ptr, sl_ptr,
    out_ptr, mass_q_ptr, sq_q_ptr, mass_ptr, sq_ptr,
    blocks_per_split, num_splits, max_blocks,
    s_or, s_oh, s_od,
    G: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr, STATS: tl.constexpr, LOGITS: tl.constexpr,
):
    r = tl.program_id(0)
    kvh = tl.program_id(1)
    seq_len = tl.load(sl_ptr + r)
    n_splits = tl.cdiv(tl.cdiv(seq_len, BLOCK_SIZE), blocks_per_split)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < G
    d_ok = offs_d < HEAD_DIM
    heads = kvh * G + offs_g

    # merge the splits (online softmax over split maxima)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    den = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for sp in range(0, n_splits):
        row = (r * HQ + heads) * num_splits + sp
        m_s = tl.load(ms_ptr + row, mask=g_ok, other=0.0)
        l_s = tl.load(ls_ptr + row, mask=g_ok, other=0.0)
        a_s = tl.load(acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :],
                      mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        m_new = tl.maximum(m, m_s)
        alpha = tl.exp(m - m_new)
        beta = tl.exp(m_s - m_new)
        acc = acc * alpha[:, None] + a_s * beta[:, None]
        den = den * alpha + l_s * beta
        m = m_new
    has = den > 0  # false only for empty requests (seq_len 0)
    inv_l = tl.where(has, 1.0 / tl.where(has, den, 1.0), 0.0)
    m_safe = tl.where(has, m, 0.0)
    out = acc * inv_l[:, None]
    tl.store(out_ptr + r * s_or + heads[:, None] * s_oh + offs_d[None, :] * s_od,
             out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])

    if STATS:
        n_blocks = tl.cdiv(seq_len, BLOCK_SIZE)
        offs_b = tl.arange(0, BLOCK_B)
        for b0 in range(0, max_blocks, BLOCK_B):
            bb = b0 + offs_b
            live = (bb < n_blocks)[:, None] & g_ok[None, :]
            off = (r * max_blocks + bb[:, None]) * HQ + heads[None, :]  # [BLOCK_B, BLOCK_G]
            m_b = tl.load(mb_ptr + off, mask=live, other=0.0)
            w = tl.where(live, tl.exp(m_b - m_safe[None, :]), 0.0) * inv_l[None, :]
            mass = tl.load(lb_ptr + off, mask=live, other=0.0) * w
            sq = tl.load(qb_ptr + off, mask=live, other=0.0) * w * w
            store_ok = (bb < max_blocks)[:, None] & g_ok[None, :]
            tl.store(mass_q_ptr + off, mass, mask=store_ok)
            tl.store(sq_q_ptr + off, sq, mask=store_ok)
            kv_off = (r * max_blocks + bb) * HKV + kvh
            tl.store(mass_ptr + kv_off, tl.sum(mass, 1), mask=bb < max_blocks)
            tl.store(sq_ptr + kv_off, tl.sum(sq, 1), mask=bb < max_blocks)

    if LOGITS:
        offs_t = tl.arange(0, BLOCK_T)
        for t0 in range(0, max_blocks * BLOCK_SIZE, BLOCK_T):
            tok = t0 + offs_t
            off = (r * HQ + heads[:, None]) * (max_blocks * BLOCK_SIZE) + tok[None, :]
            live = g_ok[:, None] & (tok < seq_len)[None, :]
            s = tl.load(logit_ptr + off, mask=live, other=0.0)
            p = tl.where(live, tl.exp(s - m_safe[:, None]) * inv_l[:, None], 0.0)
            tl.store(logit_ptr + off, p, mask=g_ok[:, None] & (tok < max_blocks * BLOCK_SIZE)[None, :])


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(n))


def paged_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    *,
    stats: bool = True,
    token_probs: bool = False,
    blocks_per_split: int | None = None,
) -> DecodeStats:
    """Decode attention for ``query [R, Hq, D]`` over paged ``[num_blocks, bs, Hkv, D]`` caches.

    Returns :class:`DecodeStats`; with ``stats=False`` the block tensors are empty ``[R, 0, *]``.
    ``token_probs`` adds the full probability rows (an extra ``R·Hq·max_T`` write).
    """
    r_n, hq, d = query.shape
    _, bs, hkv, _ = key_cache.shape
    group = hq // hkv
    max_blocks = block_table.shape[1]
    scale = d**-0.5 if scale is None else float(scale)
    if blocks_per_split is None:
        splits_wanted = max(1, _TARGET_PROGRAMS // max(1, r_n * hkv))
        blocks_per_split = max(1, triton.cdiv(max_blocks, splits_wanted))
    num_splits = max(1, triton.cdiv(max_blocks, blocks_per_split))
    dev, f32 = query.device, torch.float32
    logits = token_probs
    stat_blocks = max_blocks if stats else 0

    acc = torch.empty(r_n, hq, num_splits, d, device=dev, dtype=f32)
    m_split = torch.empty(r_n, hq, num_splits, device=dev, dtype=f32)
    l_split = torch.empty_like(m_split)
    part = [torch.empty(r_n, stat_blocks, hq, device=dev, dtype=f32) for _ in range(3)]
    logit_buf = torch.empty(r_n, hq, max_blocks * bs if logits else 0, device=dev, dtype=f32)
    out = torch.empty(r_n, hq, d, device=dev, dtype=query.dtype)
    mass_q = torch.empty(r_n, stat_blocks, hq, device=dev, dtype=f32)
    sq_q = torch.empty_like(mass_q)
    mass = torch.empty(r_n, stat_blocks, hkv, device=dev, dtype=f32)
    sq = torch.empty_like(mass)

    common = dict(G=group, HQ=hq, BLOCK_SIZE=bs, HEAD_DIM=d, BLOCK_G=_pow2(group),
                  BLOCK_D=_pow2(d), STATS=stats, LOGITS=logits)
    _decode_phase1[(r_n, hkv, num_splits)](
        query, key_cache, value_cache, block_table, seq_lens,
        acc, m_split, l_split, *part, logit_buf,
        scale, blocks_per_split, num_splits, max_blocks,
        *query.stride(), *key_cache.stride(), *value_cache.stride(), block_table.stride(0),
        **common,
    )
    _decode_phase2[(r_n, hkv)](
        acc, m_split, l_split, *part, logit_buf, seq_lens,
        out, mass_q, sq_q, mass, sq,
        blocks_per_split, num_splits, max_blocks, *out.stride(),
        HKV=hkv, BLOCK_B=min(64, _pow2(max_blocks)), BLOCK_T=min(256, _pow2(max_blocks * bs)),
        **common,
    )
    return DecodeStats(out, mass, sq, mass_q, sq_q, logit_buf if logits else None)
