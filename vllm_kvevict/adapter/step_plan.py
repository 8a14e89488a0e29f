"""The step plan: what the workers need from the scheduler at each step - the compacted rows
that changed, every scheduled request's offset E, the scoring tasks due, and the question
probes' tasks. Runs for every scheduled request each step, so the per-request path is a few
attribute reads; rows and offsets come from what the ledger keeps up to date.

When a request is scored: right after prefill (a windowed method sees the prompt's window only
then), then every ``interval`` decode steps while over budget or while blocks sit in the
recycle bin (which may need restoring), at every decode step for a method defined per step,
and with pool pressure on at every due decode step (it ranks every running request's blocks).
With ``prefill_eviction`` also every earlier prompt chunk that leaves the request over its
budget, scored by that chunk's own queries (or the question probe's); the decision runs at the
next ``schedule``, before the next chunk is allocated.
"""

from __future__ import annotations

from vllm_kvevict.adapter.budget import keep_blocks_at
from vllm_kvevict.adapter.ledger import BlockLedger
from vllm_kvevict.adapter.probe import QuestionProbes
from vllm_kvevict.adapter.protocol import ScoreTask, StepPlan
from vllm_kvevict.adapter.request_state import RequestEviction
from vllm_kvevict.adapter.visual import visual_spans


class StepPlanner:
    """Builds each step's :class:`StepPlan` (see the module docstring)."""

    def __init__(self, ledger: BlockLedger, probes: QuestionProbes, block_size: int,
                 pool_pressure: bool):
        self.ledger, self.probes, self.block_size = ledger, probes, block_size
        self.pool_pressure = pool_pressure

    def plan(self, output, requests: dict, states: dict[str, RequestEviction]) -> StepPlan:
        """The plan for the step vLLM just scheduled.

        Args:
            output: vLLM's ``SchedulerOutput`` of the step.
            requests: vLLM's requests by id.
            states: the eviction state of each request with eviction on.
        """
        scheduled = output.num_scheduled_tokens
        ledger, bs = self.ledger, self.block_size
        # every request with blocks out of attention (the workers read the scheduled ones)
        plan = StepPlan(offsets={r: n * bs for r, n in ledger.excluded_blocks.items()})
        rows = {r: ledger.compacted_row(r) for r in ledger.take_changed(scheduled)
                if r in states}
        plan.rows = {r: ids for r, (ids, _) in rows.items()}
        for req_id, num_tokens in scheduled.items():
            state = states.get(req_id)
            if state is None:
                if self.probes.is_probe(req_id):
                    probe = self.probes.task(requests[req_id], num_tokens)
                    if probe is not None and probe.parent in states:
                        plan.probes[req_id] = probe
                continue
            request = requests[req_id]
            if request.num_computed_tokens - num_tokens >= request.num_prompt_tokens:
                # decode: due every ``interval`` of its decode steps (or every step)
                state.decode_steps += 1
                if (state.decode_steps < state.config.interval
                        and not state.policy.schedule.every_step):
                    continue
            task = self.score_task(request, state, num_tokens, rows.get(req_id))
            if task is not None:
                plan.score[req_id] = task
        return plan

    def score_task(self, request, state: RequestEviction, num_tokens: int,
                   row: tuple[list[int], list[int]] | None = None) -> ScoreTask | None:
        """The request's scoring task in this step, or None when none is due.

        Called by ``plan`` for prefill steps and for decode steps that are due (it has counted
        the decode step).

        Args:
            num_tokens: tokens scheduled for the request in this step.
            row: the request's ``compacted_row`` if already built.
        """
        done = request.num_computed_tokens  # already advanced by this step's tokens
        before = done - num_tokens
        prompt = request.num_prompt_tokens
        if before < prompt <= done:
            phase, middle = "prefill", False
        elif before >= prompt:
            phase, middle = "decode", False
        elif state.config.prefill_eviction:
            phase, middle = "prefill", True
        else:
            return None  # a middle prefill chunk
        req_id = request.request_id
        rb = self.ledger.requests.get(req_id)
        if state.config.below_floor(max(done, prompt)) and not (rb and rb.parked):
            return None  # never scored nor evicted, whatever the policy (floor_tokens)
        over = self.ledger.num_attended(req_id) > keep_blocks_at(state.config, done, prompt,
                                                                self.block_size)
        if middle and not over:
            return None
        schedule = state.policy.schedule
        threshold = phase == "prefill" and schedule.select_after_prefill
        # windowed methods (SnapKV, LaProx, HAE, HybridKV) only see the prompt's window now
        windowed = phase == "prefill" and schedule.window > 0
        # pool-pressure mode ranks every running request's blocks: keep scores fresh
        pressure = phase == "decode" and self.pool_pressure
        if not (over or threshold or windowed or pressure or schedule.every_step
                or (rb and rb.parked)):
            return None
        state.decode_steps = 0
        _, kept_positions = row if row is not None else self.ledger.compacted_row(req_id)
        return ScoreTask(
            policy=state.config.policy,
            options=dict(state.config.options),
            phase=phase,
            generation=state.generation,
            kept_positions=kept_positions,
            parked=self.ledger.parked_blocks(req_id),
            visual_spans=visual_spans(request),
            probe=middle and state.config.prefill_query == "probe",
        )
