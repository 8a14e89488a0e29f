"""Decode attention that measures, in the same pass, the attention each block received.

This is the kernel of the plugin's attention backend (``vllm_kvevict.backend``): on NVIDIA GPUs
it *is* the decode attention of the evicted KV-cache group, so the statistics the policies read
at decode cost no second pass over K/V and no per-token probability tensor.

Scheme (two launches; K and V are read once, in phase 1):

Phase 1, grid ``(row, KV head, split)``: each row's blocks are cut into ``num_splits`` equal
ranges (flash-decoding: a long request does not run on a handful of programs); all query heads
of a KV group form one tile, so GQA reads each K/V tile once, and the logits are a tensor-core
``tl.dot`` in the cache dtype with float32 accumulation. Per block the program has the logits
``s``, the block's own max ``m_b`` and ``l_b = Σ exp(s - m_b)``; for a scored row it stores
``(m_b, l_b)`` per query head (the only extra memory traffic: 8 bytes per block and head). The
output accumulator is the usual online softmax, stored per split unnormalised with its max and
denominator. One more split index (``num_splits``) visits the row's *parked* blocks (recycle
bin: out of attention, still in memory): it computes their ``(m_b, l_b)`` from K only and adds
nothing to the output.

Phase 2, grid ``(row, KV head)``: merges the splits into the output and the row's final max
``m`` and denominator ``den``, then rescales each block's partials, ``mass_q = l_b · e^(m_b - m)
/ den`` — exactly the block's Σ softmax probability for an attended block, and for a parked
block the mass it would get relative to what is attended — and folds them into the persistent
per-row statistics over the query heads of the group: ``mass += Σ_q mass_q`` and
``peak = max(peak, max_q mass_q)``. Called once per layer on the same buffers, that is the sum
and the max over layers and query heads. A row whose ``slot`` is -1 is not scored: phase 1
stores nothing for it and phase 2 only writes its output.

Everything a launch reads or writes is an argument tensor and every size the grid depends on is
a Python int fixed per batch size, so a FULL CUDA graph captures and replays it; which rows are
scored is data (``slot``), not Python.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: programs phase 1 aims for when the batch is small (more splits per row)
TARGET_PROGRAMS = 512
MAX_SPLITS = 16
#: cap of ``m_b - m`` in the rescale: a parked block may out-score every attended one
MAX_EXPONENT = 60.0
#: integer arguments that change from step to step: Triton would otherwise compile a variant
#: for the value 1 and for multiples of 16 (a 1-3 s stall mid-serving each); every other
#: argument is fixed for the life of an engine (strides, buffer widths, flags)
DO_NOT_SPECIALIZE = {"_phase1": ("num_splits", "s_btr"), "_phase2": ("num_splits",)}


@triton.jit(do_not_specialize=DO_NOT_SPECIALIZE["_phase1"])
def _phase1(
    q_ptr, k_ptr, v_ptr, bt_ptr, sl_ptr, slot_ptr, pt_ptr, pc_ptr,
    acc_ptr, ms_ptr, ls_ptr, mb_ptr, lb_ptr,
    scale, num_splits, nb_stats,
    s_qr, s_qh, s_qd,
    s_kb, s_kt, s_kh, s_kd,
    s_vb, s_vt, s_vh, s_vd,
    s_btr,
    G: tl.constexpr, HQ: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, STATS: tl.constexpr, IEEE: tl.constexpr,
):
    r = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(sl_ptr + r)
    n_blocks = tl.cdiv(seq_len, BLOCK_SIZE)
    slot = -1
    if STATS:
        slot = tl.load(slot_ptr + r)

    offs_g = tl.arange(0, BLOCK_G)
    offs_t = tl.arange(0, BLOCK_SIZE)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < G
    d_ok = offs_d < HEAD_DIM
    heads = kvh * G + offs_g
    q = tl.load(q_ptr + r * s_qr + heads[:, None] * s_qh + offs_d[None, :] * s_qd,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    k_tile = k_ptr + offs_t[:, None] * s_kt + kvh * s_kh + offs_d[None, :] * s_kd
    v_tile = v_ptr + offs_t[:, None] * s_vt + kvh * s_vh + offs_d[None, :] * s_vd

    if split < num_splits:
        per_split = tl.cdiv(n_blocks, num_splits)
        b_start = split * per_split
        b_end = tl.minimum(b_start + per_split, n_blocks)
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        den = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for b in range(b_start, b_end):
            blk = tl.load(bt_ptr + r * s_btr + b).to(tl.int64)
            t_ok = b * BLOCK_SIZE + offs_t < seq_len
            kv_mask = t_ok[:, None] & d_ok[None, :]
            k = tl.load(k_tile + blk * s_kb, mask=kv_mask, other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                s = tl.dot(q, tl.trans(k)) * scale  # [BLOCK_G, BLOCK_SIZE], float32
            s = tl.where(t_ok[None, :], s, float("-inf"))
            m_b = tl.max(s, 1)  # finite: a visited block holds >= 1 token
            p = tl.exp(s - m_b[:, None])
            l_b = tl.sum(p, 1)
            if STATS:
                if slot >= 0:
                    off = (slot * nb_stats + b) * HQ + heads
                    tl.store(mb_ptr + off, m_b, mask=g_ok)
                    tl.store(lb_ptr + off, l_b, mask=g_ok)
            v = tl.load(v_tile + blk * s_vb, mask=kv_mask, other=0.0)
            m_new = tl.maximum(m, m_b)
            alpha = tl.exp(m - m_new)
            beta = tl.exp(m_b - m_new)
            if IEEE:
                pv = tl.dot((p * beta[:, None]).to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot((p * beta[:, None]).to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            den = den * alpha + l_b * beta
            m = m_new
        row = (r * HQ + heads) * num_splits + split
        tl.store(acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc,
                 mask=g_ok[:, None] & d_ok[None, :])
        tl.store(ms_ptr + row, m, mask=g_ok)
        tl.store(ls_ptr + row, den, mask=g_ok)
    elif STATS:
        if slot >= 0:  # the parked blocks: full, scored from K, not attended
            first = tl.load(pc_ptr + slot)
            n_park = tl.load(pc_ptr + slot + 1) - first
            # resident blocks never outnumber a request's blocks at max_model_len (nb_stats);
            # the clamp only keeps a broken plan from writing into the next slot
            n_park = tl.minimum(n_park, nb_stats - n_blocks)
            for i in range(0, n_park):
                blk = tl.load(pt_ptr + first + i).to(tl.int64)
                k = tl.load(k_tile + blk * s_kb, mask=d_ok[None, :], other=0.0)
                if IEEE:
                    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
                else:
                    s = tl.dot(q, tl.trans(k)) * scale
                m_b = tl.max(s, 1)
                off = (slot * nb_stats + n_blocks + i) * HQ + heads
                tl.store(mb_ptr + off, m_b, mask=g_ok)
                tl.store(lb_ptr + off, tl.sum(tl.exp(s - m_b[:, None]), 1), mask=g_ok)


@triton.jit(do_not_specialize=DO_NOT_SPECIALIZE["_phase2"])
def _phase2(
    acc_ptr, ms_ptr, ls_ptr, mb_ptr, lb_ptr, sl_ptr, slot_ptr, pc_ptr,
    out_ptr, mass_ptr, peak_ptr,
    num_splits, nb_stats,
    s_or, s_oh, s_od,
    G: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_B: tl.constexpr, STATS: tl.constexpr, RESCALE: tl.constexpr,
):
    r = tl.program_id(0)
    kvh = tl.program_id(1)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < G
    d_ok = offs_d < HEAD_DIM
    heads = kvh * G + offs_g

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    den = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for sp in range(0, num_splits):
        row = (r * HQ + heads) * num_splits + sp
        m_s = tl.load(ms_ptr + row, mask=g_ok, other=float("-inf"))
        l_s = tl.load(ls_ptr + row, mask=g_ok, other=0.0)
        a_s = tl.load(acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :],
                      mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        m_new = tl.maximum(m, m_s)
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # empty so far: no -inf - -inf
        alpha = tl.exp(m - ref)
        beta = tl.exp(m_s - ref)
        acc = acc * alpha[:, None] + a_s * beta[:, None]
        den = den * alpha + l_s * beta
        m = m_new
    has = den > 0  # false only for an empty row (seq_len 0: padding of a captured batch)
    inv_den = tl.where(has, 1.0 / tl.where(has, den, 1.0), 0.0)
    tl.store(out_ptr + r * s_or + heads[:, None] * s_oh + offs_d[None, :] * s_od,
             (acc * inv_den[:, None]).to(out_ptr.dtype.element_ty),
             mask=g_ok[:, None] & d_ok[None, :])

    if STATS:
        slot = tl.load(slot_ptr + r)
        if slot >= 0:
            n_park = tl.load(pc_ptr + slot + 1) - tl.load(pc_ptr + slot)
            n_total = tl.minimum(tl.cdiv(tl.load(sl_ptr + r), BLOCK_SIZE) + n_park, nb_stats)
            m_ref = tl.where(has, m, 0.0)
            offs_b = tl.arange(0, BLOCK_B)
            for b0 in range(0, n_total, BLOCK_B):
                bb = b0 + offs_b
                b_ok = bb < n_total
                live = b_ok[:, None] & g_ok[None, :]
                off = (slot * nb_stats + bb[:, None]) * HQ + heads[None, :]  # [BLOCK_B, BLOCK_G]
                m_b = tl.load(mb_ptr + off, mask=live, other=0.0)
                l_b = tl.load(lb_ptr + off, mask=live, other=0.0)
                if RESCALE:
                    w = tl.exp(tl.minimum(m_b - m_ref[None, :], MAX_EXPONENT)) * inv_den[None, :]
                else:  # the mutant the tests must catch: block partials taken as they are
                    w = tl.full([BLOCK_B, BLOCK_G], 1.0, tl.float32)
                mass_q = tl.where(live, l_b * w, 0.0)
                st = (slot * HKV + kvh) * nb_stats + bb
                old_mass = tl.load(mass_ptr + st, mask=b_ok, other=0.0)
                old_peak = tl.load(peak_ptr + st, mask=b_ok, other=0.0)
                tl.store(mass_ptr + st, old_mass + tl.sum(mass_q, 1), mask=b_ok)
                tl.store(peak_ptr + st, tl.maximum(old_peak, tl.max(mass_q, 1)), mask=b_ok)


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(n))


def num_splits_for(rows: int, num_kv_heads: int) -> int:
    """Splits per row for a batch of ``rows``: enough programs to fill a GPU when the batch is
    small, one when it is large. A Python function of the batch size only, so every CUDA graph
    capture size has its own fixed value."""
    return max(1, min(MAX_SPLITS, TARGET_PROGRAMS // max(1, rows * num_kv_heads)))


def split_scratch(max_rows: int, num_heads: int, num_kv_heads: int, head_dim: int,
                  device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Persistent phase-1 scratch for any batch of up to ``max_rows`` rows: flat float32
    buffers holding ``[rows, Hq, num_splits_for(rows), D]`` and two ``[rows, Hq, splits]``."""
    # r * splits(r) peaks below TARGET_PROGRAMS rows; past it splits is 1 and r grows
    cells = max(max_rows, *(r * num_splits_for(r, num_kv_heads)
                            for r in range(1, min(max_rows, TARGET_PROGRAMS) + 1)))
    f32 = torch.float32
    return (torch.empty(cells * num_heads * head_dim, dtype=f32, device=device),
            torch.empty(cells * num_heads, dtype=f32, device=device),
            torch.empty(cells * num_heads, dtype=f32, device=device))


