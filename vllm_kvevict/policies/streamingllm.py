"""``streamingllm``: attention sinks plus the most recent blocks (StreamingLLM, arXiv 2309.17453).

Why: the first tokens soak up attention mass whatever their content ("attention sinks"); keep
them and a recent window, drop the middle, and the model stays fluent on unbounded streams. The
score is positional only, so the method needs no statistics: the first ``sink_blocks`` blocks
score highest, every other block by recency, and a top-K selection keeps sinks + most recent.

Readings: the paper keeps 4 sink *tokens*; a paged engine frees whole blocks, so sinks are whole
blocks here (the engine's ``sink_tokens`` protection also rounds up to blocks). Positions are not
re-assigned after eviction (no RoPE re-rotation): kept tokens keep their original positions.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from vllm_kvevict.policies.base import (
    EvictionPolicy,
    PolicyConfig,
    RequestStatistics,
    normalize_mass,
    register_policy,
)
from vllm_kvevict.policies.common import recency


@register_policy
class StreamingLLMPolicy(EvictionPolicy):
    name = "streamingllm"

    class Config(PolicyConfig):
        sink_blocks: int = Field(
            1, ge=0,
            description="first blocks (by position) always ranked above all others; 1 block "
            "covers the paper's 4 sink tokens for any block size >= 4",
        )

    def block_scores(self, stats: RequestStatistics, state: dict[str, Any]) -> torch.Tensor:
        scores = recency(stats.block_index)
        sinks = stats.block_index < self.config.sink_blocks
        return normalize_mass(scores.masked_fill(sinks, float(stats.num_blocks + 1)))
