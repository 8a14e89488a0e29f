"""The statistics the workers measure inside attention, each declared once.

A statistic is a name policies list in ``needs`` (``policies.base``), the ``RequestStatistics``
fields it fills, when it is measured, and how the attention hooks compute one layer's value
from the paged KV cache (``kernels.dispatch``: the Triton kernel on NVIDIA GPUs, its torch
reference in ``kernels.reference`` elsewhere). The worker's hooks run every statistic of
:data:`REGISTRY` at every attention layer for the requests that need it — except an
``in_backend`` statistic on a decode row of the plugin's attention backend, which its kernel
measures inside the attention pass (``vllm_kvevict.backend``; the hook's function here is that
kernel's torch twin). Adding a statistic is one entry here, its kernel and reference, and its
``RequestStatistics`` field.

What a statistic reads of the worker is typed here, on the reading side: one scored request
(:class:`ScoredRow`) or the step's requests that need it as one paged batch
(:class:`RowBatch`); the worker's ``adapter.scoring_batch.ScoredRequest`` and ``ScoringBatch``
are those.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from vllm_kvevict.kernels import dispatch, reference
from vllm_kvevict.kernels.paged import PagedKV
from vllm_kvevict.policies.base import DECODE_ATTN, VALUE_PROJ_NORM, WINDOW_ATTN


class ScoredRow(Protocol):
    """One request scored this step, as a statistic reads it and records into it.

    Attributes:
        req_id: the request's id.
        q_end: end (exclusive) of its query tokens among the step's tokens.
        block_ids: ``[nb]`` int64 (host), physical ids of its resident blocks, positional order.
        parked: ``[nb]`` bool (host), the resident blocks out of attention.
        tokens_per_block: ``nb`` ints, the tokens of each resident block (all full but the last).
        num_tokens: ``T``, their sum.
        window: ``W_i``, the observation-window queries measured for it this step (0: none).
    """

    req_id: str
    q_end: int
    block_ids: torch.Tensor
    parked: torch.Tensor
    tokens_per_block: list[int]
    num_tokens: int
    window: int

    @property
    def block_table(self) -> torch.Tensor:
        """``[1, nb]`` int32 on the device: the resident blocks as one paged row."""
        ...

    @property
    def seq_lens(self) -> torch.Tensor:
        """``[1]`` int32 on the device: ``T``."""
        ...

    @property
    def device_columns(self) -> torch.Tensor:
        """``[nb]`` int64 on the device: each resident block's column in the decode
        statistics (attended blocks first in row order, then the parked ones)."""
        ...

    def record(self, stat: str, value: torch.Tensor) -> None:
        """Append one layer's value of the ``RequestStatistics`` field ``stat``."""
        ...


class RowBatch(Protocol):
    """Scored requests as one paged batch: what one kernel launch reads for all of them.

    Attributes:
        members: the ``R`` requests, in batch-row order.
        block_table: ``[R, max_blocks]`` int32 on the device (short rows padded, never read).
        seq_lens: ``[R]`` int32 on the device, each row's ``T``.
        window_index: ``[R, W]`` int64 on the device, each request's window query indices in
            the step's tokens, right-aligned (``W`` = the longest window); None when no member
            has a window.
        window_lens: ``[R]`` int32 on the device, each ``W_i``; None with ``window_index``.
    """

    @property
    def members(self) -> Sequence[ScoredRow]: ...

    @property
    def block_table(self) -> torch.Tensor: ...

    @property
    def seq_lens(self) -> torch.Tensor: ...

    @property
    def window_index(self) -> torch.Tensor | None: ...

    @property
    def window_lens(self) -> torch.Tensor | None: ...


