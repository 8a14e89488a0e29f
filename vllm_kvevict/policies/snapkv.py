"""``snapkv``: keep what the end of the prompt attends to (SnapKV, arXiv 2404.14469).

Why: the last prompt queries (the "observation window", usually the question) already attend
to the context the answer will need, and that pattern is stable through generation. Score of a
token = attention it receives from the window queries, summed over the window, smoothed by
average pooling (neighbours of an attended token belong to the same phrase), averaged over the
query heads of its KV group; then summed over the block's tokens and merged over layers/heads.

Readings we had to choose (all options):

* window / pooling: the paper's 32 queries and kernel 7 (kvpress uses 64 and 5); the same as
  LaProx's defaults, so both cost the engine the same prefill recomputation.
* GQA: mean over the group (SnapKV issue #22, kvpress). Sum would rank identically here
  because each KV head's row is normalised before merging.
* one block serves every layer and head, so per-head top-k becomes ``head_reduce``: ``max``
  (the head that needs the block most, default) or ``mean`` (share of attention mass). The
  mean lets the many local/sink heads outvote the few that retrieve: on ordinary text
  (benchmarks/results/natural.md, 12 prompts of 1.5k tokens) it kept the answer's block 2 of
  12 times at a 10 % budget and retrieved 1/12, max 9/12 (5 %: 0/12 vs 6/12), with no loss on
  the templated tasks (5/12 both at 10 %).
* the observation window is always kept (``protect_window``), as in SnapKV: its blocks get the
  top score, since window tokens can only be seen by the window queries after them.
* decode: the paper compresses once after prefill; the prefill scores are kept in ``state``
  and reused. Blocks generated later get the ``unscored`` fill (``max``: generated text is not
  SnapKV's subject and is kept over the prompt). ``decode_refresh`` > 0 blends in the newest
  query's attention. If the prefill was never scored, decode attention is used alone. At
  decode the attention pass gives block statistics only (per KV head, summed over layers and
  the group's query heads), so the newest query's ranking is ``head_reduce`` over KV heads of
  that share, unpooled (a block already sums its neighbouring tokens).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from vllm_kvevict.policies.base import (
    DECODE_ATTN,
    WINDOW_ATTN,
    RequestStats,
    register_policy,
    tokens_to_blocks,
)
from vllm_kvevict.policies.common import WindowRankedConfig, WindowRankedPolicy, head_mix
from vllm_kvevict.stats import group_heads, pool_tokens


@register_policy
class SnapKVPolicy(WindowRankedPolicy):
    name = "snapkv"
    needs = frozenset({WINDOW_ATTN, DECODE_ATTN})

    class Config(WindowRankedConfig):
        head_reduce: Literal["mean", "max"] = Field(
            "max", description="merge of per-(layer, KV head) block scores"
        )

    def received(self, window_attn: torch.Tensor) -> torch.Tensor:
        return window_attn.sum(2)  # Σ over the window queries

    def rank(self, received: torch.Tensor, stats: RequestStats) -> torch.Tensor:
        pooled = pool_tokens(received, self.config.pool_kernel)
        per_kv = group_heads(pooled, stats.num_kv_heads, "mean", dim=1)
        blocks = tokens_to_blocks(per_kv, stats.block_size, stats.num_blocks)
        return head_mix(blocks, self.config.head_reduce)

    def rank_decode(self, stats: RequestStats) -> torch.Tensor:
        return head_mix(stats.decode_share, self.config.head_reduce)
