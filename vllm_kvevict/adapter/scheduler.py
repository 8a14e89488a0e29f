"""``EvictingScheduler``: vLLM's scheduler plus mid-sequence block eviction.

Each step: (1) apply decisions from the scores the workers sent last step - release, park or
restore blocks through the ``BlockLedger`` (``decisions.py``); (2) let vLLM schedule as usual
(with pool-pressure eviction instead of preemption when enabled: ``admission.py``,
``pool_pressure.py``); (3) attach a ``StepPlan`` to the ``SchedulerOutput`` (``step_plan.py``):
new compacted rows, per-request offsets E, and which requests the workers must score during
this step's forward pass.

This class only wires those parts into vLLM's ``Scheduler``: its request lifecycle
(``add_request``, ``_free_request``, ``_free_request_blocks``), its step (``schedule``,
``update_from_output``). How many blocks a request keeps at a step is ``budget.py``'s one
function; what a request's eviction state holds is ``request_state.py``.
"""

from __future__ import annotations

import logging

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import RequestStatus

from vllm_kvevict.adapter.accounting import EvictionBook
from vllm_kvevict.adapter.admission import install_guards
from vllm_kvevict.adapter.decisions import Decisions
from vllm_kvevict.adapter.ledger import BlockLedger
from vllm_kvevict.adapter.pool_pressure import PoolPressure
from vllm_kvevict.adapter.probe import QuestionProbes
from vllm_kvevict.adapter.protocol import PLAN_ATTR, SCORES_ATTR, SKIPPED_ATTR
from vllm_kvevict.adapter.request_state import (
    RequestEviction,
    new_request_state,
    request_config,
)
from vllm_kvevict.adapter.startup_checks import check_kv_cache_config
from vllm_kvevict.adapter.step_plan import StepPlanner
from vllm_kvevict.config import CONFIG_KEY, EvictionConfig, config_from_additional
from vllm_kvevict.metrics import EvictionMetrics

logger = logging.getLogger("vllm_kvevict")


