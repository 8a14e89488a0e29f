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

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from vllm_kvevict.policies.selection import Decision, select_blocks, select_tiered

# Names of the statistics a policy may ask the worker for (``EvictionPolicy.needs``).
WINDOW_ATTN = "window_attn"  # softmax attention of the last W prompt queries (prefill)
DECODE_ATTN = "decode_attn"  # attention mass per block of the newest query (every step)
VALUE_PROJ_NORM = "value_proj_norm"  # ‖v_j W_O^h‖₂ per query head (prefill)
STATISTICS = frozenset({WINDOW_ATTN, DECODE_ATTN, VALUE_PROJ_NORM})


@dataclass
class RequestStatistics:
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


@dataclass(frozen=True)
class Schedule:
    """When the engine asks a policy for scores, and how the scheduler reads them.

    The engine's side of a method, kept apart from its scoring: most methods keep the
    defaults (score at the prompt's end and when over budget, keep the top-K).
    """

    #: observation window (last prompt queries) the worker measures at prefill; 0 = the
    #: method has no prefill scoring. Set from the ``window`` option where there is one.
    window: int = 0
    #: the method is defined per decode step (H2O accumulates every query's attention,
    #: HybridKV retrieves chunks per step): score at every decode step, not only when
    #: eviction is due. Works, less faithfully, when scored less often.
    every_step: bool = False
    #: the method evicts by threshold, not only by budget (HAE's prefill pruning): decide
    #: right after prefill even within budget; the decision may keep fewer blocks than the
    #: budget allows.
    select_after_prefill: bool = False
    #: a score of exactly 0 means "no part of the model needs this block": such blocks are
    #: released outright (:func:`select_tiered`) and blocks rank by ``tier`` first; live
    #: blocks score at least ``LIVE_FLOOR``.
    release_zero: bool = False


class EvictionPolicy:
    """Base of every method: one subclass per method, registered by name.

    Subclasses set ``name``, ``Config`` (a ``PolicyConfig``) and ``needs`` and implement
    ``block_scores``; a method whose engine side differs from the defaults sets ``schedule``
    (:class:`Schedule`). ``select`` is :func:`select_blocks`, or :func:`select_tiered` with
    ``schedule.release_zero`` (ranking blocks by ``tier`` first).

    A ``Config`` with a ``window`` option (:class:`WindowConfig`) sets ``schedule.window``:
    the class value is the option's default, each instance's value its option. Read it (like
    ``needs``) from the instance.
    """

    name: ClassVar[str]
    Config: ClassVar[type[PolicyConfig]] = PolicyConfig
    needs: ClassVar[frozenset[str]] = frozenset()
    schedule: ClassVar[Schedule] = Schedule()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        option = cls.Config.model_fields.get("window")
        if option is not None:
            cls.schedule = replace(cls.schedule, window=option.default)

    def __init__(self, config: PolicyConfig | None = None):
        self.config = config if config is not None else self.Config()
        if "window" in type(self.config).model_fields:
            self.schedule = replace(self.schedule, window=self.config.window)

    def block_scores(self, stats: RequestStatistics, state: dict[str, Any]) -> torch.Tensor:
        """One score per resident block ``[nb]``; ``state`` persists per request."""
        raise NotImplementedError

    def store_blocks(self, keep_blocks: int) -> int:
        """Blocks this method parks (restorable) beyond the request's ``recycle_bin_blocks``
        when it keeps ``keep_blocks``: 0, unless it retrieves blocks back (HybridKV)."""
        return 0

    def tier(self, visual_blocks: torch.Tensor | None) -> torch.Tensor | None:
        """[nb] int rank classes for ``select`` with ``schedule.release_zero`` (a higher tier outranks
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
        if self.schedule.release_zero:
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
