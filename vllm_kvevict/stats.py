"""Reference implementations (plain torch, CPU) of every statistic the policies consume.

These are the ground truth the Triton kernels in ``kernels/`` are tested against, and what the
worker calls when no kernel is available. Each function works on one layer of one request;
shapes use T tokens, W window queries, Hq query heads, Hkv KV heads, D head dim, nb blocks.

GQA: query head ``h`` reads KV head ``h // (Hq // Hkv)`` (the layout of HF and vLLM).
All results are float32 whatever the input dtype, so low-precision caches score stably.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kv_group_size(num_q_heads: int, num_kv_heads: int) -> int:
    """Query heads per KV head; raises if the head counts are not a GQA layout."""
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads do not split into {num_kv_heads} KV groups")
    return num_q_heads // num_kv_heads


def expand_kv(x: torch.Tensor, num_q_heads: int, dim: int) -> torch.Tensor:
    """Repeat each KV head of ``x`` along ``dim`` so that index ``h`` serves query head ``h``."""
    return x.repeat_interleave(kv_group_size(num_q_heads, x.shape[dim]), dim=dim)


def group_heads(x: torch.Tensor, num_kv_heads: int, reduce: str = "mean", dim: int = 0) -> torch.Tensor:
    """Reduce the query heads of each KV group: ``[.., Hq, ..] -> [.., Hkv, ..]`` along ``dim``.

    A KV head is stored (and evicted) once for its whole group, so per-query-head scores must
    be merged before they can rank its tokens.
    """
    dim = dim % x.dim()
    g = kv_group_size(x.shape[dim], num_kv_heads)
    grouped = x.reshape(*x.shape[:dim], num_kv_heads, g, *x.shape[dim + 1:])
    if reduce == "mean":
        return grouped.mean(dim + 1)
    if reduce == "sum":
        return grouped.sum(dim + 1)
    if reduce == "max":
        return grouped.amax(dim + 1)
    raise ValueError(f"reduce must be 'mean', 'sum' or 'max', got {reduce!r}")


def window_attention(
    q_window: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    causal_offset: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of the observation-window queries over all keys: ``[Hq, W, T]``.

    ``q_window`` [W, Hq, D] (RoPE applied), ``keys`` [T, Hkv, D]. Window query ``i`` sits at
    token position ``T - W + i`` by default, at ``causal_offset + i`` if an int is given, or at
    ``causal_offset[i]`` for a [W] tensor; it sees keys at positions ``<=`` its own only, exactly
    as in the prefill forward pass.
    """
    w, hq, _ = q_window.shape
    t = keys.shape[0]
    if causal_offset is None:
        if w > t:
            raise ValueError(f"window of {w} queries is longer than the {t} keys")
        causal_offset = t - w
    if isinstance(causal_offset, int):
        pos = torch.arange(w, device=keys.device) + causal_offset
    else:
        pos = causal_offset.to(keys.device)
    k = expand_kv(keys.float(), hq, dim=1)
    logits = torch.einsum("whd,thd->hwt", q_window.float(), k) * scale
    future = torch.arange(t, device=keys.device)[None, :] > pos[:, None]  # [W, T]
    logits = logits.masked_fill(future, float("-inf"))
    return torch.softmax(logits, dim=-1)


