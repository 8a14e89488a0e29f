"""LaProx's projected-value norm ``‖v_t W_O^h‖₂`` straight from the paged values.

``‖v W_O^h‖² = vᵀ G_h v`` with the per-query-head Gram matrix ``G_h = W_O^h W_O^hᵀ`` (D×D,
``reference.wo_gram``, computed once at load time), so the hidden-size projection is never
formed. Grid ``(block, request, KV head)``: each program reads one value tile ``[bs, D]``
once and serves every query head of its GQA group; ``G_h`` is consumed in column chunks so a
128×128 matrix never sits in registers whole.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: integer arguments that change with the rows' widths (see ``fused_decode.DO_NOT_SPECIALIZE``)
DO_NOT_SPECIALIZE = {"_value_norm_kernel": ("max_blocks", "s_btr")}


@triton.jit(do_not_specialize=DO_NOT_SPECIALIZE["_value_norm_kernel"])
def _value_norm_kernel(
    v_ptr, g_ptr, bt_ptr, sl_ptr, out_ptr,
    max_blocks,
    s_vb, s_vt, s_vh, s_vd,
    s_btr,
    G: tl.constexpr, HQ: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)  # axis 0: the only one allowed more than 65535 programs
    r = tl.program_id(1)
    kvh = tl.program_id(2)
    seq_len = tl.load(sl_ptr + r)
    if b * BLOCK_SIZE >= seq_len:
        return  # the output is zero-initialised
    blk = tl.load(bt_ptr + r * s_btr + b).to(tl.int64)
    offs_t = tl.arange(0, BLOCK_SIZE)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    tok = b * BLOCK_SIZE + offs_t
    t_ok = tok < seq_len
    tile = v_ptr + blk * s_vb + offs_t[:, None] * s_vt + kvh * s_vh
    v = tl.load(tile + offs_d[None, :] * s_vd, mask=t_ok[:, None] & (offs_d < HEAD_DIM)[None, :],
                other=0.0).to(tl.float32)
    for g in tl.static_range(G):
        h = kvh * G + g
        sq = tl.zeros([BLOCK_SIZE], tl.float32)
        for n0 in tl.static_range(0, BLOCK_D, BLOCK_N):
            cols = n0 + offs_n
            c_ok = cols < HEAD_DIM
            gram = tl.load(g_ptr + (h * HEAD_DIM + offs_d[:, None]) * HEAD_DIM + cols[None, :],
                           mask=(offs_d < HEAD_DIM)[:, None] & c_ok[None, :], other=0.0)
            u = tl.dot(v, gram.to(tl.float32), input_precision="ieee")  # (v G)[:, cols]
            v_cols = tl.load(tile + cols[None, :] * s_vd, mask=t_ok[:, None] & c_ok[None, :],
                             other=0.0).to(tl.float32)
            sq += tl.sum(u * v_cols, 1)
        tl.store(out_ptr + (r * HQ + h) * (max_blocks * BLOCK_SIZE) + tok,
                 tl.sqrt(tl.maximum(sq, 0.0)), mask=t_ok)


def paged_value_proj_norm(gram, value_cache, block_table, seq_lens) -> torch.Tensor:
    """``[R, Hq, max_blocks * bs]`` float32 norms ``sqrt(v_tᵀ G_h v_t)`` (0 past each length).

    ``gram`` is ``[Hq, D, D]`` (float32 recommended: it is the precision of the result).
    """
    hq, d, _ = gram.shape
    _, bs, hkv, _ = value_cache.shape
    r_n, max_blocks = block_table.shape
    out = torch.zeros(r_n, hq, max_blocks * bs, device=value_cache.device, dtype=torch.float32)
    block_d = max(16, triton.next_power_of_2(d))
    _value_norm_kernel[(max_blocks, r_n, hkv)](
        value_cache, gram.contiguous(), block_table, seq_lens, out, max_blocks,
        *value_cache.stride(), block_table.stride(0),
        G=hq // hkv, HQ=hq, BLOCK_SIZE=bs, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_N=min(64, block_d),
    )
    return out
