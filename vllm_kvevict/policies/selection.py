"""Selection: a request's block scores and budget in, a keep / park / release split out.

Policies score; this module decides what the scores mean for memory. It is the one place
with the ranking rules every policy shares - protected blocks always kept, ties keep the older
block, a score of exactly 0 released outright for the methods that say so (``release_zero``),
a higher ``tier`` outranking any score of a lower one - in three forms that must agree:

* :func:`select_blocks` / :func:`select_tiered`: one request, torch (a policy's ``select``);
* :func:`select_batch`: all requests deciding at one step, numpy on the host (the scheduler);
* :func:`least_important`: pool pressure's global pick over every running request's blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Decision:
    """Positional block indices, disjoint, covering every resident block."""

    keep: torch.Tensor
    park: torch.Tensor
    release: torch.Tensor


def select_blocks(
    scores: torch.Tensor,
    *,
    block_index: torch.Tensor,
    keep_blocks: int,
    protected: torch.Tensor,
    bin_blocks: int = 0,
) -> Decision:
    """Keep the protected blocks plus the best-scored others up to ``keep_blocks`` in total.

    Of the rest, the ``bin_blocks`` best-scored are parked (recycle bin: out of attention, still
    in memory, restorable) and the others released. Currently parked blocks compete like any
    other, so a parked block that scores into the top is restored. Ties keep the older block.
    """
    nb = scores.numel()
    order_key = scores.to(torch.float64).clone()
    order_key[protected] = float("inf")
    # stable descending sort: equal scores keep positional order (older first)
    ranked = torch.sort(order_key, descending=True, stable=True).indices
    n_keep = max(int(keep_blocks), int(protected.sum()))
    n_keep = min(n_keep, nb)
    keep_sel = ranked[:n_keep]
    rest = ranked[n_keep:]
    park_sel = rest[: max(int(bin_blocks), 0)]
    release_sel = rest[max(int(bin_blocks), 0):]
    return Decision(
        keep=torch.sort(block_index[keep_sel]).values,
        park=torch.sort(block_index[park_sel]).values,
        release=torch.sort(block_index[release_sel]).values,
    )


#: score floor of blocks a method keeps alive, so that exactly 0 unambiguously means "release"
LIVE_FLOOR = 1e-12


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
    key = key.masked_fill(dead, -1.0)
    live = int((~dead).sum())
    n_keep = min(max(int(keep_blocks), int(protected.sum())), live)
    decision = select_blocks(
        key, block_index=block_index, keep_blocks=n_keep, protected=protected,
        bin_blocks=min(max(int(bin_blocks), 0), live - n_keep),
    )
    return decision


@dataclass
class BatchDecision:
    """Masks over a padded ``[R, N]`` batch of requests' resident blocks (padding all False)."""

    keep: np.ndarray  # [R, N] bool
    park: np.ndarray  # [R, N] bool
    release: np.ndarray  # [R, N] bool


