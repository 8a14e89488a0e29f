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

    install_cli()
    _install_engine_config_hook()
    install_runner_hooks()


def _install_engine_config_hook() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config

    def create_engine_config(self, *args, **kwargs):
        from vllm_kvevict.adapter.vllm_internals import UnsupportedConfigError, check_engine_config
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
        vllm_config = original(self, *args, **kwargs)
        if config is not None:
            check_engine_config(vllm_config)
            logger.info("kv_eviction enabled: %s", config.model_dump())
        return vllm_config

    EngineArgs.create_engine_config = create_engine_config
