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

from vllm_kvevict.policies.base import DECODE_ATTN, WINDOW_ATTN, RequestStatistics, register_policy
from vllm_kvevict.policies.common import group_heads, pool_tokens
from vllm_kvevict.policies.scorer import ScorerConfig, ScorerPolicy


@register_policy
class SnapKVPolicy(ScorerPolicy):
    name = "snapkv"
    needs = frozenset({WINDOW_ATTN, DECODE_ATTN})

    class Config(ScorerConfig):
        head_reduce: Literal["mean", "max"] = Field(
            "max", description="merge of per-(layer, KV head) block scores"
        )

    def token_scores(self, stats: RequestStatistics) -> torch.Tensor:
        received = stats.window_attn.sum(2)  # [L, Hq, T]: Σ over the window queries
        pooled = pool_tokens(received, self.config.pool_kernel)
        return group_heads(pooled, stats.num_kv_heads, "mean", dim=1)  # [L, Hkv, T]
