"""The policy contract: statistics in, per-block scores out, then a keep/park/release split.

A policy runs in two places. On the worker, ``block_scores`` turns the statistics measured
during attention for one request into one score per *resident* block (kept or parked).
On the scheduler, ``select`` turns those scores and the request's budget into a
``Decision``. Both are pure functions of tensors (plus a small per-request ``state`` dict the
engine owns and clears on preemption/finish), so every policy is testable without vLLM.

Scores of one policy must be comparable across requests: pool-pressure mode ranks blocks of
all running requests together. Convention: a block's score is a non-negative importance where
the scores of one request sum to about 1 (a probability-like mass).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

# Names of the statistics a policy may ask the worker for (``EvictionPolicy.needs``).
WINDOW_ATTN = "window_attn"  # softmax attention of the last W prompt queries (prefill)
DECODE_ATTN = "decode_attn"  # attention mass per block of the newest query (every step)
VALUE_PROJ_NORM = "value_proj_norm"  # ‖v_j W_O^h‖₂ per query head (prefill)
STATISTICS = frozenset({WINDOW_ATTN, DECODE_ATTN, VALUE_PROJ_NORM})


@dataclass
class RequestStats:
    """Statistics of one request over its resident tokens (kept + parked blocks).

    Token axis ``T``: the tokens of the resident blocks in positional order; the last block may
    be partial. ``block_index[b]`` is the positional index of resident block ``b`` (sorted), so
    token ``t`` belongs to resident block ``t // block_size``.

    Shapes: L layers, Hq query heads, Hkv KV heads, W window queries, D head dim,
    nb resident blocks. Optional fields are ``None`` unless the policy listed them in ``needs``.

    Decode statistics are per *block*, already summed and max-reduced over layers and the
    query heads of each KV group: on NVIDIA GPUs the plugin's attention backend measures them
    inside its decode pass, where no per-token probability row exists (``kernels/
    fused_decode.py``). A parked block's entry is the mass it would get relative to the
    attended tokens (it is not in the softmax). Per-token statistics exist only at prefill,
    from the observation window.
    """

    block_size: int
    block_index: torch.Tensor  # [nb] int64, positional block indices of resident blocks
    num_tokens: int  # T
    num_kv_heads: int
    parked: torch.Tensor  # [nb] bool, parked blocks (held in memory, excluded from attention)
    phase: str = "decode"  # "prefill" (right after the last prompt chunk) or "decode"
    num_layers: int = 1  # L
    num_heads: int = 0  # Hq (0: as many as KV heads)
    #: largest resident position + 1, known on the host (sizes the per-request block stores
    #: without reading ``block_index`` back); None: read it from ``block_index``
    position_limit: int | None = None
    window_attn: torch.Tensor | None = None  # [L, Hq, W, T] float32, rows sum to 1
    #: [Hkv, nb] float32: Σ over layers and the group's query heads of the newest query's
    #: attention on each block (attended blocks of one KV head sum to L·Hq/Hkv)
    decode_mass: torch.Tensor | None = None
    decode_peak: torch.Tensor | None = None  # [Hkv, nb]: the max over layers and group heads
    value_proj_norm: torch.Tensor | None = None  # [L, Hq, T] float32 (prefill)
    visual: torch.Tensor | None = None  # [T] bool, multimodal placeholder tokens

    @property
    def num_blocks(self) -> int:
        return int(self.block_index.numel())

    @property
    def decode_share(self) -> torch.Tensor | None:
        """``[Hkv, nb]`` the newest query's attention per block as a share of one (layer,
        query head): ``decode_mass / (L · group)``, so a KV head's attended blocks sum to 1."""
        if self.decode_mass is None:
            return None
        group = max(1, (self.num_heads or self.num_kv_heads) // self.num_kv_heads)
        return self.decode_mass / (self.num_layers * group)


@dataclass(frozen=True)
class Decision:
    """Positional block indices, disjoint, covering every resident block."""

    keep: torch.Tensor
    park: torch.Tensor
    release: torch.Tensor


class PolicyConfig(BaseModel):
    """Base of every policy's options (``kv_eviction.options``); unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class WindowConfig(PolicyConfig):
    """Options of a method that scores the prompt through its observation window at prefill."""

    window: int = Field(32, ge=1, description="observation window: last prompt queries")


def tokens_to_blocks(values: torch.Tensor, block_size: int, num_blocks: int, reduce: str = "sum") -> torch.Tensor:
    """Reduce a per-token tensor ``[..., T]`` to per-block ``[..., nb]`` (``sum`` or ``max``).

    A block holds ``block_size`` tokens of every layer and head, so a paged engine can only
    free whole blocks; this is where token scores become block scores.
    """
    *lead, t = values.shape
    pad = num_blocks * block_size - t
    if pad < 0:
        raise ValueError(f"{t} tokens do not fit in {num_blocks} blocks of {block_size}")
    fill = 0.0 if reduce == "sum" else float("-inf")
    padded = torch.nn.functional.pad(values, (0, pad), value=fill)
    blocks = padded.reshape(*lead, num_blocks, block_size)
    if reduce == "sum":
        return blocks.sum(-1)
    if reduce == "max":
        return blocks.amax(-1)
    raise ValueError(f"reduce must be 'sum' or 'max', got {reduce!r}")


def normalize_mass(scores: torch.Tensor) -> torch.Tensor:
    """Scale non-negative scores to sum to 1 (uniform if all zero), for cross-request ranking.

    Branch-free (``torch.where`` on the device), so a device tensor is never read back here.
    """
    scores = scores.clamp_min(0).to(torch.float32)
    total = scores.sum()
    uniform = torch.full_like(scores, 1.0 / max(scores.numel(), 1))
    return torch.where(total <= 0, uniform, scores / total)


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


class EvictionPolicy:
    """Base of every method: one subclass per method, registered by name.

    Subclasses set ``name``, ``Config`` (a ``PolicyConfig``) and ``needs`` and implement
    ``block_scores``. ``select`` is :func:`select_blocks`, or :func:`select_tiered` for a method
    that sets ``release_zero`` (and ranks blocks by ``tier`` first).

    A ``Config`` with a ``window`` option (:class:`WindowConfig`) sets ``window``: the class
    value is the option's default, each instance's value its option. Read it (like ``needs``)
    from the instance.
    """

    name: ClassVar[str]
    Config: ClassVar[type[PolicyConfig]] = PolicyConfig
    needs: ClassVar[frozenset[str]] = frozenset()
    #: observation window (prompt queries) wanted at prefill; 0 = no prefill scoring
    window: ClassVar[int] = 0
    #: the method is defined per decode step (H2O accumulates every query's attention,
    #: HybridKV retrieves chunks per step): call ``block_scores`` at every decode step, not
    #: only when eviction is due. Works, less faithfully, when called less often.
    score_every_step: ClassVar[bool] = False
    #: the method evicts by threshold, not only by budget (HAE's prefill pruning): run
    #: ``select`` right after prefill even when the request is within budget. Its Decision may
    #: then keep fewer blocks than ``keep_blocks``.
    select_after_prefill: ClassVar[bool] = False
    #: a score of exactly 0 means "no part of the model needs this block": ``select`` releases
    #: such blocks outright (:func:`select_tiered`); live blocks score at least ``LIVE_FLOOR``
    release_zero: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        option = cls.Config.model_fields.get("window")
        if option is not None:
            cls.window = option.default

    def __init__(self, config: PolicyConfig | None = None):
        self.config = config if config is not None else self.Config()
        if "window" in type(self.config).model_fields:
            self.window = self.config.window

    def block_scores(self, stats: RequestStats, state: dict[str, Any]) -> torch.Tensor:
        """One score per resident block ``[nb]``; ``state`` persists per request."""
        raise NotImplementedError

    def store_blocks(self, keep_blocks: int) -> int:
        """Blocks this method parks (restorable) beyond the request's ``recycle_bin_blocks``
        when it keeps ``keep_blocks``: 0, unless it retrieves blocks back (HybridKV)."""
        return 0

    def tier(self, visual_blocks: torch.Tensor | None) -> torch.Tensor | None:
        """[nb] int rank classes for ``select`` with ``release_zero`` (a higher tier outranks
        any score of a lower one); ``visual_blocks`` [nb] float: the share of the block's tokens
        that are visual (1: all-image, 0: text, between: mixed). None: one class."""
        return None

    def select(
        self,
        scores: torch.Tensor,
        *,
        block_index: torch.Tensor,
        keep_blocks: int,
        protected: torch.Tensor,
        bin_blocks: int,
        visual_blocks: torch.Tensor | None = None,
    ) -> Decision:
        budget = dict(block_index=block_index, keep_blocks=keep_blocks, protected=protected,
                      bin_blocks=bin_blocks)
        if self.release_zero:
            return select_tiered(scores, tier=self.tier(visual_blocks), **budget)
        return select_blocks(scores, **budget)


@dataclass
class _Registry:
    classes: dict[str, type[EvictionPolicy]] = field(default_factory=dict)


REGISTRY = _Registry()


def register_policy(cls: type[EvictionPolicy]) -> type[EvictionPolicy]:
    """Class decorator: make a policy available under ``cls.name``."""
    unknown = set(cls.needs) - STATISTICS
    if unknown:
        raise ValueError(f"policy {cls.name!r} needs unknown statistics {sorted(unknown)}")
    REGISTRY.classes[cls.name] = cls
    return cls
