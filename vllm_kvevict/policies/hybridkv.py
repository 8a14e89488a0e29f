"""``hybridkv``: static heads pruned by text prior, dynamic heads served by chunk retrieval
(HybridKV, arXiv 2604.05887).

Why: attention heads of a multimodal model behave differently. Some ("static") look mostly at
text and a fixed few visual tokens — a one-off prefill pruning serves them. Others ("dynamic")
look at different image regions at every step — they need the whole image available and pick
chunks per query. HybridKV classifies heads once, splits the budget top-down (model -> layer ->
head) and compresses each head type its own way.

Readings we had to choose (the paper has no public code; where it does not say, we chose):

* classification statistic, per (layer, KV head), from the observation window's text queries
  (group-averaged attention, mean over those queries), over the *evictable* context only (not
  the first ``sink_tokens`` nor the window itself, whose attention says nothing about content):
  ``text_mass`` = share of that attention on text tokens; ``concentration`` = share held by the
  top ``concentration_top`` fraction of tokens. A head is static iff the statistic reaches its
  threshold. ``auto`` uses text_mass when the request has visual tokens, else concentration:
  on text-only requests every token is text, so "text-centric" degenerates and a concentrated,
  stable pattern is what a one-off pruning can serve.
* budget: a paged block serves every head, so per-head budgets become weights of a mixture.
  Each head has a need distribution over blocks; a block's score is ``Σ w[l,h] · need[l,h,b]``
  and the top-K blocks by it are kept. ``budget="entropy"`` is the paper's model -> layer ->
  head split: layer share ∝ its heads' mean normalised attention entropy (diffuse layers need
  more KV), head share within the layer ∝ its entropy, each mixed with a uniform floor
  ``budget_floor`` (Ada-KV's safeguard) so the hierarchy does not collapse to one flat ranking.
  ``uniform`` (default): equal weights. Measured on ordinary text (bench_natural.py, 12
  prompts of 1.5k tokens, 10 %): entropy 7/12 (answer block kept by the first decision 8/12),
  uniform 9/12 (10/12), SnapKV 9/12. Entropy ranks a diffuse head's spread above a
  concentrated head's one needed block: the retrieving heads are the concentrated ones.
* merge (``head_reduce``): ``max`` (default) scores a block by ``max w · need``, the head that
  needs it most for its budget share; ``mean`` is the mixture ``Σ w · need``; ``union`` reads
  the weights as each head's share of the budget, every head keeping its own top blocks within
  its share (:func:`budget_union`: a block ranked by the smallest budget at which it enters
  some head's set). Measured (12 prompts of 1.5k tokens of ordinary text, 10 %): union 2/12
  with the entropy split, 3/12 with uniform weights, where max has 7/12 and 9/12; image-heavy
  prompts at 25 %: union 4/12, max 8/12. A rank ignores how sharp a head's preference is: a
  diffuse head's first block counts as much as a retrieving head's. The mixture lets the
  many local heads outvote the few that retrieve (answer's block kept 2/12 with ``mean``, 8/12
  with ``max``, same prompts, entropy split).
* static heads, text prior (LOOK-M): need = window attention on every text token plus the top
  ``static_visual_keep`` fraction of visual tokens (by that head's attention); other visual
  tokens get 0. Fixed at prefill; blocks generated later count as text of average need.
* dynamic heads, chunk retrieval: at each decode step a dynamic KV head picks the top
  ``retrieval_fraction`` of resident blocks by the attention the newest query paid them
  (``decode_peak``: the max over the group's query heads and the layers; parked blocks are
  scored from their keys too); need = that attention over those blocks, renormalised. The
  paper ranks by Quest's upper bound on q·k because it must choose blocks without reading
  them; the plugin's decode pass reads every attended block (and the parked blocks' keys)
  anyway, so the exact mass replaces the bound. The pass accumulates over layers (no per-layer
  rows are kept on the device), so a KV head's retrieval is the same in every layer; the
  layer and head weights still apply. At prefill their need is the window attention (nothing
  pruned: the "cold copy").
* decisions - retrieval, not loss: a block no head needs scores exactly 0 and ``select``
  releases it. If the request has dynamic heads, any block they might retrieve later keeps a
  tiny positive score, and the blocks outside the attended budget go to a retrieval *store*
  (the recycle bin: parked, out of attention, their keys still scored at every decode step),
  ``store`` x the attended budget per request (default 1.0: a request at 25 % keeps 25 % in
  attention and up to 25 % more parked, so it holds up to 50 % of its KV in the pool). At each
  decode step attended and parked blocks are ranked together, so a block the dynamic heads did
  not read at one step and read at the next is restored (before, with no store, it was
  released at the first step it lost: natural text 3/12 where SnapKV had 9/12). Only what falls
  out of the store (the lowest-ranked beyond it) and what no head needs are released. With
  prefill eviction the store is off (that pool is sized for the budget plus one chunk). The
  eviction report counts what is attended (``attended_tokens``), parked (``parked_tokens``) and
  released (``evicted_tokens``).
* a paged block serves every head: a per-head decision (static head: prune this token;
  dynamic head: read this block now) becomes a per-block one through the need mixture above:
  a block is kept while any head's weighted need for it ranks within the budget.
* no prefill classification in ``state`` (prefill never scored): all heads dynamic, uniform.
"""

