"""Torch references over the paged layout: the spec each Triton kernel is tested against.

They are also the serving path where Triton cannot run (the CPU backend): they gather each
request's blocks into a dense copy and compute in float32, scaling the query before the
product as the kernels do. Caches are logical
``[num_blocks, block_size, Hkv, D]`` views (:class:`PagedKV` makes them for every vLLM
layout); ``block_table`` rows hold only a request's real blocks (the compacted row) and
``seq_lens`` its compacted length. Token axes have length ``max_blocks * block_size`` so the
GPU path never needs a host sync to size them.
"""

from __future__ import annotations

import torch

from .paged import DecodeStats, WindowStats, _gather


def _per_block(values: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[R, H, max_blocks * bs]`` token values -> ``[R, max_blocks, H]`` block sums."""
    r, h, t = values.shape
    return values.view(r, h, t // block_size, block_size).sum(-1).transpose(1, 2).contiguous()


def _dense_kv(key_cache, value_cache, block_row, n, group):
    """One request's keys/values as float32 ``[n, Hq, D]`` (KV heads repeated for GQA)."""
    k = _gather(key_cache, block_row, n).float().repeat_interleave(group, dim=1)
    v = _gather(value_cache, block_row, n).float().repeat_interleave(group, dim=1)
    return k, v


def decode_attention(query, key_cache, value_cache, block_table, seq_lens, scale=None) -> DecodeStats:
    """One decode query per request: attention output plus per-block probability mass/squares."""
    r_n, hq, d = query.shape
    bs, hkv = key_cache.shape[1], key_cache.shape[2]
    scale = d**-0.5 if scale is None else scale
    max_t = block_table.shape[1] * bs
    out = torch.zeros(r_n, hq, d, dtype=torch.float32, device=query.device)
    probs = torch.zeros(r_n, hq, max_t, dtype=torch.float32, device=query.device)
    for r in range(r_n):
        n = int(seq_lens[r])
        if n == 0:
            continue
        k, v = _dense_kv(key_cache, value_cache, block_table[r], n, hq // hkv)
        p = torch.softmax(torch.einsum("hd,thd->ht", query[r].float() * scale, k), dim=-1)
        out[r] = torch.einsum("ht,thd->hd", p, v)
        probs[r, :, :n] = p
    mass_q, sq_q = _per_block(probs, bs), _per_block(probs * probs, bs)
    group = lambda x: x.view(r_n, -1, hkv, hq // hkv).sum(-1)  # noqa: E731
    return DecodeStats(out.to(query.dtype), group(mass_q), group(sq_q), mass_q, sq_q, probs)


def window_attention(q_window, key_cache, block_table, seq_lens, scale=None) -> WindowStats:
    """softmax(q·Kᵀ) of the last W queries; window query i sits at position ``seq_len - W + i``.

    Causal: it sees tokens ``t <= seq_len - W + i``. Rows before the prompt start
    (``seq_len < W``) are all zero.
    """
    r_n, hq, w, d = q_window.shape
    bs, hkv = key_cache.shape[1], key_cache.shape[2]
    scale = d**-0.5 if scale is None else scale
    max_t = block_table.shape[1] * bs
    probs = torch.zeros(r_n, hq, w, max_t, dtype=torch.float32, device=q_window.device)
    for r in range(r_n):
        n = int(seq_lens[r])
        if n == 0:
            continue
        k = _gather(key_cache, block_table[r], n).float().repeat_interleave(hq // hkv, dim=1)
        s = torch.einsum("hwd,thd->hwt", q_window[r].float() * scale, k)
        pos = torch.arange(n - w, n, device=s.device)
        visible = torch.arange(n, device=s.device)[None, :] <= pos[:, None]  # [W, n]
        p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1)
        probs[r, :, :, :n] = torch.where(visible, p, 0.0)  # all-masked rows: nan -> 0
    return WindowStats(probs, _per_block(probs.sum(2), bs))


def block_key_bounds(key_cache, block_ids, counts) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max key ``[n, Hkv, D]`` over the first ``counts[i]`` tokens of block ``block_ids[i]``.

    Empty blocks get (+inf, -inf), the identity of min/max, so :func:`update_key_bounds`
    needs no first-token special case.
    """
    tiles = key_cache[block_ids.long()]  # [n, bs, Hkv, D]
    valid = (torch.arange(key_cache.shape[1], device=tiles.device)[None, :] < counts[:, None].to(tiles.device))
    valid = valid[:, :, None, None]
    kmin = torch.where(valid, tiles, float("inf")).amin(1)
    kmax = torch.where(valid, tiles, float("-inf")).amax(1)
    return kmin.to(key_cache.dtype), kmax.to(key_cache.dtype)


def request_block_counts(block_table, seq_lens, block_size) -> torch.Tensor:
    """Valid tokens of every block-table entry ``[R, max_blocks]`` (partial last block, 0 after)."""
    starts = torch.arange(block_table.shape[1], device=block_table.device) * block_size
    return (seq_lens.to(block_table.device)[:, None].long() - starts[None, :]).clamp(0, block_size)


def key_bounds(key_cache, block_table, seq_lens,
               bounds_of_blocks=block_key_bounds) -> tuple[torch.Tensor, torch.Tensor]:
    """Quest bounds of every block of every request: ``[R, max_blocks, Hkv, D]`` min and max.

    ``bounds_of_blocks`` computes the bounds of a flat list of blocks: :func:`block_key_bounds`
    by default, the Triton kernel on the GPU path (``key_bounds.paged_key_bounds``).
    """
    r_n, nb = block_table.shape
    counts = request_block_counts(block_table, seq_lens, key_cache.shape[1])
    kmin, kmax = bounds_of_blocks(key_cache, block_table.reshape(-1), counts.reshape(-1))
    return kmin.view(r_n, nb, *kmin.shape[1:]), kmax.view(r_n, nb, *kmax.shape[1:])


def update_key_bounds(key_min, key_max, rows, keys) -> None:
    """Fold new keys ``[n, Hkv, D]`` into bound rows ``key_min/max[rows[i]]`` in place.

    Called as a block fills; repeated rows are fine. Works unchanged on GPU tensors.
    """
    index = rows.long().view(-1, 1, 1).expand(keys.shape)
    key_min.scatter_reduce_(0, index, keys.to(key_min.dtype), "amin", include_self=True)
    key_max.scatter_reduce_(0, index, keys.to(key_max.dtype), "amax", include_self=True)


def quest_scores(query, key_min, key_max, num_blocks) -> torch.Tensor:
    """Quest upper bound ``score[r, h, b] = Σ_d max(q_d·min_d, q_d·max_d)`` ``[R, Hq, max_blocks]``.

    ``key_min/max`` are ``[R, max_blocks, Hkv, D]``; blocks ``b >= num_blocks[r]`` score -inf.
    """
    r_n, hq, _ = query.shape
    group = hq // key_min.shape[2]
    q = query.float()[:, None]  # [R, 1, Hq, D]
    lo = key_min.float().repeat_interleave(group, dim=2)
    hi = key_max.float().repeat_interleave(group, dim=2)
    score = torch.maximum(q * lo, q * hi).sum(-1).transpose(1, 2)  # [R, Hq, nb]
    live = torch.arange(key_min.shape[1], device=query.device)[None, :] < num_blocks.to(query.device)[:, None]
    return torch.where(live[:, None, :], score, float("-inf"))


def wo_gram(o_proj_weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Per-head Gram matrices ``G_h = W_O^h W_O^hᵀ`` ``[Hq, D, D]`` from ``o_proj.weight``.

    ``o_proj.weight`` is ``[hidden, Hq * D]`` (out, in), so ``W_O^h`` (maps a head's D-vector
    to hidden) is ``weight[:, h*D:(h+1)*D]ᵀ``. Then ``‖v W_O^h‖² = vᵀ G_h v``.
    """
    w = o_proj_weight.float().reshape(o_proj_weight.shape[0], num_heads, -1)
    return torch.einsum("xhd,xhe->hde", w, w)


def value_proj_norm(gram, value_cache, block_table, seq_lens) -> torch.Tensor:
    """``‖v_t W_O^h‖₂ = sqrt(v_tᵀ G_h v_t)`` per query head and token ``[R, Hq, max_T]`` (0 past end)."""
    hq = gram.shape[0]
    bs, hkv = value_cache.shape[1], value_cache.shape[2]
    r_n = block_table.shape[0]
    out = torch.zeros(r_n, hq, block_table.shape[1] * bs, dtype=torch.float32, device=gram.device)
    for r in range(r_n):
        n = int(seq_lens[r])
        v = _gather(value_cache, block_table[r], n).float().repeat_interleave(hq // hkv, dim=1)
        sq = torch.einsum("thd,hde,the->ht", v, gram.float(), v)
        out[r, :, :n] = sq.clamp_min(0).sqrt()
    return out


def reshape_and_cache_flash(key, value, kv_cache, slot_mapping) -> None:
    """Torch twin of vLLM 0.32's GPU cache write (``reshape_and_cache_flash``, CUDA and Triton).

    Derived from ``triton_reshape_and_cache_flash.py`` and the backends' callers: the layer
    cache ``[nb, Hkv, bs, 2*D]`` is split ``kv_cache.transpose(1, 2).split(D, -1)`` into
    ``[nb, bs, Hkv, D]`` key/value views; token ``i`` goes to block ``slot // bs``, row
    ``slot % bs`` of both; a negative slot is padding and is skipped. Unquantised caches only.

    Args:
        key, value: ``[T, Hkv, D]`` new keys/values.
        kv_cache: one layer's cache, any ``KVCacheLayout`` stride order (written in place).
        slot_mapping: ``[T]`` int slots.
    """
    d = key.shape[-1]
    k_cache, v_cache = kv_cache.transpose(1, 2).split(d, dim=-1)
    bs = k_cache.shape[1]
    slots = slot_mapping.to(torch.long)
    ok = slots >= 0
    blocks, rows = slots[ok] // bs, slots[ok] % bs
    k_cache[blocks, rows] = key[ok].to(k_cache.dtype)
    v_cache[blocks, rows] = value[ok].to(v_cache.dtype)
