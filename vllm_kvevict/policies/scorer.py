"""``ScorerPolicy``: the base that owns a scoring method's shared tail, so a method writes its
score and nothing else.

A method that ranks the prompt by what its observation window attends to (SnapKV, LaProx)
only differs in one place: how a token's score comes out of the window's attention. The rest
is the same for all of them, and lives here:

1. token scores ``[L, Hkv, T]`` → block scores ``[L, Hkv, nb]`` (``block_reduce`` over the
   block's tokens: a paged engine frees whole blocks);
2. head merge → ``[nb]`` (``merge_heads``; by default :func:`head_mix` with the method's
   ``head_reduce``: every (layer, KV head) row normalised, then ``max`` or ``mean``);
3. the observation window's blocks ranked first (``protect_window``: window tokens are seen
   only by the window queries after them);
4. normalisation and memory across steps (:func:`carry_scores`): the prefill ranking is kept
   in the request's ``state`` and reused at decode (the papers compress once), blended with
   the newest query's block attention by ``decode_refresh``.

A method overrides ``token_scores`` (and, where its merge is not a head mix, ``merge_heads`` or
``decode_scores``). Methods with their own memory (H2O's accumulation, HAE, HybridKV) derive
from :class:`EvictionPolicy` directly.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from vllm_kvevict.policies.base import (
    EvictionPolicy,
    RequestStatistics,
    WindowConfig,
    tokens_to_blocks,
)
from vllm_kvevict.policies.common import (
    Fraction,
    PoolKernel,
    carry_scores,
    head_mix,
    window_blocks,
)


class ScorerConfig(WindowConfig):
    """Options of every :class:`ScorerPolicy`."""

    pool_kernel: PoolKernel = Field(
        7, description="average pooling of the received attention along tokens (odd; 1 = none)"
    )
    protect_window: bool = Field(True, description="observation-window blocks score highest")
    decode_refresh: Fraction = Field(
        0.0,
        description="weight of the decode-time score blended into the stored score at each "
        "decode scoring; 0 = the paper (prefill only)",
    )
    unscored: Literal["max", "mean"] = Field(
        "max", description="score of blocks generated after the prefill scoring (refresh 0)"
    )


class ScorerPolicy(EvictionPolicy):
    """Base of the methods that score tokens from the prefill's observation window and carry
    that ranking through decoding (see the module docstring for the tail it owns)."""

    Config = ScorerConfig
    #: how a block's token scores combine (``"sum"`` or ``"max"``); a method may read it from
    #: an option by overriding the property
    block_reduce: str = "sum"

    def token_scores(self, stats: RequestStatistics) -> torch.Tensor:
        """The method's score of every resident token, at prefill.

        Args:
            stats: the request's statistics; ``window_attn`` ``[L, Hq, W, T]`` is set.
        Returns:
            ``[L, Hkv, T]`` float32 non-negative token scores.
        """
        raise NotImplementedError

    def merge_heads(self, blocks: torch.Tensor) -> torch.Tensor:
        """``[..., nb]`` per-(layer, KV head) block scores → ``[nb]``."""
        return head_mix(blocks, self.config.head_reduce)

    def decode_scores(self, stats: RequestStatistics) -> torch.Tensor:
        """``[Hkv, nb]`` the newest query's block statistics that ``decode_refresh`` blends in
        (and that stand alone when the prefill was never scored): by default its attention
        share per KV head."""
        return stats.decode_share

    def block_scores(self, stats: RequestStatistics, state: dict[str, Any]) -> torch.Tensor:
        prefill = decode = None
        if stats.phase == "prefill" and stats.window_attn is not None:
            tokens = self.token_scores(stats)
            blocks = tokens_to_blocks(tokens, stats.block_size, stats.num_blocks,
                                      self.block_reduce)
            prefill = self.merge_heads(blocks)
            if self.config.protect_window:
                w = stats.window_attn.shape[2]
                win = window_blocks(stats.num_tokens, w, stats.block_size, stats.num_blocks,
                                    device=stats.block_index.device)
                prefill = torch.where(win, prefill.max(), prefill)
        elif stats.decode_mass is not None:
            decode = self.merge_heads(self.decode_scores(stats))
        return carry_scores(
            state, self.name, stats.block_index, prefill=prefill, decode=decode,
            refresh=self.config.decode_refresh, unscored=self.config.unscored,
            limit=stats.position_limit,
        )
