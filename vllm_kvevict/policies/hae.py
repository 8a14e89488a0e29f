"""``hae``: Hierarchical Adaptive Eviction for multimodal requests (arXiv 2602.02197).

Why: visual tokens are many and mostly ignored by the text, while text tokens carry the task.
At prefill, HAE drops visual tokens that the text hardly attends to, judged once at the first
layer and applied to every layer ("index broadcasting": important tokens overlap 80-90% across
layers). During decoding, eviction candidates go to a bounded recycle bin before they are
released, so a mistaken eviction can be undone, and visual tokens leave before text tokens.

Readings we had to choose (the paper has no public code; where it does not say, we chose):

* dual-attention pruning (MustDrop's filter, whose thresholds HAE reuses): ``A`` = softmax
  attention from the *text* queries of the observation window (the last ``window`` prompt
  queries that are not visual) to the visual keys, averaged over heads (and over layers if
  ``layers="all"``); probabilities stay normalised over all keys. ``g_j = Σ_t A[t, j]``
  (global), ``m_j = max_t A[t, j]`` (individual). Visual token j is prunable iff
  ``g_j < global_threshold · Σ_k g_k`` AND ``m_j < individual_threshold``: it is neither
  important on average nor to any single text query. Defaults 0.001 (paper tests 0.001-0.0015).
* paged blocks: a block is pruned at prefill only if *all* its tokens are prunable visual
  tokens; any text token protects its block. Pruned blocks score exactly 0, which ``select``
  reads as "release now" (scores are all that reach the scheduler). Pruning is threshold-driven,
  so the policy asks the engine to run ``select`` after prefill even within budget.
* decode score ("dynamically reweighted attention"): attention mass per block and (layer,
  head), merged by ``head_reduce`` (``max`` by default: one block serves every layer and head,
  and on ordinary text the mean let the many local/sink heads outvote the few retrieving ones,
  benchmarks/results/natural.md), accumulated with the past down-weighted by ``decay`` at each scoring
  (``decay=1``: H2O's plain sum; ``0``: the latest query only). The prefill window's attention
  seeds it. Text and visual blocks share this score; ``visual_first`` makes ``select`` move
  every all-image block out (bin, then release) before any block holding text, and a mixed
  block (image tokens and text, e.g. a short note between two images: a paged block is not
  aligned to the image) before any text-only block. A mixed block was text before: then the
  visual-first stage ordered only the all-image blocks, which every policy already drops
  first when image tokens draw little attention (benchmarks/results/multimodal.md).
* parked blocks (recycle bin) are out of attention, but the decode pass scores them from
  their keys: a parked block's step score is the mass it would get relative to the attended
  tokens, so a block the newest queries turn to again competes its way back.
* text-only requests (``visual`` None or all False): no prefill pruning; decode eviction is the
  decayed attention score with the recycle bin — HAE's decode half alone. Never an error.
* the prompt ending with visual tokens (no text query in the window): no prefill pruning.
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
    Fraction,
    accumulate_blocks,
    recency,
    window_received,
)
from vllm_kvevict.policies.selection import LIVE_FLOOR


@register_policy
class HAEPolicy(EvictionPolicy):
    name = "hae"
    needs = frozenset({WINDOW_ATTN, DECODE_ATTN})
    schedule = Schedule(select_after_prefill=True, release_zero=True)  # prefill pruning

    class Config(WindowConfig):
        layers: Literal["first", "all"] = Field(
            "first", description="layers whose text-to-visual attention decides the pruning"
        )
        global_threshold: Fraction = Field(0.001, description="θ_g: prunable if g_j < θ_g · Σ g")
        individual_threshold: Fraction = Field(
            0.001, description="θ_i: prunable if max_t A[t, j] < θ_i"
        )
        decay: Fraction = Field(
            0.5, description="weight kept by the accumulated decode score at each scoring"
        )
        visual_first: bool = Field(
            True, description="select: all-image blocks leave (bin, then release) before "
            "mixed ones, mixed ones before text"
        )
        head_reduce: Literal["mean", "max"] = Field(
            "max", description="merge of per-(layer, query head) block attention: max keeps "
            "what the one retrieving head needs (mean lets the local/sink heads outvote it)"
        )

    def prunable_tokens(self, stats: RequestStatistics) -> torch.Tensor | None:
        """[T] bool: visual tokens passing both thresholds; None when nothing can be pruned.

        Prefill only (once per request), and it reads the device back: whether there is
        anything to judge, and the text-query x visual-key selection, are data-dependent."""
        visual = stats.visual
        if visual is None or not visual.any() or stats.window_attn is None:
            return None
        attn = stats.window_attn[:1] if self.config.layers == "first" else stats.window_attn
        w, t = attn.shape[2], stats.num_tokens
        text_queries = ~visual[t - w:]
        if not text_queries.any():
            return None
        a = attn.float().mean(dim=(0, 1))[text_queries][:, visual]  # [W_text, N_visual]
        g, m = a.sum(0), a.amax(0)
        prunable = (g < self.config.global_threshold * g.sum()) & (
            m < self.config.individual_threshold
        )
        # the visual positions take the verdicts in order (no nonzero(): no read-back)
        return torch.zeros_like(visual, dtype=torch.bool).masked_scatter_(visual, prunable)

    def block_scores(self, stats: RequestStatistics, state: dict[str, Any]) -> torch.Tensor:
        bs, nb = stats.block_size, stats.num_blocks
        device = stats.block_index.device
        if stats.phase == "prefill" and stats.window_attn is not None:
            tokens = self.prunable_tokens(stats)
            if tokens is not None:
                full = tokens_to_blocks(torch.ones(stats.num_tokens, device=device), bs, nb)
                pruned = tokens_to_blocks(tokens.float(), bs, nb) == full
                state["pruned"] = stats.block_index[pruned]  # positions: once, at prefill
        received = window_received(stats)  # [L, Hq, T] at prefill
        mean = self.config.head_reduce == "mean"
        step = None
        if received is not None and mean:
            step = tokens_to_blocks(received.mean(dim=(0, 1)), bs, nb)
        elif received is not None:  # the (layer, head) that needs the block most
            step = tokens_to_blocks(received, bs, nb).amax(dim=(0, 1))
        elif stats.decode_mass is not None:  # the same two, from the block statistics
            step = stats.decode_share.mean(0) if mean else stats.decode_peak.amax(0)
        acc = accumulate_blocks(state, "hae", stats.block_index, step, self.config.decay,
                                stats.position_limit)
        base = recency(stats.block_index) if acc is None else acc.nan_to_num(0.0)
        none = torch.empty(0, dtype=torch.long, device=device)
        # positions are unique: assume_unique spares isin's unique() (a read-back on a GPU)
        pruned = torch.isin(stats.block_index, state.get("pruned", none), assume_unique=True)
        pruned &= ~pruned.all()  # nothing would be left: do not prune
        scores = normalize_mass(base.masked_fill(pruned, 0.0)).clamp_min(LIVE_FLOOR)
        return scores.masked_fill(pruned, 0.0)

    def tier(self, visual_blocks: torch.Tensor | None) -> torch.Tensor | None:
        """With ``visual_first``: text blocks outrank mixed blocks (text and image tokens),
        which outrank all-image blocks; each class fills keep and the bin only after the ones
        above it (pruned blocks are released)."""
        if self.config.visual_first and visual_blocks is not None:
            share = visual_blocks.float()
            return (share < 1).long() + (share <= 0).long()
        return None