def select_batch(
    scores: np.ndarray,
    valid: np.ndarray,
    protected: np.ndarray,
    keep_blocks: np.ndarray,
    bin_blocks: np.ndarray,
    *,
    release_zero: bool = False,
    tier: np.ndarray | None = None,
) -> BatchDecision:
    """:func:`select_blocks` (or, with ``release_zero``, :func:`select_tiered`) for ``R``
    requests at once, on the host: the scheduler's decisions of one step in a few array
    operations instead of a dozen tensor operations per request. Same decisions, ties
    included: float32 scores without tiers (the scheduler's usual case) are ranked by one sort
    of packed keys (:func:`_first_k_packed`), anything else by a stable argsort of the same
    float64 keys as the per-request functions.

    Args:
        scores: ``[R, N]`` block scores, row ``r`` valid in its first entries (``valid``).
        valid: ``[R, N]`` bool, the request's resident blocks (positional order) vs padding.
        protected: ``[R, N]`` bool, always kept.
        keep_blocks: ``[R]`` blocks to keep (at least the protected ones are kept).
        bin_blocks: ``[R]`` of the rest, how many to park (the best-scored ones).
        tier: ``[R, N]`` int rank classes (``release_zero`` only), or None.
    Returns:
        keep / park / release masks, each ``[R, N]``.
    """
    exact32 = scores.dtype == np.float32 and tier is None  # keys stay float32: packed sort
    scores = scores.astype(np.float64)
    n_valid = valid.sum(axis=1)
    n_protected = (protected & valid).sum(axis=1)
    bins = np.maximum(bin_blocks.astype(np.int64), 0)
    if release_zero:
        dead = (scores <= 0) & ~protected & valid
        key = np.maximum(scores, 0.0)
        if tier is not None:
            row_max = np.where(valid, key, -np.inf).max(axis=1, keepdims=True)
            key = tier.astype(np.float64) * (1.0 + row_max) + key
        key = np.where(dead, -1.0, key)
        live = n_valid - dead.sum(axis=1)
        n_keep = np.minimum(np.maximum(keep_blocks, n_protected), live)
        bins = np.minimum(bins, live - n_keep)
    else:
        key = scores
        n_keep = np.minimum(np.maximum(keep_blocks, n_protected), n_valid)
    key = np.where(protected, np.inf, key)
    key = np.where(valid, key, -np.inf)  # padding ranks last
    if exact32:
        first = _first_k_packed(key.astype(np.float32))
    else:
        order = np.argsort(-key, axis=1, kind="stable")  # descending, ties keep positions
        rank = np.empty_like(order)
        rank[np.arange(order.shape[0])[:, None], order] = np.arange(order.shape[1])

        def first(k):
            return rank < k[:, None]
    keep = first(n_keep) & valid
    park = first(n_keep + bins) & ~keep & valid
    return BatchDecision(keep=keep, park=park, release=valid & ~keep & ~park)


def _first_k_packed(key: np.ndarray):
    """For ``[R, N]`` float32 keys: a function ``k [R] -> [R, N] bool`` marking each row's
    ``k`` best entries, highest key first, ties by column - the ranks of a stable descending
    argsort, from one sort of values instead: each key's order-preserving 32 bits (inverted:
    descending) above its column index in a uint64, unique per row, so an unstable value sort
    orders them exactly and the k-th smallest is a threshold. NaN ranks as -inf; -0.0 as 0."""
    key = np.where(np.isnan(key), np.float32(-np.inf), key) + np.float32(0.0)  # -0.0 -> 0.0
    bits = key.view(np.uint32)
    ordered = np.where(bits >> 31, ~bits, bits | np.uint32(0x80000000))  # ascending as floats
    packed = ((~ordered).astype(np.uint64) << np.uint64(32)) | np.arange(
        key.shape[1], dtype=np.uint64)
    ranked = np.sort(packed, axis=1)

    def first(k: np.ndarray) -> np.ndarray:
        k = np.asarray(k, dtype=np.int64)
        idx = np.clip(k - 1, 0, key.shape[1] - 1)[:, None]
        threshold = np.take_along_axis(ranked, idx, axis=1)
        return (packed <= threshold) & (k > 0)[:, None]
    return first



def least_important(keys: tuple[np.ndarray, ...], need: int) -> np.ndarray:
    """Indices of the ``need`` smallest entries under the lexicographic order of ``keys``
    (most significant first, like reversed ``np.lexsort``), in that order - without sorting
    all of them: the first key is a small class (``int``), the second a score; within the
    last class needed, a partition finds the threshold score and only the entries at or
    below it are sorted.

    Args:
        keys: ``[n]`` arrays ``(class, score, *tie_breakers)``.
        need: how many (at most ``n`` are returned).
    Returns:
        ``[min(need, n)]`` int64 indices.
    """
    cls, score = keys[0], keys[1]
    chosen, left = [], need
    for c in np.unique(cls):
        if left <= 0:
            break
        members = np.flatnonzero(cls == c)
        if len(members) > left:  # only the `left` best of this class, found by partition
            threshold = np.partition(score[members], left - 1)[left - 1]
            members = members[~(score[members] > threshold)]  # ties (and NaN) sorted below
        order = np.lexsort(tuple(k[members] for k in reversed(keys[1:])))
        chosen.append(members[order][:left])
        left -= len(chosen[-1])
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
