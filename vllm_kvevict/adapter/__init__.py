"""All vLLM glue lives in this package (see ``vllm_internals`` for the full list of internals).

``install()`` is idempotent and cheap; every hook it installs checks the engine's config and
stays inert unless ``additional_config`` has a ``kv_eviction`` entry.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm_kvevict")

SCHEDULER_CLS = "vllm_kvevict.adapter.scheduler.EvictingScheduler"
_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    from vllm_kvevict.adapter.cli_args import install_cli
    from vllm_kvevict.adapter.worker import install_runner_hooks
    from vllm_kvevict.backend import register as register_backend
    from vllm_kvevict.metrics import install_multiprocess_hook

    install_cli()
    register_backend()  # every process: the workers resolve CUSTOM through it
    install_multiprocess_hook()
    _install_engine_config_hook()
    _install_capacity_check()
    _install_request_validation()
    install_runner_hooks()


def _install_engine_config_hook() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config

    def create_engine_config(self, *args, **kwargs):
        from vllm_kvevict.adapter.startup_checks import (
            UnsupportedConfigError,
            check_engine_config,
            pin_v1_model_runner,
        )
        from vllm_kvevict.config import config_from_additional

        config = config_from_additional(self.additional_config)  # ValueError names the field
        if config is not None:
            if self.async_scheduling:
                raise UnsupportedConfigError(
                    "kv_eviction needs synchronous scheduling (scores must reach the scheduler "
                    "before its next decision); remove --async-scheduling"
                )
            self.async_scheduling = False
            if self.scheduler_cls not in (None, SCHEDULER_CLS):
                raise UnsupportedConfigError(
                    f"kv_eviction replaces the scheduler; --scheduler-cls {self.scheduler_cls!r} "
                    "cannot be combined with it"
                )
            self.scheduler_cls = SCHEDULER_CLS
            pin_v1_model_runner()
        vllm_config = original(self, *args, **kwargs)
        if config is not None:
            from vllm_kvevict.backend.selection import select_attention_backend

            check_engine_config(vllm_config)
            selection = select_attention_backend(vllm_config, config)
            log_cudagraph_plan(vllm_config.compilation_config, fused=selection.fused)
            from vllm_kvevict.metrics import register_collector

            register_collector()  # before the engine core starts: it inherits the directory
            logger.info("kv_eviction enabled: %s", config.model_dump())
        return vllm_config

    EngineArgs.create_engine_config = create_engine_config


def _install_capacity_check() -> None:
    """Prefill eviction bounds what one request holds, so the engine may start with a KV pool
    smaller than ``max_model_len``: vLLM's check is replaced, for that one call of
    ``get_kv_cache_configs`` in the engine core, by ``check_prefill_capacity``. The check is
    a global of the module that defines ``get_kv_cache_configs`` (``kv_planning_module``:
    0.33's ``kv_cache_planning``, 0.32's ``kv_cache_utils``), so it is replaced there."""
    import functools

    import vllm.v1.engine.core as core

    original = core.get_kv_cache_configs
    if getattr(original, "_kvevict", False):
        return

    def get_kv_cache_configs(vllm_config, *args, **kwargs):
        from vllm_kvevict.adapter.startup_checks import check_prefill_capacity, kv_planning_module
        from vllm_kvevict.config import config_from_additional

        config = config_from_additional(getattr(vllm_config, "additional_config", None))
        specs = kwargs.get("kv_cache_specs", args[0] if args else [])
        if config is not None and needs_value_norms(config):
            args, kwargs = _with_norms_memory(vllm_config, specs, args, kwargs)
        if (config is None or not config.prefill_eviction
                or not all(_full_attention_only(worker) for worker in specs)):
            return original(vllm_config, *args, **kwargs)
        planning = kv_planning_module()
        vllm_check = planning._check_enough_kv_cache_memory
        planning._check_enough_kv_cache_memory = functools.partial(
            check_prefill_capacity, vllm_config, config, vllm_check)
        try:
            return original(vllm_config, *args, **kwargs)
        finally:
            planning._check_enough_kv_cache_memory = vllm_check

    get_kv_cache_configs._kvevict = True
    core.get_kv_cache_configs = get_kv_cache_configs


def needs_value_norms(config) -> bool:
    """The server's default policy reads the projected-value norms (``adapter/value_norms.py``:
    then they are kept per KV slot, and their memory comes out of the KV budget)."""
    from vllm_kvevict.policies import get_policy
    from vllm_kvevict.policies.base import VALUE_PROJ_NORM

    return config.enabled and VALUE_PROJ_NORM in get_policy(config.policy, config.options).needs


def _with_norms_memory(vllm_config, specs, args, kwargs):
    """``get_kv_cache_configs``' arguments with each worker's ``available_memory`` shrunk by
    the share the projected-value norms take (``L x Hq`` float32 per token beside the KV)."""
    from vllm_kvevict.adapter.value_norms import kv_share

    memory = kwargs["available_memory"] if "available_memory" in kwargs else args[1]
    heads = vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config)
    shrunk = []
    for worker, available in zip(specs, memory):
        kv = sum(spec.page_size_bytes / spec.block_size for spec in worker.values())
        full = sum(1 for spec in worker.values() if _full_attention_only({"": spec}))
        shrunk.append(int(available * kv_share(kv, full, heads)))
    logger.info("kv_eviction: the projected-value norms take %.1f MiB of the KV memory",
                (sum(memory) - sum(shrunk)) / 2**20)
    if "available_memory" in kwargs:
        return args, {**kwargs, "available_memory": shrunk}
    return (args[0], shrunk, *args[2:]), kwargs


def _full_attention_only(kv_cache_spec: dict) -> bool:
    """Every layer of one worker's ``{layer: KVCacheSpec}`` is plain full attention (hybrid
    models keep vLLM's check: their sliding-window groups are not bounded by the budget)."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    return all(isinstance(spec, FullAttentionSpec) and not isinstance(spec, SlidingWindowSpec)
               for spec in kv_cache_spec.values())