class EvictingScheduler(Scheduler):
    def __init__(self, vllm_config, kv_cache_config, *args, **kwargs):
        #: the KV-cache group evicted in (the full-attention one); other groups are untouched
        self.kv_gid = check_kv_cache_config(kv_cache_config)
        self.kv_hybrid = len(kv_cache_config.kv_cache_groups) > 1
        super().__init__(vllm_config, kv_cache_config, *args, **kwargs)
        self.kv_default = config_from_additional(vllm_config.additional_config) or EvictionConfig()
        manager = self.kv_cache_manager.coordinator.single_type_managers[self.kv_gid]
        self.ledger = BlockLedger(manager, bin_capacity=self.kv_default.recycle_bin_total_blocks)
        self.kv_block_size = bs = manager.block_size
        self.kv_requests: dict[str, RequestEviction] = {}
        group = kv_cache_config.kv_cache_groups[self.kv_gid]
        self.kv_metrics = EvictionMetrics(
            block_bytes=group.kv_cache_spec.page_size_bytes * len(group.layer_names)
        )
        self.kv_book = EvictionBook(self.ledger, self.kv_metrics, bs)
        self.kv_decisions = Decisions(self.ledger, self.kv_book, bs)
        self.kv_pressure = PoolPressure(self.ledger, self.kv_book, bs,
                                        caching=self.kv_cache_manager.enable_caching)
        #: hidden question-probe requests (``prefill_query="probe"``), and probes to abort
        self.kv_probes = QuestionProbes(bs)
        self.kv_probe_aborts: list[str] = []
        self.kv_planner = StepPlanner(self.ledger, self.kv_probes, bs,
                                      pool_pressure=self.kv_default.pool_pressure)
        install_guards(self)

    @property
    def kv_counters(self):
        """Engine-wide totals over all policies (tests, logs)."""
        return self.kv_metrics.totals

    # -- request lifecycle ---------------------------------------------------------------------
    def add_request(self, request) -> None:
        try:
            config = request_config(self.kv_default, request)
        except ValueError as exc:
            # The front end validates per-request options; this is a last line of defence.
            logger.warning("request %s: %s; using the server default", request.request_id, exc)
            config = self.kv_default
        if config.enabled:
            state = self.kv_requests[request.request_id] = new_request_state(
                config, request, self.kv_block_size)
            probe = self._question_probe(request, state)
            if probe is not None:
                super().add_request(probe)  # ahead of its parent: computed with its first chunk
        super().add_request(request)

    def _question_probe(self, request, state: RequestEviction):
        """The hidden probe request of a prompt whose middle chunks will be evicted with the
        question's queries (``prefill_query="probe"``, ``adapter/probe.py``), or None."""
        config, window = state.config, state.policy.schedule.window
        prompt = request.num_prompt_tokens
        if not (config.prefill_eviction and config.prefill_query == "probe" and window
                and not self.kv_hybrid and prompt > self.max_num_scheduled_tokens
                and not config.below_floor(prompt)):
            return None
        return self.kv_probes.make(request, window)

    def _free_request(self, request, *args, **kwargs):
        """Finish: report what was evicted for this request on its final output (vLLM carries
        ``kv_transfer_params`` to ``RequestOutput`` and to non-streaming OpenAI responses)."""
        state = self.kv_requests.get(request.request_id)
        report = self.kv_book.report(request, state) if state is not None else None
        kv_params, *rest = super()._free_request(request, *args, **kwargs)
        if report is not None:
            kv_params = {**(kv_params or {}), CONFIG_KEY: report}
        return (kv_params, *rest)

    def _free_request_blocks(self, request) -> None:
        # Finish, abort and preemption all pass here. vLLM frees every non-null block in the
        # list (parked ones included); a preempted request restarts with full attention.
        super()._free_request_blocks(request)
        req_id = request.request_id
        self.ledger.forget(req_id)
        state = self.kv_requests.get(req_id)
        if state is None:
            return
        finished = request.is_finished()
        self.kv_book.close_log(req_id, finished)
        if finished:
            del self.kv_requests[req_id]
            probe = self.kv_probes.parent_gone(req_id)
            if probe is not None:
                self.kv_probe_aborts.append(probe)  # never computed: aborted at the next step
        else:
            state.restart()
            self.kv_decisions.forget(req_id)

    # -- the step ------------------------------------------------------------------------------
    def schedule(self, *args, **kwargs):
        if self.kv_probe_aborts:
            self._abort_probes()
        if self.kv_requests:
            self.kv_decisions.apply(self.running, self.kv_requests)
        output = super().schedule(*args, **kwargs)
        plan = (self.kv_planner.plan(output, self.requests, self.kv_requests)
                if self.kv_requests else None)
        setattr(output, PLAN_ATTR, plan)
        self.kv_metrics.publish()
        return output

    def update_from_output(self, scheduler_output, model_runner_output):
        self._take_worker_output(model_runner_output)
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        return self.kv_probes.hide(outputs)

    def _abort_probes(self) -> None:
        """Probes whose parent ended before they ran (their blocks go back to the pool)."""
        aborts, self.kv_probe_aborts = self.kv_probe_aborts, []
        for probe_id in aborts:
            if probe_id in self.requests:
                self.finish_requests(probe_id, RequestStatus.FINISHED_ABORTED)
            self.kv_probes.forget(probe_id)

    def _take_worker_output(self, model_runner_output) -> None:
        """Fresh block scores, and the scoring tasks the workers could not measure."""
        skipped = getattr(model_runner_output, SKIPPED_ATTR, None) or {}
        for req_id, policy in skipped.items():
            counters = self.kv_metrics.policy(policy)
            counters.scoring_skipped += 1
            if counters.scoring_skipped in (1, 10, 100) or counters.scoring_skipped % 1000 == 0:
                logger.warning("kv_eviction: %d scoring task(s) of policy %s measured nothing "
                               "(latest: request %s); their blocks keep older scores",
                               counters.scoring_skipped, policy, req_id)
        scores = getattr(model_runner_output, SCORES_ATTR, None)
        for req_id, block_scores in (scores or {}).items():
            state = self.kv_requests.get(req_id)
            if state is None or state.generation != block_scores.generation:
                continue  # finished or preempted since: the scores describe old blocks
            self.kv_decisions.note_scores(req_id, state, block_scores.positions,
                                          block_scores.scores, block_scores.phase)
