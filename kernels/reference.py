"""The torch references: the one definition of every statistic the policies consume.

Two layers, one formula each. *Dense* references (``dense_*``, ``wo_gram``,
``quest_block_bounds``) work on one request and one layer: contiguous keys/values
``[T, Hkv, D]``, query heads ``Hq`` (GQA: query head ``h`` reads KV head ``h // (Hq / Hkv)``),
float32 results whatever the input dtype. *Paged* references (``fused_decode_attention``,
``window_attention``, ``key_bounds``, ``quest_scores``, ``value_proj_norm``) take the paged
layout the Triton kernels take — caches as logical ``[num_blocks, block_size, Hkv, D]`` views
(:class:`~.paged.PagedKV` makes them for every vLLM layout), a ``block_table`` whose rows hold
only a request's real blocks (the compacted row) and ``seq_lens`` its compacted length — gather
each request's blocks and apply the dense reference. Token axes have length
``max_blocks * block_size`` so the GPU path never needs a host sync to size them. The paged
references are what each Triton kernel is tested against, and the serving path where Triton
cannot run (vLLM's CPU backend). Queries are scaled before the product, as in the kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .paged import WindowStats, _gather


# -- dense: one request, one layer --------------------------------------------------------------
def kv_group_size(num_q_heads: int, num_kv_heads: int) -> int:
    """Query heads per KV head; raises if the head counts are not a GQA layout."""
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads do not split into {num_kv_heads} KV groups")
    return num_q_heads // num_kv_heads


def expand_kv(x: torch.Tensor, num_q_heads: int, dim: int) -> torch.Tensor:
    """Repeat each KV head of ``x`` along ``dim`` so that index ``h`` serves query head ``h``."""
    return x.repeat_interleave(kv_group_size(num_q_heads, x.shape[dim]), dim=dim)


def dense_window_attention(q_window: torch.Tensor, keys: torch.Tensor, scale: float,
                           causal_offset: int | torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of the observation-window queries over all keys: ``[Hq, W, T]``.

    Args:
        q_window: ``[W, Hq, D]`` (RoPE applied).
        keys: ``[T, Hkv, D]``.
        causal_offset: window query ``i`` sits at position ``T - W + i`` (None), at
            ``causal_offset + i`` (int) or at ``causal_offset[i]`` (``[W]`` tensor).
    Returns:
        ``[Hq, W, T]`` float32; query ``i`` sees keys at positions ``<=`` its own only, as in
        the prefill pass; a query before the first key (negative position) gets a zero row.
    """
    w, hq, _ = q_window.shape
    t = keys.shape[0]
    if causal_offset is None:
        causal_offset = t - w
    if isinstance(causal_offset, int):
        pos = torch.arange(w, device=keys.device) + causal_offset
    else:
        pos = causal_offset.to(keys.device)
    k = expand_kv(keys.float(), hq, dim=1)
    logits = torch.einsum("whd,thd->hwt", q_window.float() * scale, k)
    visible = torch.arange(t, device=keys.device)[None, :] <= pos[:, None]  # [W, T]
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.where(visible, probs, 0.0)  # all-masked rows: nan -> 0


