"""Helpers shared by the policies: per-block memory across steps, head mixing, tiered selection.

Not a policy module (registers nothing). Everything here is keyed by *positional* block index,
because the resident block set changes between steps (blocks are released, new ones appear) and
the per-request ``state`` must survive that.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from pydantic import AfterValidator, Field

from vllm_kvevict.policies.base import Decision, normalize_mass, select_blocks


def _odd(value: int) -> int:
    if value % 2 == 0:
        raise ValueError("must be odd (same-length pooling)")
    return value


#: an average-pooling kernel: odd (so pooling keeps the token count), 1 = no pooling
PoolKernel = Annotated[int, Field(ge=1), AfterValidator(_odd)]


def window_blocks(num_tokens: int, window: int, block_size: int, num_blocks: int) -> torch.Tensor:
    """[nb] bool: blocks holding any of the last ``window`` tokens (the observation window)."""
    first = max(num_tokens - window, 0)
    return torch.arange(num_blocks) >= first // block_size


def head_mix(x: torch.Tensor, how: str) -> torch.Tensor:
    """Merge per-head block scores ``[..., nb]`` into ``[nb]``.

    Each head's row is first normalised to sum 1, so every (layer, head) has an equal say.
    ``mean``: a block's average share of attention mass. ``max``: its largest share in any one
    head, i.e. a block is as important as the head that needs it most (the block-level stand-in
    for per-head top-k selection, whose union is what a shared paged block must serve).
    """
    rows = x.reshape(-1, x.shape[-1]).clamp_min(0)
    rows = rows / rows.sum(-1, keepdim=True).clamp_min(torch.finfo(rows.dtype).tiny)
    if how == "mean":
        return rows.mean(0)
    if how == "max":
        return rows.amax(0)
    raise ValueError(f"head reduction must be 'mean' or 'max', got {how!r}")


def recency(block_index: torch.Tensor) -> torch.Tensor:
    """Scores growing with position (newest block highest): the fallback without statistics."""
    order = torch.argsort(torch.argsort(block_index))
    return (order + 1).to(torch.float32)


def save_blocks(state: dict[str, Any], key: str, block_index: torch.Tensor, values: torch.Tensor) -> None:
    """Store ``values[..., nb]`` under positional block indices in ``state[key]`` (grows)."""
    store = state.get(key)
    need = int(block_index.max()) + 1 if block_index.numel() else 0
    lead = values.shape[:-1]
    if store is None or store.shape[:-1] != lead:
        store = torch.full((*lead, need), float("nan"))
    elif store.shape[-1] < need:
        grow = torch.full((*lead, need - store.shape[-1]), float("nan"))
        store = torch.cat([store, grow], dim=-1)
    store[..., block_index] = values.to(torch.float32)
    state[key] = store


def load_blocks(state: dict[str, Any], key: str, block_index: torch.Tensor) -> torch.Tensor | None:
    """Stored values at ``block_index`` (NaN where a block was never stored), or None."""
    store = state.get(key)
    if store is None:
        return None
    out = torch.full((*store.shape[:-1], block_index.numel()), float("nan"))
    inside = block_index < store.shape[-1]
    out[..., inside] = store[..., block_index[inside]]
    return out


def fill_unscored(scores: torch.Tensor, how: str) -> torch.Tensor:
    """Give blocks without a stored score (NaN) the ``max`` or ``mean`` of the scored ones."""
    known = ~scores.isnan()
    if known.all():
        return scores
    if not known.any():
        return torch.ones_like(scores)
    fill = scores[known].max() if how == "max" else scores[known].mean()
    return torch.where(known, scores, fill)


def carry_scores(
    state: dict[str, Any],
    key: str,
    block_index: torch.Tensor,
    *,
    prefill: torch.Tensor | None,
    decode: torch.Tensor | None,
    refresh: float,
    unscored: str,
) -> torch.Tensor:
    """Block scores of a prefill-time method (SnapKV, LaProx) at any step.

    At prefill the window-based scores are stored and returned. Later steps reuse them: with
    ``refresh == 0`` (the papers: compress once after prefill) blocks born after the prefill get
    the ``unscored`` fill; with ``refresh > 0`` stored scores move towards the decode-time scores
    by that weight (new blocks take the decode score) and the result is stored. If the prefill
    was never scored (e.g. the prompt fitted the budget), the decode-time scores stand alone,
    and without those, recency does.
    """
    if prefill is not None:
        scores = normalize_mass(prefill)
        save_blocks(state, key, block_index, scores)
        return scores
    old = load_blocks(state, key, block_index)
    known = None if old is None else ~old.isnan()
    if known is None or not known.any():
        return normalize_mass(decode if decode is not None else recency(block_index))
    if decode is None or refresh == 0:
        return normalize_mass(fill_unscored(old, unscored))
    fresh = normalize_mass(decode)
    base = normalize_mass(torch.where(known, old, 0.0))
    scores = normalize_mass(torch.where(known, (1 - refresh) * base + refresh * fresh, fresh))
    save_blocks(state, key, block_index, scores)
    return scores


def select_tiered(
    scores: torch.Tensor,
    *,
    block_index: torch.Tensor,
    keep_blocks: int,
    protected: torch.Tensor,
    bin_blocks: int,
    tier: torch.Tensor | None = None,
) -> Decision:
    """:func:`select_blocks` with two extra rules, for methods that decide more than a top-K.

    * A block scoring exactly 0 (and not protected) is released outright, never kept or parked:
      the policy's ``block_scores`` uses 0 to say "no part of the model needs this block" (HAE's
      prefill-pruned visual blocks, HybridKV's blocks no head keeps). Scores are the only thing
      that travels from the worker to the scheduler, hence the in-band signal.
    * ``tier`` [nb] int: a higher tier outranks any score of a lower tier, both for keeping and
      for parking (HAE: text tier above visual tier, so visual blocks leave first).
    """
    dead = (scores <= 0) & ~protected
    key = scores.to(torch.float64).clamp_min(0)
    if tier is not None:
        key = tier.to(torch.float64) * (1.0 + key.max()) + key
    key = torch.where(dead, torch.tensor(-1.0, dtype=torch.float64), key)
    live = int((~dead).sum())
    n_keep = min(max(int(keep_blocks), int(protected.sum())), live)
    decision = select_blocks(
        key, block_index=block_index, keep_blocks=n_keep, protected=protected,
        bin_blocks=min(max(int(bin_blocks), 0), live - n_keep),
    )
    return decision
