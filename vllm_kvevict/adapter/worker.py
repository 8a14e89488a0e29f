"""Worker side: attend over the compacted sequence and measure what the policies need.

The scheduler keeps positional block lists; the worker sees a *compacted* view: the block row
holds only blocks in attention, the attention length is ``seq_len − E`` and new K/V go to slot
``position − E`` (E = excluded tokens of that request). RoPE keeps the original positions, so
stock attention kernels need no change. With E = 0 nothing here touches vLLM's tensors.

A hybrid model (sliding-window layers beside full-attention ones) is evicted in its
full-attention KV-cache group only: that group gets the compacted rows, slot mapping and
lengths; the sliding-window groups attend exactly as in stock vLLM.

This module is the wiring: the class-level patches of vLLM's ``GPUModelRunner`` and the
per-runner :class:`WorkerEviction` they call, with its startup checks. Its three jobs live
one module each, as parts of :class:`WorkerEviction` (the way vLLM's runner takes its
mixins): ``step_inputs`` applies the scheduler's plan before the forward, ``layer_hooks`` runs
inside every attention layer, ``scoring_batch`` turns the statistics into block scores.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

from vllm_kvevict.adapter.layer_hooks import LayerHooks, attention_layers, layer_head_size
from vllm_kvevict.adapter.scoring_batch import StepScoring
from vllm_kvevict.adapter.startup_checks import (
    UnsupportedConfigError,
    check_attention_layers,
    check_kv_cache_config,
)
from vllm_kvevict.adapter.step_inputs import StepInputs
from vllm_kvevict.adapter.transfers import StepTransfers
from vllm_kvevict.config import EvictionConfig, config_from_additional

logger = logging.getLogger("vllm_kvevict")


class WorkerEviction(LayerHooks, StepInputs, StepScoring):
    """Per-runner eviction state; created only when the engine has a kv_eviction config.

    Args:
        runner: vLLM's ``GPUModelRunner`` (read, and its tensors edited, by the parts).
        config: the server's ``EvictionConfig``, or None (no server-wide options).
    """

    def __init__(self, runner, config: EvictionConfig | None = None):
        self.runner = runner
        self.config = config
        #: found by :meth:`check_layers`: the KV-cache group evicted in (the full-attention
        #: one), whether there are others, and whether its layers run the plugin's attention
        #: backend (decode statistics then come from its kernel, ``backend.buffers.active()``)
        self.gid = 0
        self.hybrid = False
        self.fused = False
        LayerHooks.__init__(self)
        StepInputs.__init__(self)
        StepScoring.__init__(self)

    # -- startup -------------------------------------------------------------------------------
    def check_layers(self) -> None:
        """After vLLM's initialize_kv_cache: refuse (by name) attention layers whose cache the
        statistics cannot read, then hook every layer's forward once."""
        runner = self.runner
        groups = runner.kv_cache_config.kv_cache_groups
        self.gid = check_kv_cache_config(runner.kv_cache_config)
        self.hybrid = len(groups) > 1
        layers = attention_layers(runner.vllm_config.compilation_config.static_forward_context,
                                  names=groups[self.gid].layer_names)
        layout = runner.cache_config.get_resolved_kv_cache_layout().name
        block_size = groups[self.gid].kv_cache_spec.block_size
        self.readers = check_attention_layers(layers, layout, block_size)
        self.fused = _fused_backend(layers)
        if self.fused:
            _check_buffer_width(runner.model_config.max_model_len, block_size)
        self._warm_up(layers)
        self._check_rotaries(layers)
        self._keep_value_norms(layers, block_size)
        if not self.hooked:
            self._hook_attention(list(layers))
        if self.hybrid:
            for attn_group in runner.attn_groups[self.gid]:
                self._wrap_metadata(attn_group)

    def _warm_up(self, layers: dict) -> None:
        """On an NVIDIA GPU, compile the serving kernels now (``kernels/warmup.py``): the
        attention backend's decode kernel and the prefill statistics' kernels, on the real
        cache and widths, so no request waits for a Triton compilation."""
        name, layer = next(iter(layers.items()))
        kv = layer.kv_cache[0] if isinstance(layer.kv_cache, list | tuple) else layer.kv_cache
        if self.readers.get(name) != "gpu" or not kv.is_cuda or torch.version.hip is not None:
            return
        from vllm_kvevict.backend import buffers
        from vllm_kvevict.kernels.warmup import warm_up

        stats = buffers.active()
        options = self.config.options if self.config is not None else {}
        window = max(32, int(options.get("window") or 32))  # the server's policy options
        launched = warm_up(kv, layer.impl.num_heads, layer_head_size(layer, kv),
                           self.block_table.block_table.np.shape[1], decode=self.fused,
                           stats=stats.kernel_kwargs() if stats is not None else None,
                           window=window)
        logger.info("kv_eviction: %d Triton kernels compiled at startup", launched)

    # -- what the runner holds -----------------------------------------------------------------
    @property
    def transfers(self) -> StepTransfers:
        """The step's host<->device traffic (made on first use, on the KV cache's device)."""
        made = self.__dict__.get("_transfers")
        if made is None:
            made = self.__dict__["_transfers"] = StepTransfers(getattr(self.runner, "device", "cpu"))
        return made

    @property
    def num_kv_heads(self) -> int:
        """KV heads of this tensor-parallel rank."""
        return self.runner.model_config.get_num_kv_heads(self.runner.parallel_config)

    @property
    def num_heads(self) -> int:
        """Query heads of this tensor-parallel rank."""
        return self.runner.model_config.get_num_attention_heads(self.runner.parallel_config)

    @property
    def block_table(self):
        """The input batch's block table of the evicted (full-attention) group."""
        return self.runner.input_batch.block_table[self.gid]