from __future__ import annotations

import math
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
    group_heads,
    load_blocks,
    recency,
    save_blocks,
    window_blocks,
)
from vllm_kvevict.policies.selection import LIVE_FLOOR

#: need floor of tokens a static head keeps (a text token with underflowed attention stays)
KEPT_FLOOR = 1e-9
TINY = torch.finfo(torch.float32).tiny


def _rownorm(x: torch.Tensor) -> torch.Tensor:
    return x / x.sum(-1, keepdim=True).clamp_min(TINY)


def head_statistic(a: torch.Tensor, candidates: torch.Tensor, text: torch.Tensor | None,
                   top: float) -> torch.Tensor:
    """[L, H, T] attention -> [L, H] text-mass share (``text`` given) or top-``top`` concentration,
    over ``candidates`` tokens; 1 (static) where the head has no mass there."""
    ac = a[..., candidates]
    total = ac.sum(-1)
    if text is not None:
        part = ac[..., text[candidates]].sum(-1)
    else:
        k = max(1, math.ceil(top * ac.shape[-1])) if ac.shape[-1] else 0
        part = ac.topk(k, dim=-1).values.sum(-1) if k else total
    return torch.where(total > 0, part / total.clamp_min(TINY), torch.ones_like(total))


def budget_weights(a: torch.Tensor, how: str, floor: float) -> torch.Tensor:
    """[L, H, T] attention rows -> [L, H] mixture weights (sum 1), model -> layer -> head."""
    n_layers, n_heads, t = a.shape
    if how == "uniform" or t < 2:
        return torch.full((n_layers, n_heads), 1.0 / (n_layers * n_heads), device=a.device)
    p = _rownorm(a.clamp_min(0))
    ent = -(p * p.clamp_min(TINY).log()).sum(-1) / math.log(t)  # [L, H] in [0, 1]
    layer = (1 - floor) * _rownorm(ent.mean(-1)[None])[0] + floor / n_layers
    head = (1 - floor) * _rownorm(ent) + floor / n_heads
    return layer[:, None] * head


