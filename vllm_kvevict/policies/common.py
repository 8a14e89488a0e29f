"""Helpers shared by the policies: merging query heads into KV groups, token pooling, head
mixing, per-block memory across steps.

Not a policy module (registers nothing). The statistics themselves (window/decode attention,
‖v W_O‖) are defined once, in ``vllm_kvevict.kernels.reference`` beside the Triton kernels
they check. Everything here is keyed by *positional* block index,
because the resident block set changes between steps (blocks are released, new ones appear) and
the per-request ``state`` must survive that.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import AfterValidator, Field

from vllm_kvevict.kernels.reference import kv_group_size
from vllm_kvevict.policies.base import RequestStatistics, normalize_mass


def _odd(value: int) -> int:
    if value % 2 == 0:
        raise ValueError("must be odd (same-length pooling)")
    return value


#: an average-pooling kernel: odd (so pooling keeps the token count), 1 = no pooling
PoolKernel = Annotated[int, Field(ge=1), AfterValidator(_odd)]
#: a share, weight or threshold in [0, 1]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


def group_heads(x: torch.Tensor, num_kv_heads: int, reduce: str = "mean", dim: int = 0) -> torch.Tensor:
    """Reduce the query heads of each KV group: ``[.., Hq, ..] -> [.., Hkv, ..]`` along ``dim``.

    A KV head is stored (and evicted) once for its whole group, so per-query-head scores must
    be merged before they can rank its tokens.
    """
    dim = dim % x.dim()
    g = kv_group_size(x.shape[dim], num_kv_heads)
    grouped = x.reshape(*x.shape[:dim], num_kv_heads, g, *x.shape[dim + 1:])
    if reduce == "mean":
        return grouped.mean(dim + 1)
    if reduce == "sum":
        return grouped.sum(dim + 1)
    if reduce == "max":
        return grouped.amax(dim + 1)
    raise ValueError(f"reduce must be 'mean', 'sum' or 'max', got {reduce!r}")


def pool_tokens(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """Average-pool ``[..., T]`` along tokens with an odd ``kernel``, keeping length ``T``.

    SnapKV's smoothing: a token next to an attended token is likely part of the same phrase, so
    scores are spread over a neighbourhood. Edges are zero-padded and divided by ``kernel``, as in
    the SnapKV reference code (kvpress does the same), so end tokens are slightly damped.
    """
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"pooling kernel must be odd and >= 1, got {kernel}")
    if kernel == 1:
        return x.float()
    *lead, t = x.shape
    flat = x.float().reshape(-1, 1, t)
    pooled = F.avg_pool1d(flat, kernel_size=kernel, stride=1, padding=kernel // 2)
    return pooled.reshape(*lead, t)


def window_blocks(
    num_tokens: int, window: int, block_size: int, num_blocks: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """[nb] bool on ``device``: blocks holding any of the last ``window`` tokens (the
    observation window)."""
    first = max(num_tokens - window, 0)
    return torch.arange(num_blocks, device=device) >= first // block_size


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


def save_blocks(state: dict[str, Any], key: str, block_index: torch.Tensor, values: torch.Tensor,
                limit: int | None = None) -> None:
    """Store ``values[..., nb]`` under positional block indices in ``state[key]`` (grows).

    The store lives on the device of ``values``. Its length (largest position + 1) must be a
    host int: ``limit`` (``RequestStatistics.position_limit``, which the worker knows on the host),
    else ``block_index.max()`` is read back (a host sync on a GPU).
    """
    store = state.get(key)
    if limit is not None:
        need = limit
    else:
        need = int(block_index.max()) + 1 if block_index.numel() else 0
    lead = values.shape[:-1]
    if store is None or store.shape[:-1] != lead:
        store = torch.full((*lead, need), float("nan"), device=values.device)
    elif store.shape[-1] < need:
        grow = torch.full((*lead, need - store.shape[-1]), float("nan"), device=store.device)
        store = torch.cat([store, grow], dim=-1)
    store[..., block_index] = values.to(torch.float32)
    state[key] = store


def load_blocks(state: dict[str, Any], key: str, block_index: torch.Tensor) -> torch.Tensor | None:
    """Stored values at ``block_index`` (NaN where a block was never stored), or None."""
    store = state.get(key)
    if store is None:
        return None
    n = store.shape[-1]
    if n == 0:
        return torch.full((*store.shape[:-1], block_index.numel()), float("nan"),
                          device=store.device)
    # gather then mask (no boolean indexing, whose result size would be read back)
    inside = block_index < n
    return torch.where(inside, store[..., block_index.clamp(max=n - 1)], float("nan"))


def window_received(stats: RequestStatistics) -> torch.Tensor | None:
    """[L, Hq, T] float32 attention each token received from the observation window's queries
    (summed over them), at prefill; None at decode or when it was not measured."""
    if stats.phase == "prefill" and stats.window_attn is not None:
        return stats.window_attn.float().sum(2)
    return None


def accumulate_blocks(
    state: dict[str, Any], key: str, block_index: torch.Tensor, step: torch.Tensor | None,
    decay: float = 1.0, limit: int | None = None,
) -> torch.Tensor | None:
    """Running per-block score ``decay · past + step`` (``[..., nb]``) kept in ``state[key]``.

    Blocks the store has not seen start from 0. Without a ``step`` the stored score is returned
    as is (NaN for unseen blocks); None if nothing was ever stored.
    """
    acc = load_blocks(state, key, block_index)
    if step is None:
        return acc
    acc = step if acc is None or acc.shape != step.shape else decay * acc.nan_to_num(0.0) + step
    save_blocks(state, key, block_index, acc, limit)
    return acc


def fill_unscored(scores: torch.Tensor, how: str) -> torch.Tensor:
    """Give blocks without a stored score (NaN) the ``max`` or ``mean`` of the scored ones
    (all ones if none is scored)."""
    if scores.numel() == 0:
        return scores
    known = ~scores.isnan()
    if how == "max":
        fill = scores.masked_fill(~known, float("-inf")).amax()
    else:
        # host sync (boolean indexing): summing the scored values in place, unscored as 0,
        # would round differently from their plain mean
        fill = scores[known].mean()
    return torch.where(known.any(), torch.where(known, scores, fill), torch.ones_like(scores))


def carry_scores(
    state: dict[str, Any],
    key: str,
    block_index: torch.Tensor,
    *,
    prefill: torch.Tensor | None,
    decode: torch.Tensor | None,
    refresh: float,
    unscored: str,
    limit: int | None = None,
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
        save_blocks(state, key, block_index, scores, limit)
        return scores
    old = load_blocks(state, key, block_index)
    alone = normalize_mass(decode if decode is not None else recency(block_index))
    if old is None:
        return alone
    # whether any resident block was scored stays a device tensor: both branches are computed
    # and selected with torch.where instead of reading it back
    known = ~old.isnan()
    any_known = known.any()
    if decode is None or refresh == 0:
        return torch.where(any_known, normalize_mass(fill_unscored(old, unscored)), alone)
    fresh = normalize_mass(decode)
    base = normalize_mass(torch.where(known, old, 0.0))
    scores = normalize_mass(torch.where(known, (1 - refresh) * base + refresh * fresh, fresh))
    # nothing scored: store back what was there (NaN), i.e. store nothing
    save_blocks(state, key, block_index, torch.where(any_known, scores, old), limit)
    return torch.where(any_known, scores, alone)