@dataclass
class LayerInputs:
    """What one attention layer hands the statistics in one step.

    Attributes:
        kv: the layer's cache as logical ``[num_blocks, block_size, Hkv, D]`` views.
        queries: ``[num_tokens, Hq, D]`` this step's queries.
        scale: the layer's softmax scale.
        gram: ``() -> [Hq, D, D] | None``, the per-head Gram matrices ``W_O^h W_O^hᵀ`` of the
            layer's output projection (computed once per layer; None when not found).
        probe: ``(req_id) -> [Hq, W, D]``, the layer's question-probe queries of a request
            (``adapter/probe.py``).
        value_norms: ``(ScoredRow) -> [Hq, T]``, the layer's projected-value norms of a
            request's resident tokens as written with them (``adapter/value_norms.py``), or
            None where they are not kept (then recomputed from the cache).
    """

    kv: PagedKV
    queries: torch.Tensor
    scale: float
    gram: Callable[[], torch.Tensor | None]
    probe: Callable[[str], torch.Tensor] | None = None
    value_norms: Callable[[ScoredRow], torch.Tensor] | None = None


#: how a statistic measures one layer: per request, or for a batch of them
MeasureRow = Callable[[LayerInputs, ScoredRow], None]
MeasureBatch = Callable[[LayerInputs, RowBatch], None]


@dataclass(frozen=True)
class Statistic:
    """One statistic.

    ``measure(inputs, target)`` records the layer's value (``ScoredRow.record``): a batched
    statistic gets the step's :class:`RowBatch` of the requests that need it (one call for
    all: one ``[R, max_blocks]`` block table, ``[R]`` lengths) and records into each member; a
    per-request one gets one :class:`ScoredRow`.
    """

    name: str
    fields: tuple[str, ...]  # the RequestStatistics fields it fills
    measure: MeasureRow | MeasureBatch  # MeasureBatch when ``batched``
    batched: bool = True
    prefill_only: bool = False  # measured only in the step that completes the prompt
    #: measured inside the attention pass by the plugin's backend on its decode rows (then the
    #: hooks skip it for those requests)
    in_backend: bool = False
    #: how a field's per-layer values combine (``sum`` / ``max``); others are stacked ``[L, ...]``
    reduce: dict[str, str] = field(default_factory=dict)


def _decode_attention(inputs: LayerInputs, sr: ScoredRow) -> None:
    """The attention each resident block got from the newest query, Σ and max over the query
    heads of each KV group (``[Hkv, nb]`` twice, resident order). The torch twin of what the
    plugin's attention backend measures inside its decode pass (``kernels/fused_decode.py``),
    for layers served by any other backend (the CPU one): the softmax runs over the attended
    (kept) tokens; a parked block gets the mass it would get relative to them."""
    kv, bs = inputs.kv, inputs.kv.block_size
    kept, parked = sr.block_ids[~sr.parked], sr.block_ids[sr.parked]
    n_kept = sum(n for n, p in zip(sr.tokens_per_block, sr.parked.tolist()) if not p)
    keys = kv.gather(kept, n_kept)[0]
    parked_keys = kv.gather(parked, parked.numel() * bs)[0] if parked.numel() else None
    query = inputs.queries[sr.q_end - 1]
    blocks = reference.dense_block_attention(query, keys, bs, inputs.scale, parked_keys)
    blocks = blocks[:, sr.device_columns]  # resident order (the step's uploaded columns)
    grouped = blocks.view(kv.num_kv_heads, -1, blocks.shape[-1])
    sr.record("decode_mass", grouped.sum(1))
    sr.record("decode_peak", grouped.amax(1))


def _value_proj_norm(inputs: LayerInputs, batch: RowBatch) -> None:
    """‖v W_O^h‖ of every resident token: as written with the token where the worker keeps
    them, else computed from the cache for the whole batch in one call."""
    if inputs.value_norms is not None:
        for sr in batch.members:
            sr.record(VALUE_PROJ_NORM, inputs.value_norms(sr))  # [Hq, T]
        return
    gram = inputs.gram()
    if gram is None:  # no output projection found: not recorded, the task is reported skipped
        return
    norms = dispatch.value_proj_norm(gram, inputs.kv, batch.block_table, batch.seq_lens)
    for i, sr in enumerate(batch.members):
        sr.record(VALUE_PROJ_NORM, norms[i, :, :sr.num_tokens])  # [Hq, T]


