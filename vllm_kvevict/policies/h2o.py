"""``h2o``: keep the heavy hitters — tokens that have received the most attention (arXiv 2306.14048).

Why: attention is sparse and a small set of tokens collects most of it throughout generation;
the attention a token has accumulated so far predicts the attention it will get. Score of a
block = attention its tokens received, summed over every scored query so far, per (layer, KV
head), then merged over layers/heads. The accumulation lives in ``state`` under positional block
indices, so it survives blocks being released around it.

Readings we had to choose:

* initial accumulation: H2O sums the attention of *all* prompt queries; an engine only
  recomputes the observation window, so the last ``window`` prompt queries stand in for them.
* steps: H2O adds every decode query. The policy asks to be scored every decode step
  (``schedule.every_step``); if the engine scores less often, only the scored steps accumulate.
* GQA: mean over the group; one block serves all heads, so per-head heavy-hitter sets become
  ``head_reduce`` (``mean`` share of accumulated mass, or ``max`` over KV heads).
* layers: the accumulation is per KV head with the layers averaged. At decode the attention
  pass measures block statistics already summed over layers (``RequestStatistics.decode_mass``:
  no per-layer rows are kept on the device), so the prefill window's contribution is averaged
  over layers too; with ``mean`` this equals the per-(layer, head) mean while every head's
  rows have equal totals (no block released yet).
* no decay: H2O's plain sum (older tokens have been seen by more queries; the engine's recent
  protection is what keeps young tokens alive, as H2O's recent window does).
* parked blocks accumulate whatever the engine reports for them (0 if it excludes them).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from vllm_kvevict.policies.base import (
    DECODE_ATTN,
    WINDOW_ATTN,
    EvictionPolicy,
    RequestStatistics,
    Schedule,
    WindowConfig,
    normalize_mass,
    register_policy,
    tokens_to_blocks,
)
from vllm_kvevict.policies.common import (
    accumulate_blocks,
    group_heads,
    head_mix,
    recency,
    window_received,
)


@register_policy
class H2OPolicy(EvictionPolicy):
    name = "h2o"
    needs = frozenset({WINDOW_ATTN, DECODE_ATTN})
    schedule = Schedule(every_step=True)

    class Config(WindowConfig):
        head_reduce: Literal["mean", "max"] = Field(
            "mean", description="merge of per-(layer, KV head) accumulated block scores"
        )

    def block_scores(self, stats: RequestStatistics, state: dict[str, Any]) -> torch.Tensor:
        received = window_received(stats)  # [L, Hq, T] at prefill
        step = stats.decode_share  # [Hkv, nb] at decode
        if received is not None:
            per_kv = group_heads(received, stats.num_kv_heads, "mean", dim=1)
            step = tokens_to_blocks(per_kv, stats.block_size, stats.num_blocks).mean(0)
        acc = accumulate_blocks(state, "h2o", stats.block_index, step,
                                limit=stats.position_limit)
        if acc is None:
            return normalize_mass(recency(stats.block_index))
        return normalize_mass(head_mix(acc.nan_to_num(0.0), self.config.head_reduce))