def decode_attention(
    q: torch.Tensor, keys: torch.Tensor, scale: float, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax attention of the newest query ``q`` [Hq, D] over ``keys`` [T, Hkv, D]: ``[Hq, T]``.

    ``exclude`` [T] bool drops tokens from the softmax (e.g. parked blocks, as the real decode
    pass sees them); leave it ``None`` to score parked tokens as if they were attended, which
    is what lets a parked block win its way back.
    """
    k = expand_kv(keys.float(), q.shape[0], dim=1)
    logits = torch.einsum("hd,thd->ht", q.float(), k) * scale
    if exclude is not None:
        logits = logits.masked_fill(exclude[None, :], float("-inf"))
    return torch.softmax(logits, dim=-1)


def wo_gram(o_proj_weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Per-head Gram matrices ``G_h = W_O^h W_O^hᵀ`` [Hq, D, D] of the output projection.

    ``o_proj_weight`` is in torch Linear layout [hidden, Hq*D], so head ``h``'s slice
    ``W_O^h`` (D x hidden) is the transpose of columns ``h*D:(h+1)*D``. Computed once at load
    time, it turns ``‖v W_O^h‖₂`` into a D x D quadratic form instead of a D x hidden product.
    """
    hidden, width = o_proj_weight.shape
    if width % num_heads:
        raise ValueError(f"o_proj input width {width} is not divisible by {num_heads} heads")
    w = o_proj_weight.float().reshape(hidden, num_heads, width // num_heads)
    return torch.einsum("xhd,xhe->hde", w, w)


def value_proj_norm(values: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``‖v_t W_O^h‖₂ = sqrt(v_tᵀ G_h v_t)`` for every query head and token: ``[Hq, T]``.

    ``values`` [T, Hkv, D], ``gram`` [Hq, D, D] from :func:`wo_gram`. This is how much a token's
    value can move the layer output through head ``h`` (LaProx's output-aware factor).
    """
    v = expand_kv(values.float(), gram.shape[0], dim=1)  # [T, Hq, D]
    quad = torch.einsum("thd,hde,the->ht", v, gram.float(), v)
    return quad.clamp_min(0).sqrt()


def key_bounds(keys: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block elementwise min and max of the keys, each ``[Hkv, nb, D]``.

    A partial last block is bounded by its real tokens only. These are Quest's page metadata:
    with them an upper bound on ``q·k`` for every key of a block costs one pass over D.
    """
    t, hkv, d = keys.shape
    nb = -(-t // block_size)
    pad = nb * block_size - t
    k = keys.float()
    kmin = F.pad(k, (0, 0, 0, 0, 0, pad), value=float("inf")).reshape(nb, block_size, hkv, d)
    kmax = F.pad(k, (0, 0, 0, 0, 0, pad), value=float("-inf")).reshape(nb, block_size, hkv, d)
    return kmin.amin(1).permute(1, 0, 2), kmax.amax(1).permute(1, 0, 2)


def quest_block_bounds(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Quest upper bound on ``q·k`` over each block: ``Σ_d max(q_d·min_d, q_d·max_d)``, [Hq, nb].

    ``q`` [Hq, D]; ``kmin``/``kmax`` [Hkv, nb, D] from :func:`key_bounds`. The bound is exact
    for a one-token block and never below the best real key of the block. Leading dims (e.g.
    layers: ``q`` [L, Hq, D], bounds [L, Hkv, nb, D] -> [L, Hq, nb]) are batched.
    """
    lo = expand_kv(kmin.float(), q.shape[-2], dim=-3)  # [..., Hq, nb, D]
    hi = expand_kv(kmax.float(), q.shape[-2], dim=-3)
    qf = q.float()[..., :, None, :]
    return torch.maximum(qf * lo, qf * hi).sum(-1)


def pool_tokens(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """Average-pool ``[..., T]`` along tokens with an odd ``kernel``, keeping length ``T``.

    SnapKV's smoothing: a token next to an attended token is likely part of the same phrase, so
    scores are spread over a neighbourhood. Edges are zero-padded and divided by ``kernel``, as in
    the SnapKV reference code (kvpress does the same), so end tokens are slightly damped.
    """
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"pooling kernel must be odd and >= 1, got {kernel}")
    if kernel == 1:
        return x.float()
    *lead, t = x.shape
    flat = x.float().reshape(-1, 1, t)
    pooled = F.avg_pool1d(flat, kernel_size=kernel, stride=1, padding=kernel // 2)
    return pooled.reshape(*lead, t)
