"""The statistics the workers measure inside attention, each declared once.

A statistic is a name policies list in ``needs`` (``policies.base``), the ``RequestStats``
fields it fills, when it is measured, and how one layer's value is computed from the paged KV
cache through ``kernels.dispatch`` (the Triton kernel on NVIDIA GPUs, its torch reference in
``kernels.reference`` elsewhere). The worker runs every statistic of :data:`REGISTRY` at every
attention layer for the requests that need it; adding a statistic is one entry here, its
kernel and reference, and its ``RequestStats`` field.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vllm_kvevict.kernels import dispatch
from vllm_kvevict.policies.base import (
    DECODE_ATTN,
    KEY_BOUNDS,
    QUERY,
    VALUE_PROJ_NORM,
    WINDOW_ATTN,
)


@dataclass
class LayerInputs:
    """What one attention layer hands the statistics in one step.

    Attributes:
        kv: the layer's cache as logical ``[num_blocks, block_size, Hkv, D]`` views.
        queries: ``[num_tokens, Hq, D]`` this step's queries.
        scale: the layer's softmax scale.
        gram: ``() -> [Hq, D, D] | None``, the per-head Gram matrices ``W_O^h W_O^hᵀ`` of the
            layer's output projection (computed once per layer; None when not found).
    """

    kv: Any  # kernels.paged.PagedKV
    queries: torch.Tensor
    scale: float
    gram: Callable[[], torch.Tensor | None]


@dataclass(frozen=True)
class Statistic:
    """One statistic.

    ``measure(inputs, target)`` records the layer's value (``sr.record(field, value)``): a
    batched statistic gets the step's ``_Batch`` of the requests that need it (one call for
    all: one ``[R, max_blocks]`` block table, ``[R]`` lengths) and records into each member; a
    per-request one gets one ``ScoredRequest``.
    """

    name: str
    fields: tuple[str, ...]  # the RequestStats fields it fills
    measure: Callable[[LayerInputs, Any], None]
    batched: bool = True
    prefill_only: bool = False  # measured only in the step that completes the prompt


def _decode_attention(inputs: LayerInputs, b) -> None:
    probs = dispatch.decode_attention(inputs.queries[b.newest], inputs.kv, b.block_table,
                                      b.seq_lens, inputs.scale, token_probs=True).token_probs
    for i, sr in enumerate(b.members):
        sr.record(DECODE_ATTN, probs[i, :, :sr.num_tokens])  # [Hq, T]


def _query(inputs: LayerInputs, b) -> None:
    newest = inputs.queries[b.newest].float() * inputs.scale
    for i, sr in enumerate(b.members):
        sr.record(QUERY, newest[i])  # [Hq, D]


def _value_proj_norm(inputs: LayerInputs, b) -> None:
    gram = inputs.gram()
    if gram is None:  # no output projection found: not recorded, the task is reported skipped
        return
    norms = dispatch.value_proj_norm(gram, inputs.kv, b.block_table, b.seq_lens)
    for i, sr in enumerate(b.members):
        sr.record(VALUE_PROJ_NORM, norms[i, :, :sr.num_tokens])  # [Hq, T]


def _key_bounds(inputs: LayerInputs, b) -> None:
    kmin, kmax = dispatch.key_bounds(inputs.kv, b.block_table, b.seq_lens)  # [R, nb, Hkv, D]
    for i, sr in enumerate(b.members):
        nb = sr.block_ids.numel()
        sr.record("key_min", kmin[i, :nb].transpose(0, 1).float())  # [Hkv, nb, D]
        sr.record("key_max", kmax[i, :nb].transpose(0, 1).float())


def _window_attention(inputs: LayerInputs, sr) -> None:
    """The last ``window`` prompt queries' attention; their number differs per request, so one
    call per request (the window queries are the row's last tokens: checked when the request
    was resolved)."""
    w = min(sr.policy.window or 32, sr.q_end - sr.q_start)
    q_window = inputs.queries[sr.q_end - w: sr.q_end].transpose(0, 1)[None]  # [1, Hq, W, D]
    probs = dispatch.window_attention(q_window, inputs.kv, sr.block_table, sr.seq_lens,
                                      inputs.scale).probs
    sr.record(WINDOW_ATTN, probs[0, :, :, :sr.num_tokens])  # [Hq, W, T]


#: every statistic, in the order the worker measures them
REGISTRY: tuple[Statistic, ...] = (
    Statistic(DECODE_ATTN, (DECODE_ATTN,), _decode_attention),
    Statistic(QUERY, (QUERY,), _query),
    Statistic(VALUE_PROJ_NORM, (VALUE_PROJ_NORM,), _value_proj_norm),
    Statistic(KEY_BOUNDS, ("key_min", "key_max"), _key_bounds),
    Statistic(WINDOW_ATTN, (WINDOW_ATTN,), _window_attention, batched=False, prefill_only=True),
)
BY_NAME = {s.name: s for s in REGISTRY}


def expected_fields(needs, phase: str) -> set[str]:
    """The ``RequestStats`` fields the attention hooks record for a request with these
    ``needs`` in a step of ``phase`` (``"prefill"`` or ``"decode"``)."""
    return {f for name in needs for f in BY_NAME[name].fields
            if phase == "prefill" or not BY_NAME[name].prefill_only}