def budget_union(need: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[L, H, nb] needs, [L, H] budget shares (sum 1) -> [nb] block scores whose top-K is the
    union of every head's own top blocks within its budget.

    Head ``h`` of ``L·H`` with share ``w_h`` keeps its ``floor(w_h·L·H·k)`` best blocks when
    each head would keep ``k`` under equal shares; block ``b`` at rank ``r_h(b)`` (0 = its best)
    is in that set iff ``r_h(b) + 1 <= w_h·L·H·k``. So the score ``max_h w_h·L·H / (r_h(b) + 1)``
    is ``>= 1/k`` exactly for the union of the heads' sets at ``k``: ranking blocks by it keeps,
    at any budget, what the heads' own budgets keep, without knowing the scheduler's ``k``. A
    head that needs a block not at all (0) never adds it.
    """
    n_heads = weights.numel()
    rank = need.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1).float()  # [L, H, nb]
    share = (weights * n_heads)[..., None]
    return torch.where(need > 0, share / (rank + 1), 0.0).amax(dim=(0, 1))


@register_policy
class HybridKVPolicy(EvictionPolicy):
    name = "hybridkv"
    needs = frozenset({WINDOW_ATTN, DECODE_ATTN})
    # release_zero: blocks no head needs; LIVE_FLOOR: blocks a dynamic head may retrieve
    schedule = Schedule(every_step=True, release_zero=True)

    class Config(WindowConfig):
        classify_by: Literal["auto", "text_mass", "concentration"] = Field(
            "auto", description="head statistic; auto = text_mass if visual tokens, else concentration"
        )
        text_mass_threshold: Fraction = Field(
            0.5, description="static iff text share of attention >= this"
        )
        concentration_threshold: Fraction = Field(
            0.5, description="static iff top-token share of attention >= this"
        )
        concentration_top: Fraction = Field(
            0.1, gt=0.0, description="fraction of tokens whose mass is 'concentration'"
        )
        sink_tokens: int = Field(4, ge=0, description="first tokens left out of the statistic")
        budget: Literal["entropy", "uniform"] = Field(
            "uniform", description="head weights: uniform, or the paper's hierarchical split "
            "by attention entropy (see module docstring: measured below uniform)"
        )
        budget_floor: Fraction = Field(
            0.2, description="uniform share mixed into layer and head weights"
        )
        static_visual_keep: Fraction = Field(
            0.25, description="fraction of visual tokens static heads keep"
        )
        head_reduce: Literal["union", "mean", "max"] = Field(
            "max", description="per-head budgets -> per-block scores: union = a block ranks "
            "by the earliest it enters some head's own top share (weights = budget shares); "
            "max = the largest weighted need; mean = the weighted mixture"
        )
        retrieval_fraction: Fraction = Field(
            0.25, gt=0.0, description="resident blocks each dynamic head retrieves per step"
        )
        protect_window: bool = Field(
            True, description="the observation window's blocks (the question) score highest"
        )
        store: float = Field(
            1.0, ge=0.0, description="blocks parked for the dynamic heads' retrieval, as a "
            "multiple of the blocks kept in attention (0: what falls out of the budget is "
            "released)"
        )

    def store_blocks(self, keep_blocks: int) -> int:
        """The retrieval store: ``store`` x the attended budget, parked in the recycle bin
        (within ``recycle_bin_total_blocks``), ranked with the attended blocks at every step."""
        return math.ceil(self.config.store * keep_blocks)

    # -- prefill: classify heads, weigh them, fix the static heads' needs ----------------------
    def classify(self, stats: RequestStatistics) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(static [L, Hkv] bool, weights [L, Hkv], per-head token attention [L, Hkv, T]).

        Prefill only (once per request); the text-query rows and candidate tokens are selected
        by boolean masks, which read the device back (data-dependent sizes)."""
        c, t = self.config, stats.num_tokens
        attn = stats.window_attn.float()
        w, device = attn.shape[2], attn.device
        visual = stats.visual if stats.visual is not None and stats.visual.any() else None
        every = torch.ones(w, dtype=torch.bool, device=device)
        rows = every if visual is None else ~visual[t - w:]
        if not rows.any():
            rows = every
        a = group_heads(attn[:, :, rows].mean(2), stats.num_kv_heads, "mean", dim=1)
        position = torch.arange(t, device=device)
        candidates = (position >= c.sink_tokens) & (position < t - w)
        by = c.classify_by
        if by == "auto":
            by = "text_mass" if visual is not None else "concentration"
        if by == "text_mass":
            text = ~visual if visual is not None else torch.ones(t, dtype=torch.bool, device=device)
            stat = head_statistic(a, candidates, text, c.concentration_top)
            static = stat >= c.text_mass_threshold
        else:
            stat = head_statistic(a, candidates, None, c.concentration_top)
            static = stat >= c.concentration_threshold
        return static, budget_weights(a, c.budget, c.budget_floor), a

    def static_token_need(self, a: torch.Tensor, visual: torch.Tensor | None) -> torch.Tensor:
        """Text prior: [L, H, T] attention kept on text and on each head's top visual tokens.
        Kept tokens get at least ``KEPT_FLOOR``: a static head never gives up text.

        Prefill only: top-k's k (a share of the visual token count) is a host int."""
        a = a.clamp_min(KEPT_FLOOR)
        if visual is None or not visual.any():
            return a
        n_keep = math.ceil(self.config.static_visual_keep * int(visual.sum()))
        keep = (~visual).expand_as(a).clone()
        if n_keep:
            vis_idx = visual.nonzero().squeeze(1)
            top = a[..., vis_idx].topk(n_keep, dim=-1).indices
            keep.scatter_(-1, vis_idx[top], True)
        return a * keep

    # -- decode: chunk retrieval for dynamic heads ---------------------------------------------
    def retrieval_need(self, stats: RequestStatistics) -> torch.Tensor | None:
        """[L, Hkv, nb]: each KV head's attention on its top blocks, renormalised, else 0 (the
        same for every layer)."""
        if stats.decode_peak is None:
            return None
        peak = stats.decode_peak.float()  # [Hkv, nb]
        k = max(1, math.ceil(self.config.retrieval_fraction * stats.num_blocks))
        top = peak.topk(min(k, stats.num_blocks), dim=-1).indices
        picked = torch.zeros_like(peak).scatter(-1, top, peak.gather(-1, top))
        need = picked / picked.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        return need.expand(stats.num_layers, *need.shape)

    def block_scores(self, stats: RequestStatistics, state: dict[str, Any]) -> torch.Tensor:
        bs, nb = stats.block_size, stats.num_blocks
        if stats.phase == "prefill" and stats.window_attn is not None:
            static, weights, a = self.classify(stats)
            need_tok = torch.where(static[..., None], self.static_token_need(a, stats.visual), a)
            need = _rownorm(tokens_to_blocks(need_tok, bs, nb))
            if self.config.protect_window:  # every head needs the question's blocks most
                win = window_blocks(stats.num_tokens, stats.window_attn.shape[2], bs, nb,
                                    device=need.device)
                need = torch.where(win, need.amax(-1, keepdim=True), need)
            state.update(static=static, weights=weights)
            save_blocks(state, "need", stats.block_index, need, stats.position_limit)
        else:
            need = load_blocks(state, "need", stats.block_index)
            if need is not None:  # blocks born after prefill: average need of the needed ones
                fill = torch.where(need > 0, need, float("nan")).nanmean(-1, keepdim=True)
                need = _rownorm(torch.where(need.isnan(), fill, need).nan_to_num(0.0))
            retrieved = self.retrieval_need(stats)
            if need is None:
                if retrieved is None:
                    return normalize_mass(recency(stats.block_index))
                need = retrieved
                n = need.shape[0] * need.shape[1]
                state.setdefault("static", torch.zeros(need.shape[:2], dtype=torch.bool,
                                                       device=need.device))
                state.setdefault("weights", torch.full(need.shape[:2], 1.0 / n, device=need.device))
            elif retrieved is not None:
                need = torch.where(state["static"][..., None], need, retrieved)
        static, weights = state["static"], state["weights"]
        how = self.config.head_reduce
        if how == "union":
            merged = budget_union(need, weights)
        else:
            weighted = weights[..., None] * need
            merged = weighted.amax(dim=(0, 1)) if how == "max" else weighted.sum(dim=(0, 1))
        scores = normalize_mass(merged)
        # dynamic heads may retrieve any block later: park, don't release (selected on device)
        return torch.where(static.all(), scores, scores.clamp_min(LIVE_FLOOR))
