"""Observation-window attention at prefill: softmax(q_window · Kᵀ) against the paged keys.

FlashAttention-style prefill never materialises probabilities, so SnapKV/LaProx/HAE scores
recompute them for the last W prompt queries. One launch for all the step's requests (windows
padded to the longest; each row's own length in ``window_lens``), grid ``(request, KV head)``:
the window queries of every query head of the KV group are one tile, so a group reads its keys
once, and only one ``[G·W, block_size]`` logit tile exists at a time:

pass 1 walks the request's blocks computing the row max ``m`` and denominator ``den``
(online softmax); pass 2 walks them again, writes ``p = e^(s - m) / den`` and adds the
tile's sum per query head into that block's total. Window query i sits at position
``seq_len - W + i`` (causal, right-aligned: a row with a shorter window uses the tile's last
``window_lens[r]`` queries); rows before the prompt start or outside the window are zero.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .paged import WindowStats


@triton.jit
def _window_logits(q, k_tile, bt_row, b, seq_len, pos, row_ok, d_ok, s_kb, BLOCK_SIZE: tl.constexpr):
    """Logits ``[ROWS, BLOCK_SIZE]`` of the window queries on the row's block ``b``, -inf where
    hidden: a key after the query, or past the row's length (a partial block's unused tail)."""
    blk = tl.load(bt_row + b).to(tl.int64)
    tok = b * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    k = tl.load(k_tile + blk * s_kb, mask=(tok < seq_len)[:, None] & d_ok[None, :],
                other=0.0).to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision="ieee")
    visible = row_ok[:, None] & (tok[None, :] <= pos[:, None]) & (tok < seq_len)[None, :]
    return tl.where(visible, s, float("-inf")), tok


#: integer arguments that change with the window length and the rows' widths (see
#: ``fused_decode.DO_NOT_SPECIALIZE``); the window itself is a runtime ``W``, its tile
#: ``BLOCK_W`` one constexpr value (32) for every window up to 32 (``window_tile``)
DO_NOT_SPECIALIZE = {"_window_kernel": ("max_blocks", "s_qr", "s_qh", "s_qw", "s_btr", "W",
                                         "q_shift")}


@triton.jit(do_not_specialize=DO_NOT_SPECIALIZE["_window_kernel"])
def _window_kernel(
    q_ptr, k_ptr, bt_ptr, sl_ptr, wl_ptr, probs_ptr, bsum_ptr,
    scale, max_blocks,
    s_qr, s_qh, s_qw, s_qd,
    s_kb, s_kt, s_kh, s_kd,
    s_btr, W, q_shift,
    G: tl.constexpr, HQ: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr, PROBS: tl.constexpr,
):
    r = tl.program_id(0)
    kvh = tl.program_id(1)
    seq_len = tl.load(sl_ptr + r)
    w_r = tl.load(wl_ptr + r)  # this row's window: the tile's last w_r queries
    n_blocks = tl.cdiv(seq_len, BLOCK_SIZE)
    rows = tl.arange(0, BLOCK_G * BLOCK_W)  # (query head g of the group, window query i)
    g = rows // BLOCK_W
    i = rows % BLOCK_W
    offs_t = tl.arange(0, BLOCK_SIZE)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    h = kvh * G + g
    pos = seq_len - W + i + q_shift  # absolute position of each window query
    row_ok = (g < G) & (i < W) & (i >= W - w_r) & (pos >= 0)
    q = tl.load(q_ptr + r * s_qr + h[:, None] * s_qh + i[:, None] * s_qw + offs_d[None, :] * s_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32) * scale
    bt_row = bt_ptr + r * s_btr
    k_tile = k_ptr + offs_t[:, None] * s_kt + kvh * s_kh + offs_d[None, :] * s_kd  # + block offset

    # pass 1: row max and denominator
    m = tl.full([BLOCK_G * BLOCK_W], float("-inf"), tl.float32)
    den = tl.zeros([BLOCK_G * BLOCK_W], tl.float32)
    for b in range(0, n_blocks):
        s, _ = _window_logits(q, k_tile, bt_row, b, seq_len, pos, row_ok, d_ok, s_kb, BLOCK_SIZE)
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        den = den * tl.exp(m - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
        m = m_new

    # pass 2: normalised probabilities (hidden logits give 0) and per-(block, head) sums
    has = den > 0
    m_safe = tl.where(has, m, 0.0)
    inv = tl.where(has, 1.0 / tl.where(has, den, 1.0), 0.0)
    heads = kvh * G + tl.arange(0, BLOCK_G)
    for b in range(0, n_blocks):
        s, tok = _window_logits(q, k_tile, bt_row, b, seq_len, pos, row_ok, d_ok, s_kb, BLOCK_SIZE)
        p = tl.exp(s - m_safe[:, None]) * inv[:, None]
        if PROBS:
            row = (r * HQ + h) * W + i
            tl.store(probs_ptr + row[:, None] * (max_blocks * BLOCK_SIZE) + tok[None, :], p,
                     mask=((g < G) & (i < W))[:, None] & (tok < seq_len)[None, :])
        per_head = tl.sum(tl.reshape(tl.sum(p, 1), (BLOCK_G, BLOCK_W)), 1)  # [BLOCK_G]
        tl.store(bsum_ptr + (r * max_blocks + b) * HQ + heads, per_head,
                 mask=tl.arange(0, BLOCK_G) < G)


def window_tile(w: int) -> int:
    """The query tile of a window of ``w``: 32 for every window up to 32 (the policies'
    default), so short last chunks do not compile a variant of their own."""
    return max(32, triton.next_power_of_2(w))


def paged_window_attention(
    q_window: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    *,
    probs: bool = True,
    window_lens: torch.Tensor | None = None,
    causal: bool = True,
) -> WindowStats:
    """Window attention for ``q_window [R, Hq, W, D]`` over paged ``[num_blocks, bs, Hkv, D]`` keys.

    ``window_lens`` ``[R]`` int32: each row's window (its last queries of the tile; default W
    for all). ``probs=False`` skips the ``[R, Hq, W, max_T]`` probability tensor and returns
    only the per-block sums. ``causal=False``: every query sees the row's every key (queries
    from outside the row, e.g. the question probe's).
    """
    r_n, hq, w, d = q_window.shape
    _, bs, hkv, _ = key_cache.shape
    max_blocks = block_table.shape[1]
    scale = d**-0.5 if scale is None else float(scale)
    dev = q_window.device
    if window_lens is None:
        window_lens = torch.full((r_n,), w, dtype=torch.int32, device=dev)
    # zeros: entries past a request's length are never written
    prob_buf = torch.zeros(r_n, hq, w, max_blocks * bs if probs else 0, device=dev, dtype=torch.float32)
    bsum = torch.zeros(r_n, max_blocks, hq, device=dev, dtype=torch.float32)
    _window_kernel[(r_n, hkv)](
        q_window, key_cache, block_table, seq_lens, window_lens, prob_buf, bsum,
        scale, max_blocks,
        *q_window.stride(), *key_cache.stride(), block_table.stride(0), w, 0 if causal else w,
        G=hq // hkv, HQ=hq, BLOCK_SIZE=bs, HEAD_DIM=d, BLOCK_G=triton.next_power_of_2(hq // hkv),
        BLOCK_W=window_tile(w), BLOCK_D=max(16, triton.next_power_of_2(d)), PROBS=probs,
    )
    return WindowStats(prob_buf if probs else None, bsum)
