"""The budget: for a request at a step, how many blocks it keeps and which it must keep.

One function, :func:`request_budget`, answers for every caller - the decision after scoring,
the check whether a prompt chunk leaves the request over budget, prefix-hit capping and pool
pressure - from the request's lengths at that step alone (nothing is carried from an earlier
step). :func:`keep_blocks_at` is its first half, for the over-budget checks that run for every
scored request at every step and need no protection bounds.

Readings we had to choose:

* **Sized for the prompt while the prompt is computed.** Between prompt chunks (prefill
  eviction) a request is brought back to its *prompt's* budget, not to the budget of the
  tokens computed so far: its peak (that budget + one chunk) is the same either way, and a
  middle chunk's queries cannot know the question at the prompt's end, so every block they
  need not rank away is one the question may still find. Measured on 1k-token pass-key
  prompts at 25 % (256-token chunks): 12 of 12 answered, 8 of 12 when each chunk evicted down
  to a quarter of what was computed. The sink and recent protection is sized the same way:
  sized for the few tokens computed so far it would shrink to nothing, and the first chunks
  would lose the attention sink for good.
* **Protection shrinks with the budget** (``EvictionConfig.protection``): the default sink
  and recent window would take a tight budget whole, leaving nothing to score.
* **Blocks not yet full or committed are always kept**: they are still being written.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from vllm_kvevict.config import EvictionConfig


class Budget(NamedTuple):
    """A request's budget at one step.

    ``keep_blocks``: blocks it may keep in attention. ``lo``, ``hi``: positional bounds of the
    protected blocks - positions below ``lo`` (the sink) and from ``hi`` on (the recent window
    and the blocks not yet full or committed) are always kept.
    """

    keep_blocks: int
    lo: int
    hi: int

    def protected(self, positions: np.ndarray, unscored: np.ndarray | None = None
                  ) -> np.ndarray:
        """``[nb]`` bool: the blocks at ``positions`` a decision must keep.

        Args:
            positions: ``[nb]`` int64 positional block indices.
            unscored: ``[nb]`` bool, blocks without a score (kept too); None: all scored.
        """
        return protected_by_bounds(positions, self.lo, self.hi, unscored)


def request_budget(config: EvictionConfig, committed: int, prompt_tokens: int,
                   block_size: int) -> Budget:
    """The budget of a request with ``committed`` tokens computed (and not in flight) of a
    ``prompt_tokens``-token prompt.

    Args:
        config: the request's eviction config.
        committed: tokens computed and not in flight.
        prompt_tokens: the prompt's length; while ``committed`` is below it (between prompt
            chunks) the budget is the whole prompt's.
        block_size: tokens per block.
    Returns:
        ``Budget(keep_blocks, lo, hi)``.
    """
    bs = block_size
    keep_blocks = keep_blocks_at(config, committed, prompt_tokens, bs)
    sink_blocks, recent_room = config.protection(keep_blocks, bs)
    recent_start = max(committed - config.recent_tokens, 0) // bs
    full_blocks = committed // bs
    if recent_room is not None:  # shrunk default: at most recent_room full recent blocks
        recent_start = max(recent_start, full_blocks - recent_room)
    return Budget(keep_blocks, sink_blocks, min(recent_start, full_blocks))


def keep_blocks_at(config: EvictionConfig, committed: int, prompt_tokens: int,
                   block_size: int) -> int:
    """``request_budget(...).keep_blocks`` alone: the check "is the request over budget?" that
    runs for every request scored at a step (most are not) skips the protection."""
    return config.keep_blocks(max(committed, prompt_tokens), block_size)


def protected_by_bounds(positions: np.ndarray, lo, hi, unscored: np.ndarray | None = None
                        ) -> np.ndarray:
    """The protection rule itself, for one request (``lo``, ``hi`` ints) or a padded batch
    (``[R, 1]`` columns against ``[R, W]`` positions): kept are positions below ``lo``, from
    ``hi`` on, and the ``unscored`` ones (None: every block has a score)."""
    protected = (positions < lo) | (positions >= hi)
    return protected if unscored is None else protected | unscored
