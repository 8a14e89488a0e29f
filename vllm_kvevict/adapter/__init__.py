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
    from vllm_kvevict.metrics import install_multiprocess_hook

    install_cli()
    install_multiprocess_hook()
    _install_engine_config_hook()
    _install_request_validation()
    install_runner_hooks()


def _install_engine_config_hook() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config

    def create_engine_config(self, *args, **kwargs):
        from vllm_kvevict.adapter.vllm_internals import (
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
            check_engine_config(vllm_config)
            log_cudagraph_plan(vllm_config.compilation_config)
            from vllm_kvevict.metrics import register_collector

            register_collector()  # before the engine core starts: it inherits the directory
            logger.info("kv_eviction enabled: %s", config.model_dump())
        return vllm_config

    EngineArgs.create_engine_config = create_engine_config


def scoring_cudagraph_mode(compilation_config):
    """The CUDA-graph mode of steps that measure attention statistics, for a configured mode.

    The engine keeps the mode the user (or vLLM's optimization level: FULL_AND_PIECEWISE on
    NVIDIA at -O2/-O3) configured; only steps whose scored requests need attention statistics
    are dispatched without FULL graphs (``worker.without_full_cudagraphs``): PIECEWISE where
    piecewise graphs are captured, else eager (NONE).
    """
    from vllm.config import CUDAGraphMode

    mode = compilation_config.cudagraph_mode
    if mode is None or mode == CUDAGraphMode.NONE:
        return CUDAGraphMode.NONE
    if mode.has_piecewise_cudagraphs():
        return CUDAGraphMode.PIECEWISE
    return CUDAGraphMode.NONE


def log_cudagraph_plan(compilation_config) -> None:
    from vllm.config import CUDAGraphMode

    mode = compilation_config.cudagraph_mode
    scoring = scoring_cudagraph_mode(compilation_config)
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
        default.with_overrides(overrides)
    except ValueError as exc:
        raise VLLMValidationError(str(exc), parameter=CONFIG_KEY) from None


def _install_request_validation() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor._validate_params

    def _validate_params(self, params, *args, **kwargs):
        result = original(self, params, *args, **kwargs)
        validate_request(self.vllm_config, params)
        return result

    InputProcessor._validate_params = _validate_params
