"""``laprox``: output-aware, layer-wise, model-wide ranking (LaProx, arXiv 2605.07234).

Why: attention weight alone ignores how much a token can change the output. A layer's output
is a sum of rank-1 terms, one per (head h, token j): ``A_h[:, j] ⊗ (v_j W_O^h)``. Dropping
token j drops its terms, so the norm of the term bounds the damage; column-row sampling gives
``s(l, h, j) = ‖A_W[:, j]‖₂ · ‖v_j W_O^h‖₂`` with ``A_W`` the observation-window attention.
Normalising each layer's scores to sum 1 makes them comparable across layers, so one
model-wide ranking replaces per-layer/per-head budgets.

Readings we had to choose (the paper's method section was not available to us):

* window 32 queries, average pooling kernel 7 [S]. Pooling smooths the attention factor
  ``‖A_W[:, j]‖₂`` along tokens (SnapKV's reason: attended phrases, not single tokens); the
  value factor is exact per token and is not pooled.
* GQA: ``group_reduce`` over the query heads sharing a KV head. ``sum`` (default) is the
  triangle-inequality bound on the removed group's term; ``mean`` ranks identically after
  the per-layer normalisation (equal group sizes); ``max`` is the single most affected head.
* blocks: a paged block holds its tokens for every layer and KV head, so the model-wide
  ranking over (layer, KV head, token) must become one score per block. ``block_reduce``:
  ``max`` (default) = the block's best entry; keeping the top-K blocks by it is exactly
  walking the global ranking and keeping each block at its first hit until K blocks are held,
  i.e. the paper's global top-K lifted to blocks. ``sum`` = the block's total normalised
  contribution over all layers (favours blocks that matter a little everywhere).
* the observation window is always kept (``protect_window``) [S].
* decode: the paper scores once after prefill; the ranking is stored in ``state`` and reused
  (``unscored`` fills blocks generated later). ``decode_refresh`` > 0 blends in a decode-time
  score; if the prefill was never scored, it is used alone. That score is the *attention factor
  only*: the attention pass measures each block's attention mass (summed over layers and the
  group's query heads), but the value factor ``‖v_j W_O^h‖₂`` is per token and head (a D x D
  form per token: tens of times the attention's own work if computed in the pass), so it is
  measured at prefill only. Blocks are ranked model-wide by their mass share per KV head
  (``block_reduce``: the best KV head, or the sum).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from vllm_kvevict.policies.base import (
    DECODE_ATTN,
    VALUE_PROJ_NORM,
    WINDOW_ATTN,
    RequestStatistics,
    register_policy,
)
from vllm_kvevict.policies.common import group_heads, pool_tokens
from vllm_kvevict.policies.scorer import ScorerConfig, ScorerPolicy


def laprox_token_scores(
    attn_norm: torch.Tensor,
    value_norm: torch.Tensor,
    num_kv_heads: int,
    pool_kernel: int,
    group_reduce: str,
) -> torch.Tensor:
    """``[L, Hq, T]`` attention column norms x projected-value norms -> ``[L, Hkv, T]``,
    each layer normalised to sum 1 (zero layers stay zero)."""
    s = pool_tokens(attn_norm, pool_kernel) * value_norm.float()
    s = group_heads(s, num_kv_heads, group_reduce, dim=1)
    return s / s.sum(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)


@register_policy
class LaProxPolicy(ScorerPolicy):
    name = "laprox"
    needs = frozenset({WINDOW_ATTN, VALUE_PROJ_NORM, DECODE_ATTN})

    class Config(ScorerConfig):
        group_reduce: Literal["sum", "mean", "max"] = Field(
            "sum", description="merge of the query heads of one KV group"
        )
        block_reduce: Literal["max", "sum"] = Field(
            "max", description="reduction over (layer, KV head, tokens of the block)"
        )

    @property
    def block_reduce(self) -> str:
        return self.config.block_reduce

    def token_scores(self, stats: RequestStatistics) -> torch.Tensor:
        received = stats.window_attn.float().norm(dim=2)  # ‖A_W[:, j]‖₂ over the window
        vnorm = stats.value_proj_norm
        if vnorm is None:  # engine could not provide it: attention factor alone
            vnorm = torch.ones_like(received)
        c = self.config
        return laprox_token_scores(received, vnorm, stats.num_kv_heads, c.pool_kernel,
                                   c.group_reduce)

    def merge_heads(self, blocks: torch.Tensor) -> torch.Tensor:
        # model-wide: the layers are already comparable (each sums to 1), no per-row share
        heads = tuple(range(blocks.dim() - 1))
        return blocks.amax(dim=heads) if self.block_reduce == "max" else blocks.sum(dim=heads)

    def decode_scores(self, stats: RequestStatistics) -> torch.Tensor:
        return stats.decode_mass / stats.decode_mass.sum().clamp_min(torch.finfo(torch.float32).tiny)
