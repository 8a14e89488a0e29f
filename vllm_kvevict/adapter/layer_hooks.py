"""The worker's hooks around each attention layer's ``impl.forward``, and what they read.

Why a module of its own: this is the only code that runs inside the model's forward, once per
attention layer, and the only code that reads vLLM's KV-cache tensors. Each hook calls the
backend first (its output is always the one the model uses), then, where the step needs it,
writes the projected-value norms of the tokens just written (``adapter/value_norms.py``),
keeps the question probes' queries (``adapter/probe.py``) and measures the statistics of the
step's scored requests (``adapter/statistics.py``) over the layer's cache, read through a
layout checked at startup and never guessed. The layer facts the hooks need (which layers,
their readers, rotary embeddings, output-projection Gram matrices) are found here too.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import torch

from vllm_kvevict.adapter import probe as question_probe
from vllm_kvevict.adapter import statistics
from vllm_kvevict.adapter.protocol import ProbeTask
from vllm_kvevict.adapter.scoring_batch import ScoredRequest, ScoringBatch
from vllm_kvevict.adapter.value_norms import ValueNormCache
from vllm_kvevict.kernels import dispatch
from vllm_kvevict.kernels.paged import PagedKV, cpu_kv_view, detect_cpu_key_layout

logger = logging.getLogger("vllm_kvevict")

_LAYER_INDEX = re.compile(r"\.(\d+)\.")
#: names of an attention module's output projection across vLLM's model families
_OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "dense", "c_proj")


class KeyLayoutError(RuntimeError):
    """The KV cache layout is not one this adapter knows how to read."""


class LayerHooks:
    """The attention-layer side of ``WorkerEviction``: hooks installed once at startup, run in
    every layer call.

    It owns the layer facts (:attr:`readers`, :attr:`layer_names`, :attr:`rotaries`,
    :attr:`grams`, :attr:`key_layout`), the value-norm tables (:attr:`norms`) and the probes'
    kept queries (:attr:`probe_queries`); it reads the step's ``scored`` requests and
    ``step_probes`` (``step_inputs``) and their batches (``scoring_batch``).
    """

    # of the other parts of WorkerEviction
    runner: Any
    config: Any  # config.EvictionConfig | None
    scored: list[ScoredRequest]
    step_probes: list[tuple[ProbeTask, torch.Tensor]]
    _batches: Callable[[], dict[str, ScoringBatch]]  # StepScoring's

    def __init__(self) -> None:
        self.hooked = False
        #: layer name -> "gpu" | "cpu": how its KV cache is read (checked at KV-cache init)
        self.readers: dict[str, str] = {}
        #: the hooked layers' names, layer order (a layer's index is its place here)
        self.layer_names: list[str] = []
        self.key_layout: str | None = None  # CPU backend: "cpu" or "cpu_t" (AVX2 hosts)
        #: layer index -> ``[Hq, D, D]`` Gram matrices of its output projection, or None
        self.grams: dict[int, torch.Tensor | None] = {}
        #: question probes (``adapter/probe.py``): parent req_id -> {layer index: [Hq, W, D]}
        #: queries, kept until the parent's prompt is computed; layer index -> its rotary
        #: embedding, or None where turning queries by position is not exact (checked at startup)
        self.probe_queries: dict[str, dict[int, torch.Tensor]] = {}
        self.rotaries: dict[int, Any] = {}
        #: the projected-value norms per KV slot (``adapter/value_norms.py``), on a server
        #: whose default policy reads them; else None (recomputed at scoring)
        self.norms: ValueNormCache | None = None

    # -- startup -------------------------------------------------------------------------------
    def _hook_attention(self, names: list[str]) -> None:
        """Wrap ``impl.forward`` of the layers ``names`` (the evicted group's, layer order).

        The backend's own attention output is always the one the model uses. The hooks measure
        what that backend does not: the observation window at prefill (once per request), and,
        for layers served by any backend but the plugin's own (vLLM's CPU backend here; a
        backend the user chose on a GPU), the decode statistics too, by their torch twin
        reading the layer's K/V a second time. With the plugin's backend the decode rows'
        statistics come from its kernel (``sr.slot``), so decode steps run no hook work and
        may replay FULL CUDA graphs, where no Python runs.
        """
        ctx = self.runner.vllm_config.compilation_config.static_forward_context
        for index, name in enumerate(names):
            impl = ctx[name].impl
            original = impl.forward

            def forward(layer, query, key, value, kv_cache, attn_metadata, *a,
                        _orig=original, _index=index, _name=name, **kw):
                out = _orig(layer, query, key, value, kv_cache, attn_metadata, *a, **kw)
                if attn_metadata is not None and self.norms is not None:
                    self._write_value_norms(_index, value, kv_cache, attn_metadata)
                if attn_metadata is not None and self.step_probes:
                    self._keep_probe_queries(_index, layer, query)
                if attn_metadata is not None and any(sr.hooked for sr in self.scored):
                    self._measure_layer(_index, _name, layer, query, key, kv_cache)
                return out

            impl.forward = forward
        self.hooked = True
        self.layer_names = names

    def _keep_value_norms(self, layers: dict, block_size: int) -> None:
        """On a server whose default policy reads the projected-value norms: their per-slot
        tables (the memory was taken from the KV budget) and every layer's Gram matrices now,
        so the writes in the layer calls compute nothing else."""
        from vllm_kvevict.adapter import needs_value_norms

        if self.config is None or not needs_value_norms(self.config) or self.norms is not None:
            return
        grams = [self._gram(i, name, layer.impl.num_heads) for i, (name, layer) in
                 enumerate(layers.items())]
        if any(g is None for g in grams):
            return  # no output projection found: scored without the norms (reported skipped)
        num_blocks = self.runner.kv_cache_config.num_blocks
        self.norms = ValueNormCache(len(layers), num_blocks * block_size,
                                    next(iter(layers.values())).impl.num_heads,
                                    self.runner.device)

    def _check_rotaries(self, layers: dict) -> None:
        """Each layer's rotary embedding, where turning a query by position is exact (the
        question probe's condition, checked once at startup); else the probe is not used."""
        model = self.runner.get_model()
        for index, (name, layer) in enumerate(layers.items()):
            rotary = question_probe.find_rotary(model, name)
            head_size = getattr(layer.impl, "head_size", None) or layer.head_size
            ok = question_probe.rotation_composes(rotary, head_size, layer.impl.num_heads,
                                                  self.runner.device)
            self.rotaries[index] = rotary if ok else None
        if not all(self.rotaries.values()):
            logger.info("kv_eviction: this model's rotary embeddings cannot turn queries to "
                        "other positions exactly; prefill_query='probe' scores the prompt's "
                        "chunks by their own queries")

    @property
    def probes_usable(self) -> bool:
        """Every hooked layer's rotary embedding turns queries by position exactly."""
        return bool(self.rotaries) and all(r is not None for r in self.rotaries.values())

    def _gram(self, index: int, name: str, hq: int) -> torch.Tensor | None:
        """Per-head Gram matrices G_h = W_O^h W_O^hᵀ of this layer's output projection (the
        attention module's ``o_proj``, ``out_proj``, ``dense`` or ``c_proj``), or None when the
        model names it otherwise: the statistic is then not measured and the scoring task is
        reported as skipped instead of failing the step."""
        if index not in self.grams:
            model, parent = self.runner.get_model(), name.rsplit(".", 1)[0]
            gram = None
            for child in _OUTPUT_PROJECTIONS:
                try:
                    o_proj = model.get_submodule(f"{parent}.{child}")
                except AttributeError:
                    continue
                # [hidden, Hq*D]: this rank's heads
                gram = dispatch.wo_gram(_linear_weight(o_proj), hq)
                break
            self.grams[index] = gram
        return self.grams[index]

    # -- in every layer call -------------------------------------------------------------------
    def _write_value_norms(self, index: int, value: torch.Tensor, kv_cache, attn_metadata) -> None:
        slots = getattr(attn_metadata, "slot_mapping", None)
        if slots is None:
            return
        dtype = kv_cache.dtype if isinstance(kv_cache, torch.Tensor) else value.dtype
        self.norms.write(index, value.to(dtype), slots, self.grams[index])

    def _keep_probe_queries(self, index: int, layer, query: torch.Tensor) -> None:
        """Keep this layer's queries of the step's question probes, turned to the positions
        their tail has in the parent prompt (``[Hq, W, D]`` per layer)."""
        queries = query.view(query.shape[0], layer.impl.num_heads, -1)
        for task, rows in self.step_probes:
            turned = question_probe.turn_queries(self.rotaries[index], queries[rows].float(),
                                                 task.shift)
            self.probe_queries[task.parent][index] = turned.to(query.dtype).transpose(0, 1).contiguous()

    def _measure_layer(self, index: int, name: str, layer, query: torch.Tensor,
                       key: torch.Tensor, kv_cache: torch.Tensor) -> None:
        """Record this layer's statistics of every scored request: one ``dispatch`` call per
        statistic for all the requests that need it (the Triton kernels on NVIDIA GPUs, their
        torch references elsewhere); the observation window, whose length differs per
        request, one call per request at prefill.

        Args:
            query: ``[num_tokens, Hq * D]`` (or ``[num_tokens, Hq, D]``) this step's queries.
            key: ``[num_tokens, Hkv * D]`` this step's keys.
            kv_cache: the layer's cache, as vLLM hands it to ``impl.forward``.
        """
        reader = self.readers.get(name)
        if reader is None:  # never guess a layout: a wrong view gives plausible garbage
            raise KeyLayoutError(f"kv_eviction: layer {name} was not checked at startup")
        kv = self._paged_kv(kv_cache, key, reader, layer_head_size(layer, kv_cache))
        hq = layer.impl.num_heads
        inputs = statistics.LayerInputs(
            kv=kv, queries=query.view(-1, hq, kv.head_dim), scale=layer.impl.scale,
            gram=lambda: self._gram(index, name, hq),
            probe=lambda req_id: self.probe_queries[req_id][index],
            value_norms=None if self.norms is None else (
                lambda sr: self.norms.gather(index, sr.block_table[0], sr.num_tokens,
                                             kv.block_size)))
        batches = self._batches()
        for stat in statistics.MEASURED:
            if stat.batched:
                if stat.name in batches:
                    stat.measure(inputs, batches[stat.name])
                continue
            for sr in self.scored:
                if stat.name in sr.hooked:
                    stat.measure(inputs, sr)

    def _paged_kv(self, kv_cache: torch.Tensor, key: torch.Tensor, reader: str,
                  head_size: int) -> PagedKV:
        """One layer's cache as logical ``[num_blocks, block_size, Hkv, D]`` key/value views.

        Args:
            kv_cache: the layer's cache as vLLM hands it to ``impl.forward``: on the GPU
                backends (reader ``"gpu"``) ``[num_blocks, Hkv, block_size, 2*D]`` in any
                ``KVCacheLayout`` stride order, K and V side by side in the last axis; on the
                CPU backend (``"cpu"``) the same shape packing a key tile and a value tile per
                (block, head), keys possibly transposed per block (detected once, from the
                newest key just written: AVX2 hosts store them ``[D, block_size]``).
            key: ``[num_tokens, Hkv * D]`` this step's keys (CPU layout detection).
            reader: from :func:`~vllm_kvevict.adapter.startup_checks.check_attention_layers`
                at startup.
            head_size: D.
        Returns:
            The layer's :class:`~vllm_kvevict.kernels.paged.PagedKV`.
        Raises:
            KeyLayoutError for anything else: refused rather than misread.
        """
        if kv_cache.dim() != 4:
            raise KeyLayoutError(f"kv_eviction: unsupported KV cache shape {tuple(kv_cache.shape)}")
        if reader == "gpu":
            try:
                return PagedKV.from_vllm(kv_cache, head_size)
            except ValueError as exc:
                raise KeyLayoutError(f"kv_eviction: {exc}") from exc
        if reader != "cpu":
            raise KeyLayoutError(f"kv_eviction: no reader {reader!r} for this KV cache")
        view = cpu_kv_view(kv_cache)  # [num_blocks, Hkv, 2*bs, D]
        if self.key_layout is None:
            sr = self.scored[0]
            new_key = key.view(-1, view.shape[1], view.shape[3])[sr.q_end - 1]
            self.key_layout = _detect_layout(view, sr, new_key)
        return PagedKV.from_cpu(view, self.key_layout)


