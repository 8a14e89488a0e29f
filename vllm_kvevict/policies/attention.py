"""``attention``: the engine's built-in scorer — attention mass of the newest query per block.

Score of block b = mean over layers and query heads of the softmax probability the newest
decode query puts on b's tokens (sum over the block's tokens): the block statistic the
attention pass measures, normalised. It needs nothing but decode attention, which makes it the
reference the engine mechanism is tested with.
"""

from __future__ import annotations

from typing import Any

import torch

from vllm_kvevict.policies.base import (
    DECODE_ATTN,
    EvictionPolicy,
    RequestStatistics,
    normalize_mass,
    register_policy,
)


@register_policy
class AttentionMassPolicy(EvictionPolicy):
    name = "attention"
    needs = frozenset({DECODE_ATTN})

    def block_scores(self, stats: RequestStatistics, state: dict[str, Any]) -> torch.Tensor:
        assert stats.decode_mass is not None
        return normalize_mass(stats.decode_mass.sum(0))  # Σ over layers and query heads
