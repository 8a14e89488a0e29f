"""The startup checks: configurations the adapter cannot run exactly are refused by name.

Why a module of its own: ``vllm_internals`` is the list of vLLM internals the adapter touches
(what a vLLM bump must review); these are the checks that use that list's constants when an
engine with a kv_eviction config starts — the vLLM version, the engine config (before the
engine starts), the KV-cache groups and attention layers (at KV-cache init, by the workers),
and the KV pool's capacity with prefill eviction. Each raises :class:`UnsupportedConfigError`
naming every setting it refuses, rather than serving subtly wrong attention.
"""

from __future__ import annotations

import logging
import os

from vllm_kvevict.adapter.vllm_internals import (
    KV_PLANNING_MODULES,
    NATIVE_KV_DTYPES,
    READABLE_LAYOUTS,
    READERS,
    SUPPORTED_VLLM,
)

logger = logging.getLogger("vllm_kvevict")


class UnsupportedConfigError(ValueError):
    """A vLLM configuration the eviction adapter cannot run exactly (refused at startup)."""


def vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


def kv_planning_module():
    """The vLLM module holding ``get_kv_cache_configs`` and the ``_check_enough_kv_cache_memory``
    it calls (a global of that module, so the capacity check is patched there): 0.33's
    ``kv_cache_planning``, else 0.32's ``kv_cache_utils`` (:data:`KV_PLANNING_MODULES`).

    Returns:
        The imported module.
    Raises:
        UnsupportedConfigError when none of :data:`KV_PLANNING_MODULES` has both.
    """
    import importlib

    for name in KV_PLANNING_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        if hasattr(module, "get_kv_cache_configs") and hasattr(
                module, "_check_enough_kv_cache_memory"):
            return module
    raise UnsupportedConfigError(
        "vllm-kvevict: none of " + ", ".join(KV_PLANNING_MODULES) + " defines "
        "get_kv_cache_configs and _check_enough_kv_cache_memory; this vLLM is not one of "
        + ", ".join(p + ".x" for p in SUPPORTED_VLLM))


def check_vllm_version(version: str | None = None) -> None:
    """Refuse a vLLM outside :data:`SUPPORTED_VLLM`.

    Args:
        version: the version string to check (default: the installed vLLM's).
    Raises:
        UnsupportedConfigError naming the supported minor versions and the one found.
    """
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
    kv_transfer = getattr(vllm_config, "kv_transfer_config", None)
    if kv_transfer is not None:
        # a connector saves blocks under their prefix hash and loads hits into later requests:
        # a block computed after an eviction (without the evicted context) could be loaded
        # as a clean hit, and evicted blocks loaded back behind the ledger
        problems.append(
            "a KV connector (kv_transfer_config.kv_connector="
            f"{getattr(kv_transfer, 'kv_connector', None)}: it saves and loads KV blocks "
            "behind the eviction ledger); remove --kv-transfer-config / --kv-offloading-size")
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0") not in ("0", "", "false", "False"):
        problems.append("Model Runner V2 (VLLM_USE_V2_MODEL_RUNNER=1); set it to 0")
    pc = vllm_config.parallel_config
    if getattr(pc, "pipeline_parallel_size", 1) > 1:
        problems.append("pipeline parallelism")
    if getattr(pc, "decode_context_parallel_size", 1) > 1:
        problems.append("decode context parallelism")
    if getattr(pc, "enable_dbo", False):
        # every index the adapter computes per step is a whole-batch row or token index: the
        # scored requests' query rows, the backend's statistics slots, a hybrid full group's
        # compacted lengths; a micro-batch's attention sees only its own rows
        problems.append("dual-batch overlap (--enable-dbo: the eviction statistics and a hybrid "
                        "model's compacted lengths index whole-batch rows, not micro-batch rows)")
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


def _is_plugin_backend() -> bool:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vllm_kvevict.backend import is_ours

    return is_ours(AttentionBackendEnum.CUSTOM)


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
        if backend == "CUSTOM" and not _is_plugin_backend():
            refuse("attention backend CUSTOM registered by another plugin (the plugin's own "
                   "CUSTOM backend is vllm_kvevict.backend)")
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
    logger.info("kv_eviction: KV pool of %d tokens per request < max_model_len %d; accepted "
                "with prefill eviction (peak %d tokens per request)", capacity, max_model_len,
                need)

