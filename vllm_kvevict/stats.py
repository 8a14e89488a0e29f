"""Torch helpers the policies share: merging query heads into KV groups, token pooling.

The statistics themselves (window/decode attention, ‖v W_O‖, key bounds, Quest bounds) are
defined once, in ``vllm_kvevict.kernels.reference`` beside the Triton kernels they check.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_kvevict.kernels.reference import kv_group_size


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