def scoring_cudagraph_mode(compilation_config):
    """The CUDA-graph mode of steps whose statistics the attention hooks measure, for a
    configured mode.

    The engine keeps the mode the user (or vLLM's optimization level: FULL_AND_PIECEWISE on
    NVIDIA at -O2/-O3) configured; only steps whose scored requests need statistics the hooks
    measure are dispatched without FULL graphs (``worker.without_full_cudagraphs``): PIECEWISE
    where piecewise graphs are captured, else eager (NONE). With the plugin's attention
    backend those are the prefill scorings only (observation window, once per request); its
    kernel measures decode statistics inside FULL graphs.
    """
    from vllm.config import CUDAGraphMode

    mode = compilation_config.cudagraph_mode
    if mode is None or mode == CUDAGraphMode.NONE:
        return CUDAGraphMode.NONE
    if mode.has_piecewise_cudagraphs():
        return CUDAGraphMode.PIECEWISE
    return CUDAGraphMode.NONE


def log_cudagraph_plan(compilation_config, fused: bool = False) -> None:
    from vllm.config import CUDAGraphMode

    mode = compilation_config.cudagraph_mode
    scoring = scoring_cudagraph_mode(compilation_config)
    if fused:
        logger.info("kv_eviction: cudagraph_mode %s; decode steps keep it (the attention "
                    "backend measures their statistics), prefill scorings run as %s",
                    getattr(mode, "name", mode), scoring.name)
        return
    if mode is not None and mode.has_full_cudagraphs() and scoring == CUDAGraphMode.NONE:
        logger.warning(
            "kv_eviction: cudagraph_mode %s captures no piecewise graphs, so steps that measure "
            "attention statistics run eagerly; FULL_AND_PIECEWISE (the default) runs them as "
            "piecewise graphs instead", mode.name)
    else:
        logger.info("kv_eviction: cudagraph_mode %s; steps that measure attention statistics "
                    "run as %s", getattr(mode, "name", mode), scoring.name)


def validate_request(vllm_config, params) -> None:
    """Front-end check of a request's ``kv_eviction`` options; raises ``VLLMValidationError``
    (HTTP 400 naming the field) so a bad request never reaches the engine core."""
    from vllm.exceptions import VLLMValidationError

    from vllm_kvevict.config import CONFIG_KEY, config_from_additional, request_overrides

    try:
        overrides = request_overrides(getattr(params, "extra_args", None))
        if overrides is None:
            return
        default = config_from_additional(getattr(vllm_config, "additional_config", None))
        if default is None:
            raise ValueError(
                f"{CONFIG_KEY}: this server runs without KV eviction (start it with "
                "--kv-eviction POLICY); per-request kv_eviction options are not accepted"
            )
        config = default.with_overrides(overrides)
        check_request_peak(vllm_config, default, config)
    except ValueError as exc:
        raise VLLMValidationError(str(exc), parameter=CONFIG_KEY) from None


def check_request_peak(vllm_config, default, config) -> None:
    """With prefill eviction on the server the KV pool may be smaller than ``max_model_len``
    (it was sized for the server default's peak), so a request's options may not let it hold
    more KV at once than the default does (a larger budget, or prefill eviction off): such a
    request could never be scheduled. Raises ``ValueError`` naming the field."""
    from vllm_kvevict.config import CONFIG_KEY

    if not (default.enabled and default.prefill_eviction):
        return
    max_len = vllm_config.model_config.max_model_len
    chunk = vllm_config.scheduler_config.max_num_batched_tokens
    bs = vllm_config.cache_config.block_size
    allowed = default.peak_blocks(max_len, chunk, bs)
    wanted = config.peak_blocks(max_len, chunk, bs)
    if wanted > allowed:
        field = ("prefill_eviction" if not (config.enabled and config.prefill_eviction)
                 else "policy" if not config.enabled
                 else "floor_tokens" if config.floor_tokens > default.floor_tokens
                 else "budget")
        raise ValueError(
            f"{CONFIG_KEY}.{field}: this server evicts during prefill, so its KV pool need only "
            f"hold the default budget's peak per request; these options let a request hold up to "
            f"{wanted * bs} tokens of KV at once (the default: {allowed * bs}); keep "
            "prefill_eviction on and the budget at most the server's")


def _install_request_validation() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor._validate_params

    def _validate_params(self, params, *args, **kwargs):
        result = original(self, params, *args, **kwargs)
        validate_request(self.vllm_config, params)
        return result

    InputProcessor._validate_params = _validate_params