def fused_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor,
    scale: float,
    *,
    slot: torch.Tensor | None = None,
    park_ids: torch.Tensor | None = None,
    park_start: torch.Tensor | None = None,
    mass: torch.Tensor | None = None,
    peak: torch.Tensor | None = None,
    block_partials: tuple[torch.Tensor, torch.Tensor] | None = None,
    scratch: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    num_splits: int | None = None,
    rescale: bool = True,
) -> torch.Tensor:
    """Decode attention of ``R`` rows (one query token each) into ``out``, and, for the rows
    whose ``slot`` is not -1, the blocks' attention folded into ``mass``/``peak``.

    Args:
        query: ``[R, Hq, D]``, any strides.
        key_cache, value_cache: logical ``[num_blocks, block_size, Hkv, D]`` views of vLLM's
            GPU cache (``PagedKV.from_vllm``), any strides; float16/bfloat16/float32.
        block_table: ``[>= R, max_blocks]`` int32, contiguous rows (the compacted rows).
        seq_lens: ``[>= R]`` int32 compacted lengths; 0 = an empty (padding) row.
        out: ``[R, Hq, D]`` written.
        slot: ``[>= R]`` int32, the statistics slot of each row or -1; None = no statistics.
        park_ids: int32 parked block ids of all slots, slot ``s``'s at
            ``park_ids[park_start[s]: park_start[s + 1]]`` (``park_start`` ``[S + 1]`` int32).
        mass, peak: ``[S, Hkv, NB]`` float32, accumulated (``+=`` / ``max=``); a slot's
            attended blocks at ``[0, n)`` in row order, then its parked blocks.
        block_partials: two ``[S, NB, Hq]`` float32 scratch tensors (allocated if None).
        scratch: from :func:`split_scratch` (allocated if None).
        num_splits: default :func:`num_splits_for`.
        rescale: False only for the mutant test (partials not rescaled by the final softmax).
    Returns:
        ``out``.
    """
    r_n, hq, d = query.shape
    _, bs, hkv, _ = key_cache.shape
    group = hq // hkv
    dev = query.device
    splits = num_splits or num_splits_for(r_n, hkv)
    if scratch is None:
        scratch = split_scratch(max(r_n, 1), hq, hkv, d, dev)
    acc, m_split, l_split = scratch
    if acc.numel() < r_n * hq * splits * d:
        raise ValueError(f"scratch holds {acc.numel()} floats, {r_n} rows x {splits} splits "
                         f"need {r_n * hq * splits * d}")
    stats = slot is not None
    if stats:
        nb_stats = mass.shape[2]
        if block_partials is None:
            block_partials = tuple(torch.empty(mass.shape[0], nb_stats, hq, device=dev,
                                               dtype=torch.float32) for _ in range(2))
        mb, lb = block_partials
        pt, pc = park_ids, park_start
    else:
        nb_stats = 0
        slot = pt = pc = mb = lb = mass = peak = seq_lens  # never read (STATS is off)
    common = dict(G=group, HQ=hq, BLOCK_SIZE=bs, HEAD_DIM=d, BLOCK_G=_pow2(group),
                  BLOCK_D=_pow2(d), STATS=stats)
    _phase1[(r_n, hkv, splits + (1 if stats else 0))](
        query, key_cache, value_cache, block_table, seq_lens, slot, pt, pc,
        acc, m_split, l_split, mb, lb,
        float(scale), splits, nb_stats,
        *query.stride(), *key_cache.stride(), *value_cache.stride(), block_table.stride(0),
        IEEE=key_cache.dtype == torch.float32, **common,
    )
    _phase2[(r_n, hkv)](
        acc, m_split, l_split, mb, lb, seq_lens, slot, pc,
        out, mass, peak, splits, nb_stats, *out.stride(),
        HKV=hkv, BLOCK_B=min(64, _pow2(max(nb_stats, 1))), RESCALE=rescale, **common,
    )
    return out