def _detect_layout(kv_view: torch.Tensor, sr: ScoredRequest, new_key: torch.Tensor) -> str:
    """``cpu`` or ``cpu_t``: the CPU layout in which the newest token's slot holds ``new_key``.

    ``kv_view`` is the ``[num_blocks, Hkv, 2*bs, D]`` view. Refuses to score when neither
    (or both) layouts match.
    """
    bs = kv_view.shape[2] // 2
    slot = int(sr.block_ids[-1]) * bs + sr.tokens_per_block[-1] - 1
    try:
        return detect_cpu_key_layout(kv_view, new_key, slot)
    except ValueError as exc:
        raise KeyLayoutError(f"kv_eviction: cannot read keys from the KV cache: {exc}") from exc


def _linear_weight(linear) -> torch.Tensor:
    """``[out, in]`` weight of a vLLM linear layer (this rank's shard), as the layer applies it.

    A plain unquantised weight is used as is. Otherwise — vLLM's CPU backend packs weights for
    its GEMM library and leaves ``weight`` empty; quantised methods (FP8, AWQ, GPTQ...) keep
    packed or scaled tensors, some transposed — the weight is read back by applying the layer's
    own GEMM (no bias, no TP all-reduce) to the identity: row ``i`` of ``I · Wᵀ`` is column
    ``i`` of the weight the layer really multiplies by (dequantised), exact for a plain one.
    """
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    weight = getattr(linear, "weight", None)
    if (isinstance(linear.quant_method, UnquantizedLinearMethod) and weight is not None
            and weight.dim() == 2 and weight.numel()
            and weight.dtype in (torch.float16, torch.bfloat16, torch.float32)):
        return weight.detach()
    device = next(iter(linear.parameters())).device if weight is None else weight.device
    eye = torch.eye(linear.input_size_per_partition, dtype=linear.params_dtype, device=device)
    return linear.quant_method.apply(linear, eye).t()


def attention_layers(ctx: dict, names=None) -> dict:
    """Attention layers with a KV cache from ``static_forward_context``, in layer order.

    Args:
        ctx: ``compilation_config.static_forward_context`` (layer name -> module).
        names: only these (one KV-cache group's ``layer_names``), or None for all.
    Returns:
        ``{layer name: Attention layer}`` sorted by the layer index in the name.
    """
    def index(name: str) -> int:
        match = _LAYER_INDEX.search(name + ".")
        return int(match.group(1)) if match else 0

    wanted = None if names is None else set(names)
    names = sorted((n for n, layer in ctx.items()
                    if hasattr(layer, "impl") and hasattr(layer, "kv_cache")
                    and (wanted is None or n in wanted)), key=index)
    return {n: ctx[n] for n in names}


def layer_head_size(layer, kv_cache: torch.Tensor) -> int:
    """D of a layer: its impl's ``head_size``, else half the cache's last axis."""
    size = getattr(layer.impl, "head_size", None)
    return int(size) if size else kv_cache.shape[-1] // 2