def _check_buffer_width(max_model_len: int, block_size: int) -> None:
    """The statistics buffers were sized at load time from the cache config's block size; the
    evicted group's real block size must not need more blocks per request (else a request's
    last blocks would have no statistics)."""
    from vllm_kvevict.backend import buffers

    need = -(-max_model_len // block_size)
    if buffers.active().max_blocks < need:
        raise UnsupportedConfigError(
            f"kv_eviction: the attention backend's statistics buffers hold "
            f"{buffers.active().max_blocks} blocks per request, the evicted KV-cache group needs "
            f"{need} ({max_model_len} tokens in blocks of {block_size}); set --block-size "
            f"explicitly")


def _fused_backend(layers: dict) -> bool:
    """Whether the evicted group's layers run the plugin's attention backend (all or none:
    a mix is refused by name), and its statistics buffers exist."""
    from vllm_kvevict.backend import NAME, buffers

    ours = [name for name, layer in layers.items() if layer.attn_backend.get_name() == NAME]
    if not ours:
        return False
    if len(ours) != len(layers):
        raise UnsupportedConfigError(
            f"kv_eviction: {len(ours)} of {len(layers)} evicted attention layers run the "
            f"plugin's attention backend ({NAME}); all or none must")
    if buffers.active() is None:
        raise UnsupportedConfigError(
            "kv_eviction: the attention layers run the plugin's backend but its statistics "
            "buffers were not allocated when the model was loaded")
    return True


# -- class-level patches, inert unless the runner's engine has a kv_eviction config ------------
def _eviction(runner) -> WorkerEviction | None:
    state = runner.__dict__.get("_kvevict")
    if state is None:
        config = config_from_additional(getattr(runner.vllm_config, "additional_config", None))
        state = WorkerEviction(runner, config) if config is not None else False
        runner.__dict__["_kvevict"] = state
    return state or None


def install_runner_hooks() -> None:
    """Patch ``GPUModelRunner`` (once per process): each hook calls vLLM's method, then the
    runner's :class:`WorkerEviction` if its engine has a kv_eviction config."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner, "_kvevict_hooked", False):
        return
    update_states = GPUModelRunner._update_states
    prepare_inputs = GPUModelRunner._prepare_inputs
    determine_execution = GPUModelRunner._determine_batch_execution_and_padding
    execute_model = GPUModelRunner.execute_model
    sample_tokens = GPUModelRunner.sample_tokens
    initialize_kv_cache = GPUModelRunner.initialize_kv_cache
    load_model = GPUModelRunner.load_model

    def load_model_hook(self, *a, **k):
        result = load_model(self, *a, **k)
        ev = _eviction(self)
        if ev is not None:
            from vllm_kvevict.backend import buffers

            made = buffers.allocate(self.vllm_config, ev.config, self.device)
            if made is not None:
                logger.info("kv_eviction: attention backend statistics buffers: %.1f MiB "
                            "(%d KiB per scored request), before the KV pool is sized",
                            made.nbytes / 2**20, made.bytes_per_request() // 1024)
        return result

    def initialize_kv_cache_hook(self, *a, **k):
        result = initialize_kv_cache(self, *a, **k)
        ev = _eviction(self)
        if ev is not None:
            ev.check_layers()
        return result

    def _update_states_hook(self, scheduler_output, *a, **k):
        result = update_states(self, scheduler_output, *a, **k)
        ev = _eviction(self)
        if ev is not None:
            ev.begin_step(scheduler_output)
        return result

    def _prepare_inputs_hook(self, scheduler_output, num_scheduled_tokens, *a, **k):
        result = prepare_inputs(self, scheduler_output, num_scheduled_tokens, *a, **k)
        ev = _eviction(self)
        if ev is not None:
            ev.fix_inputs(num_scheduled_tokens)
        return result

    def _determine_execution_hook(self, *a, **k):
        ev = _eviction(self)
        if ev is None or not ev.needs_eager_attention:
            return determine_execution(self, *a, **k)
        with without_full_cudagraphs(self.cudagraph_dispatcher):
            return determine_execution(self, *a, **k)

    def execute_model_hook(self, *a, **k):
        output = execute_model(self, *a, **k)
        ev = _eviction(self)
        if ev is not None:
            ev.finish_step()
            ev.attach_scores(output)
        return output

    def sample_tokens_hook(self, *a, **k):
        output = sample_tokens(self, *a, **k)
        ev = _eviction(self)
        if ev is not None:
            ev.attach_scores(output)
        return output

    GPUModelRunner.initialize_kv_cache = initialize_kv_cache_hook
    GPUModelRunner.load_model = load_model_hook
    GPUModelRunner._update_states = _update_states_hook
    GPUModelRunner._prepare_inputs = _prepare_inputs_hook
    GPUModelRunner._determine_batch_execution_and_padding = _determine_execution_hook
    GPUModelRunner.execute_model = execute_model_hook
    GPUModelRunner.sample_tokens = sample_tokens_hook
    GPUModelRunner._kvevict_hooked = True


@contextmanager
def without_full_cudagraphs(dispatcher):
    """Within the block, ``dispatcher.dispatch`` never picks a FULL CUDA graph.

    A full graph replays the whole forward with no Python, so the ``impl.forward`` hooks that
    measure attention statistics would not run. The step then gets the mode vLLM itself uses
    when a full graph is not allowed (e.g. encoder-decoder steps with encoder outputs): a
    PIECEWISE graph where one was captured (attention runs eagerly between the pieces), else
    eager. vLLM's KV-cache writes and the compacted seq_lens/slot mapping are unaffected.

    Args:
        dispatcher: the runner's ``CudagraphDispatcher`` (its instance ``dispatch`` is wrapped
            for the block, then restored).
    """
    from vllm.config import CUDAGraphMode

    dispatch, own = dispatcher.dispatch, "dispatch" in vars(dispatcher)

    def no_full(*args, invalid_modes=None, **kwargs):
        invalid = set(invalid_modes or ()) | {CUDAGraphMode.FULL}
        return dispatch(*args, invalid_modes=invalid, **kwargs)

    dispatcher.dispatch = no_full
    try:
        yield
    finally:
        if own:
            dispatcher.dispatch = dispatch
        else:
            del dispatcher.dispatch  # back to the class's method
