"""What the scheduler knows about one request's eviction: its config, its policy, its latest
block scores and what it has evicted so far.

One ``RequestEviction`` per running request with eviction on, created at ``add_request`` and
dropped at finish. It holds data only - the scores the workers measured and counters for the
request's report; which blocks it keeps and protects at a step comes from
:mod:`vllm_kvevict.adapter.budget`, worked out from the request's lengths at that step, never
carried over from an earlier step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vllm_kvevict.adapter.keywords import block_keywords
from vllm_kvevict.config import EvictionConfig, request_overrides
from vllm_kvevict.policies import get_policy
from vllm_kvevict.policies.base import EvictionPolicy


@dataclass
class RequestEviction:
    config: EvictionConfig
    policy: EvictionPolicy
    generation: int = 0  # bumps on preemption: late scores of an old generation are dropped
    #: the latest block scores from the workers: positions ascending, float32 values
    score_positions: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    score_values: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    #: the phase those scores were measured in ("prefill": a prompt chunk, "decode")
    score_phase: str = "decode"
    score_version: int = 0  # bumped by every set_scores (pool pressure's candidate cache key)
    decode_steps: int = 0  # decode steps since the last scoring
    evicted_tokens: int = 0  # released to the pool, cumulative (for reporting)
    visual_evicted_tokens: int = 0  # of those, multimodal embedding (image) tokens
    evicted_blocks: int = 0  # taken out of attention (parked or released), cumulative
    #: pool pressure's evictable blocks of this request: (key, (positions, scores, kept) | None)
    pressure_cache: tuple | None = None
    #: ``prefill_query="keywords"``: [nb] keyword score per prompt block (adapter/keywords.py)
    keywords: np.ndarray | None = None

    def set_scores(self, positions, values, phase: str = "decode") -> None:
        """Take the workers' ``positions`` / ``values`` (any order; the workers send them
        ascending), measured in ``phase``, as the latest scores."""
        pos = np.asarray(positions, dtype=np.int64)
        values = np.asarray(values, dtype=np.float32)
        if len(pos) > 1 and not (pos[1:] > pos[:-1]).all():
            order = np.argsort(pos, kind="stable")
            pos, values = pos[order], values[order]
        self.score_positions, self.score_values, self.score_phase = pos, values, phase
        self.score_version += 1

    def restart(self) -> None:
        """Preempted: the request recomputes from scratch, its old scores describe nothing."""
        self.generation += 1
        self.set_scores([], [])
        self.decode_steps = 0

    @property
    def scores(self) -> dict[int, float]:
        """``{position: score}`` view of the latest scores (reports, tests)."""
        return dict(zip(self.score_positions.tolist(), self.score_values.tolist()))

    def scores_at(self, positions: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """The latest scores at ``positions``.

        Args:
            positions: ``[nb]`` int64 positional block indices, ascending.
        Returns:
            ``([nb] bool has a score, or None when every block has one; [nb] float32 score,
            0 where unscored)``.
        """
        known = self.score_positions
        if not len(known):
            return np.zeros(len(positions), dtype=bool), np.zeros(len(positions), np.float32)
        if len(known) == len(positions) and known.tobytes() == positions.tobytes():
            return None, self.score_values  # the usual case: scores for exactly these blocks
        idx = np.minimum(np.searchsorted(known, positions), len(known) - 1)
        scored = known[idx] == positions
        return scored, np.where(scored, self.score_values[idx], 0.0).astype(np.float32)


def request_config(default: EvictionConfig, request) -> EvictionConfig:
    """The request's config: the server default with its ``extra_args.kv_eviction`` applied."""
    params = getattr(request, "sampling_params", None)
    overrides = request_overrides(getattr(params, "extra_args", None))
    return default if overrides is None else default.with_overrides(overrides)


def new_request_state(config: EvictionConfig, request, block_size: int) -> RequestEviction:
    """The state of a request admitted with eviction on (``config.enabled``)."""
    state = RequestEviction(config=config, policy=get_policy(config.policy, config.options))
    window = state.policy.schedule.window
    if (config.prefill_eviction and config.prefill_query == "keywords" and window
            and request.prompt_token_ids):
        state.keywords = block_keywords(request.prompt_token_ids, block_size, window)
    return state


def committed_tokens(request: Any) -> int:
    """Tokens computed and not in flight (an async step's tokens are scheduled, not done)."""
    return request.num_computed_tokens - getattr(request, "num_in_flight_tokens", 0)