def _window_attention(inputs: LayerInputs, batch: RowBatch) -> None:
    """The last ``window`` prompt queries' attention of every request that needs it, in one
    call (windows padded to the longest, each request's own length in ``batch.window_lens``; the
    window queries are the row's last tokens: checked when the request was resolved)."""
    q_window = inputs.queries[batch.window_index].transpose(1, 2)  # [R, Hq, W, D]
    probs = dispatch.window_attention(q_window, inputs.kv, batch.block_table, batch.seq_lens,
                                      inputs.scale, window_lens=batch.window_lens).probs
    w = q_window.shape[2]
    for i, sr in enumerate(batch.members):
        sr.record(WINDOW_ATTN, probs[i, :, w - sr.window:, :sr.num_tokens])  # [Hq, W_i, T]


def _probe_window_attention(inputs: LayerInputs, sr: ScoredRow) -> None:
    """The observation window of a middle prompt chunk scored by the question probe: the
    probe's queries (the prompt's tail, at its true positions) over every resident token."""
    q = inputs.probe(sr.req_id)[None]  # [1, Hq, W, D]
    probs = dispatch.window_attention(q, inputs.kv, sr.block_table, sr.seq_lens, inputs.scale,
                                      causal=False).probs
    sr.record(WINDOW_ATTN, probs[0, :, :, :sr.num_tokens])  # [Hq, W, T]


#: every statistic, in the order the worker measures them
REGISTRY: tuple[Statistic, ...] = (
    Statistic(DECODE_ATTN, ("decode_mass", "decode_peak"), _decode_attention, batched=False,
              in_backend=True, reduce={"decode_mass": "sum", "decode_peak": "max"}),
    Statistic(VALUE_PROJ_NORM, (VALUE_PROJ_NORM,), _value_proj_norm, prefill_only=True),
    Statistic(WINDOW_ATTN, (WINDOW_ATTN,), _window_attention, prefill_only=True),
)
#: the window statistic of a middle chunk scored by the question probe
PROBE_WINDOW = "probe_window"
#: other ways to measure a statistic of the registry (the same fields), which the worker puts
#: in its place for some requests: name -> (the statistic it stands in for, how)
VARIANTS: dict[str, tuple[str, Statistic]] = {
    PROBE_WINDOW: (WINDOW_ATTN, Statistic(PROBE_WINDOW, (WINDOW_ATTN,), _probe_window_attention,
                                          batched=False, prefill_only=True)),
}
BY_NAME = {s.name: s for s in REGISTRY} | {name: s for name, (_, s) in VARIANTS.items()}
#: what the attention hooks run, in order (a request is hooked for one of a variant's pair)
MEASURED = (*REGISTRY, *(s for _, s in VARIANTS.values()))
FIELD_REDUCE = {f: how for s in REGISTRY for f, how in s.reduce.items()}


def measured(needs, phase: str, in_backend: bool = False) -> list[Statistic]:
    """The statistics the attention hooks measure for a request with these ``needs`` in a step
    of ``phase`` (``"prefill"`` or ``"decode"``); ``in_backend``: its row is a decode row of
    the plugin's backend, which measures its ``in_backend`` statistics itself."""
    return [s for s in REGISTRY if s.name in needs
            and (phase == "prefill" or not s.prefill_only)
            and not (in_backend and s.in_backend)]


def expected_fields(needs, phase: str, in_backend: bool = False) -> set[str]:
    """The ``RequestStatistics`` fields the attention hooks record (see :func:`measured`)."""
    return {f for s in measured(needs, phase, in_backend) for f in s.fields}


def combine_layers(name: str, values: list[torch.Tensor]) -> torch.Tensor:
    """One field's per-layer values as ``RequestStatistics`` holds them.

    Args:
        name: the ``RequestStatistics`` field.
        values: its ``L`` per-layer values, one shape (``[Hkv, nb]``, ``[Hq, T]``, ...).
    Returns:
        Reduced over the layers (``sum`` / ``max`` per :data:`FIELD_REDUCE`: that shape) or
        stacked ``[L, ...]``.
    """
    how = FIELD_REDUCE.get(name)
    stacked = torch.stack(values)
    if how == "sum":
        return stacked.sum(0)
    if how == "max":
        return stacked.amax(0)
    return stacked