def dense_decode_attention(q: torch.Tensor, keys: torch.Tensor, scale: float,
                           exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of the newest query over the keys: ``[Hq, T]`` float32.

    Args:
        q: ``[Hq, D]``; keys: ``[T, Hkv, D]``.
        exclude: ``[T]`` bool, tokens dropped from the softmax (e.g. parked blocks, as the
            real decode pass sees them); None scores parked tokens as if attended, which is
            what lets a parked block win its way back.
    """
    k = expand_kv(keys.float(), q.shape[0], dim=1)
    logits = torch.einsum("hd,thd->ht", q.float() * scale, k)
    if exclude is not None:
        logits = logits.masked_fill(exclude[None, :], float("-inf"))
    return torch.softmax(logits, dim=-1)


def wo_gram(o_proj_weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Per-head Gram matrices ``G_h = W_O^h W_O^hᵀ`` ``[Hq, D, D]`` from ``o_proj.weight``.

    ``o_proj.weight`` is ``[hidden, Hq * D]`` (torch Linear: out, in), so ``W_O^h`` (a head's
    D-vector to hidden) is ``weight[:, h*D:(h+1)*D]ᵀ``; then ``‖v W_O^h‖² = vᵀ G_h v``, a D x D
    quadratic form instead of a D x hidden product. Computed once per layer.
    """
    hidden, width = o_proj_weight.shape
    if width % num_heads:
        raise ValueError(f"o_proj input width {width} is not divisible by {num_heads} heads")
    w = o_proj_weight.float().reshape(hidden, num_heads, width // num_heads)
    return torch.einsum("xhd,xhe->hde", w, w)


def dense_value_proj_norm(values: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``‖v_t W_O^h‖₂ = sqrt(v_tᵀ G_h v_t)`` per query head and token: ``[Hq, T]``.

    ``values`` ``[T, Hkv, D]``, ``gram`` from :func:`wo_gram`: how much a token's value can move
    the layer output through head ``h`` (LaProx's output-aware factor).
    """
    v = expand_kv(values.float(), gram.shape[0], dim=1)  # [T, Hq, D]
    return torch.einsum("thd,hde,the->ht", v, gram.float(), v).clamp_min(0).sqrt()


def dense_key_bounds(keys: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block elementwise min and max of the keys ``[T, Hkv, D]``, each ``[Hkv, nb, D]``
    float32 (Quest's page metadata); a partial last block is bounded by its real tokens."""
    t, hkv, d = keys.shape
    nb = -(-t // block_size)
    tiles = F.pad(keys.float(), (0, 0, 0, 0, 0, nb * block_size - t)).reshape(nb, block_size, hkv, d)
    counts = (t - torch.arange(nb, device=keys.device) * block_size).clamp(max=block_size)
    kmin, kmax = block_key_bounds(tiles, torch.arange(nb, device=keys.device), counts)
    return kmin.permute(1, 0, 2), kmax.permute(1, 0, 2)


def quest_block_bounds(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Quest upper bound on ``q·k`` over each block: ``Σ_d max(q_d·min_d, q_d·max_d)``.

    ``q`` ``[..., Hq, D]``, bounds ``[..., Hkv, nb, D]`` -> ``[..., Hq, nb]`` (leading dims such as
    layers or requests are batched). Exact for a one-token block, never below the best real
    key of the block.
    """
    lo = expand_kv(kmin.float(), q.shape[-2], dim=-3)  # [..., Hq, nb, D]
    hi = expand_kv(kmax.float(), q.shape[-2], dim=-3)
    qf = q.float()[..., :, None, :]
    return torch.maximum(qf * lo, qf * hi).sum(-1)


# -- paged: the kernels' inputs -----------------------------------------------------------------
def _per_block(values: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[R, H, max_blocks * bs]`` token values -> ``[R, max_blocks, H]`` block sums."""
    r, h, t = values.shape
    return values.view(r, h, t // block_size, block_size).sum(-1).transpose(1, 2).contiguous()


def dense_block_attention(q: torch.Tensor, keys: torch.Tensor, block_size: int, scale: float,
                          parked: torch.Tensor | None = None) -> torch.Tensor:
    """The attention each block of one row received from the newest query: ``[Hq, nb + np]``.

    ``keys`` ``[T, Hkv, D]`` are the attended tokens in blocks of ``block_size`` (the last may
    be partial), ``parked`` ``[np * block_size, Hkv, D]`` the tokens of full blocks held out of
    attention (recycle bin). Attended blocks get their softmax mass; a parked block gets
    ``Σ exp(s - m) / den`` with the attended max ``m`` and denominator ``den`` — the mass it
    would get relative to what is attended — its exponent capped at ``MAX_EXPONENT`` (60), as
    the fused kernel measures it. float32.
    """
    hq = q.shape[0]
    t = keys.shape[0]
    qs = q.float() * scale
    logits = torch.einsum("hd,thd->ht", qs, expand_kv(keys.float(), hq, dim=1))
    m = logits.amax(-1, keepdim=True)
    den = torch.exp(logits - m).sum(-1, keepdim=True)
    nb = -(-t // block_size)
    out = F.pad(torch.exp(logits - m) / den, (0, nb * block_size - t)).view(hq, nb, block_size).sum(-1)
    if parked is None or parked.shape[0] == 0:
        return out
    lp = torch.einsum("hd,thd->ht", qs, expand_kv(parked.float(), hq, dim=1))
    pp = torch.exp((lp - m).clamp(max=60.0)) / den
    return torch.cat([out, pp.view(hq, -1, block_size).sum(-1)], dim=1)


def fused_decode_attention(query, key_cache, value_cache, block_table, seq_lens, scale,
                           slot=None, park_ids=None, park_start=None, num_slots=0, nb_stats=0):
    """The twin of ``fused_decode.py`` for one layer: ``(out [R, Hq, D], mass, peak)``.

    ``mass``/``peak`` ``[num_slots, Hkv, nb_stats]`` float32 start at 0: a scored row's slot
    gets, per KV head, the Σ and the max over the group's query heads of
    :func:`dense_block_attention`, attended blocks first (row order), then its parked blocks.
    """
    r_n, hq, d = query.shape
    bs, hkv = key_cache.shape[1], key_cache.shape[2]
    out = torch.zeros(r_n, hq, d, dtype=torch.float32, device=query.device)
    mass = torch.zeros(num_slots, hkv, nb_stats, dtype=torch.float32, device=query.device)
    peak = torch.zeros_like(mass)
    for r in range(r_n):
        n = int(seq_lens[r])
        if n == 0:
            continue
        k, v = _gather(key_cache, block_table[r], n), _gather(value_cache, block_table[r], n)
        p = dense_decode_attention(query[r], k, scale)
        out[r] = torch.einsum("ht,thd->hd", p, expand_kv(v.float(), hq, dim=1))
        s = -1 if slot is None else int(slot[r])
        if s < 0:
            continue
        first, end = int(park_start[s]), int(park_start[s + 1])
        parked = _gather(key_cache, park_ids[first:end], (end - first) * bs) if end > first else None
        blocks = dense_block_attention(query[r], k, bs, scale, parked).view(hkv, hq // hkv, -1)
        mass[s, :, : blocks.shape[2]] = blocks.sum(1)
        peak[s, :, : blocks.shape[2]] = blocks.amax(1)
    return out.to(query.dtype), mass, peak


def window_attention(q_window, key_cache, block_table, seq_lens, scale=None,
                     window_lens=None, causal=True) -> WindowStats:
    """softmax(q·Kᵀ) of the last W queries ``[R, Hq, W, D]``; window query i sits at position
    ``seq_len - W + i`` and sees tokens ``t <=`` it (``causal=False``: every token). Row r's
    window is its last ``window_lens[r]`` queries (default W); rows outside it or before the
    prompt start (``seq_len < W``, causal) are all zero."""
    r_n, hq, w, d = q_window.shape
    bs = key_cache.shape[1]
    scale = d**-0.5 if scale is None else scale
    probs = torch.zeros(r_n, hq, w, block_table.shape[1] * bs, dtype=torch.float32,
                        device=q_window.device)
    for r in range(r_n):
        n = int(seq_lens[r])
        w_r = w if window_lens is None else int(window_lens[r])
        if n and w_r:
            k = _gather(key_cache, block_table[r], n)
            probs[r, :, w - w_r:, :n] = dense_window_attention(
                q_window[r, :, w - w_r:].transpose(0, 1), k, scale, n - w_r if causal else n)
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
    """Quest upper bound of every block ``[R, Hq, max_blocks]`` (:func:`quest_block_bounds`);
    ``key_min/max`` are ``[R, max_blocks, Hkv, D]``; blocks ``b >= num_blocks[r]`` score -inf."""
    score = quest_block_bounds(query, key_min.transpose(1, 2), key_max.transpose(1, 2))
    live = torch.arange(key_min.shape[1], device=query.device)[None, :] < num_blocks.to(query.device)[:, None]
    return torch.where(live[:, None, :], score, float("-inf"))


def value_proj_norm(gram, value_cache, block_table, seq_lens) -> torch.Tensor:
    """``‖v_t W_O^h‖₂`` per query head and token ``[R, Hq, max_T]`` (0 past each end)."""
    bs, r_n = value_cache.shape[1], block_table.shape[0]
    out = torch.zeros(r_n, gram.shape[0], block_table.shape[1] * bs, dtype=torch.float32,
                      device=gram.device)
    for r in range(r_n):
        n = int(seq_lens[r])
        out[r, :, :n] = dense_value_proj_norm(_gather(value_cache, block_table[r], n), gram)
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
