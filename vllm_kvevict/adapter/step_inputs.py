"""The worker's step inputs: the scheduler's plan applied to vLLM's batch before the forward.

Why a module of its own: the scheduler keeps positional block lists; the worker's attention
sees a *compacted* view. Here, between vLLM's own input preparation and the forward, the
step's plan (``protocol.StepPlan``) becomes vLLM tensors: compacted block rows, lengths
``seq_len − E`` and slot mapping at ``position − E`` (E = excluded tokens of that request; with
every E = 0 nothing is touched); this step's scored requests and question probes, resolved
against the batch (what the layer hooks and the statistics read); and everything the device
reads this step, in one non-blocking upload. A hybrid model's full-attention group gets its
compacted lengths through its own metadata builders (the sliding-window groups keep vLLM's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from vllm_kvevict.adapter.protocol import PLAN_ATTR, ProbeTask, ScoreTask, StepPlan
from vllm_kvevict.adapter.scoring_batch import ScoredRequest
from vllm_kvevict.adapter.statistics import PROBE_WINDOW
from vllm_kvevict.adapter.statistics import measured as statistics_measured
from vllm_kvevict.adapter.transfers import StepTransfers
from vllm_kvevict.policies import get_policy
from vllm_kvevict.policies.base import WINDOW_ATTN


class StepInputs:
    """The input-fixing side of ``WorkerEviction`` (run by vLLM's ``_update_states`` and
    ``_prepare_inputs`` hooks).

    It owns :attr:`plan`, :attr:`group_lens`, :attr:`step_probes` and the policy objects; it
    builds the step's ``scored`` requests (``scoring_batch``) and reads the layer hooks'
    ``probe_queries``, ``layer_names`` and ``probes_usable``.
    """

    # of the other parts of WorkerEviction
    runner: Any
    gid: int
    hybrid: bool
    fused: bool
    block_table: Any  # vLLM's BlockTable of the evicted group
    transfers: StepTransfers
    scored: list[ScoredRequest]
    skipped: dict[str, str]
    policy_state: dict[tuple[str, int], dict]
    probe_queries: dict[str, dict[int, torch.Tensor]]
    layer_names: list[str]
    probes_usable: bool
    _step_batches: Any
    _skip: Callable[[str, str], None]  # StepScoring's

    def __init__(self) -> None:
        self.plan: StepPlan | None = None
        #: hybrid models, steps with some E > 0: the full group's own (device seq_lens, CPU
        #: upper bound) per batch row, what its attention metadata is built from; else None
        self.group_lens: tuple[torch.Tensor, torch.Tensor] | None = None
        #: this step's question probe tasks, each with its ``[W]`` query rows on the device
        self.step_probes: list[tuple[ProbeTask, torch.Tensor]] = []
        #: (policy name, options) -> the policy object
        self.policies: dict[tuple, Any] = {}
        self._backend_rows = False  # the backend's buffers flag scored rows (last upload)

    def begin_step(self, scheduler_output) -> None:
        """After vLLM's _update_states: install new compacted rows.

        Args:
            scheduler_output: vLLM's ``SchedulerOutput``, carrying the step's plan.
        """
        self.plan = getattr(scheduler_output, PLAN_ATTR, None)
        self.scored = []
        self.group_lens = None
        self._step_batches = None
        self.skipped = {}
        self.transfers.counts.clear()
        self.step_probes = []
        finished = getattr(scheduler_output, "finished_req_ids", ()) or ()
        for key in [k for k in self.policy_state if k[0] in finished]:
            del self.policy_state[key]
        for req_id in [r for r in self.probe_queries if r in finished]:
            del self.probe_queries[req_id]
        if not self.plan:
            return
        batch = self.runner.input_batch
        for req_id, block_ids in self.plan.rows.items():
            req_state = self.runner.requests.get(req_id)
            if req_state is None:
                continue
            req_state.block_ids[self.gid][:] = block_ids
            row = batch.req_id_to_index.get(req_id)
            if row is not None:
                self.block_table.add_row(list(block_ids), row)

    def fix_inputs(self, num_scheduled_tokens: np.ndarray) -> None:
        """After vLLM's _prepare_inputs: compacted seq_lens and slot mapping (hazard-free when
        every E is 0: then this returns before touching anything).

        One KV-cache group: ``runner.seq_lens`` / ``optimistic_seq_lens_cpu`` are compacted
        in place (persistent buffers, so a full CUDA graph replays with them). Hybrid: those
        stay vLLM's (the sliding-window groups read them) and the full group gets compacted
        copies through its metadata builders (:meth:`_wrap_metadata`); such steps replay no
        full CUDA graph (:attr:`needs_eager_attention`).

        Args:
            num_scheduled_tokens: ``[num_reqs]`` this step's tokens per batch row.
        """
        if not self.plan:
            if self.fused:
                self._prepare_backend(self.runner.input_batch.num_reqs)
            return
        runner = self.runner
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        req_ids = batch.req_ids[:num_reqs]
        offsets = np.array([self.plan.offsets.get(r, 0) for r in req_ids], dtype=np.int64)
        compact = bool(offsets.any())
        seq_lens = upper = None
        if compact:  # the host side first: the CPU upper bound the scored requests read
            total = int(num_scheduled_tokens.sum())
            if self.hybrid:
                seq_lens, upper = runner.seq_lens.clone(), runner.optimistic_seq_lens_cpu.clone()
            else:
                seq_lens, upper = runner.seq_lens, runner.optimistic_seq_lens_cpu
            upper[:num_reqs] -= torch.from_numpy(offsets).to(upper.dtype)
            if self.hybrid:
                self.group_lens = (seq_lens, upper)
        if self.plan.probes:
            self._resolve_probes()
        if self.plan.score:
            self._resolve_scored(req_ids, _leading_decodes(num_scheduled_tokens))
        # everything the device needs this step, in one non-blocking copy
        parts = [sr.device_parts() for sr in self.scored]
        arrays = [a for p in parts for a in p]
        if compact:
            arrays = [offsets, np.repeat(offsets, num_scheduled_tokens), *arrays]
        if arrays:
            views = self.transfers.upload(arrays)
            if compact:
                e, per_token, views = views[0], views[1], views[2:]
                seq_lens[:num_reqs] -= e.to(seq_lens.dtype)
                shifted = runner.positions[:total] - per_token
                self.block_table.compute_slot_mapping(
                    num_reqs, runner.query_start_loc.gpu[: num_reqs + 1], shifted
                )
            for sr, part in zip(self.scored, parts):
                sr.on_device, views = views[: len(part)], views[len(part):]
        if self.fused:
            self._prepare_backend(num_reqs)

    def _prepare_backend(self, num_reqs: int) -> None:
        """The attention backend's statistics buffers for this step: which rows its kernel
        scores and their parked blocks (one non-blocking upload; skipped when nothing is scored
        now or in the previous step)."""
        from vllm_kvevict.backend import buffers as stat_buffers

        rows = [(sr.slot, sr.parked_block_ids) for sr in self.scored if sr.slot is not None]
        if rows or self._backend_rows:
            stat_buffers.active().prepare(rows, num_reqs)
        self._backend_rows = bool(rows)

    def _resolve_probes(self) -> None:
        """This step's question probes: the rows of their tail queries (made on the device
        from host ints, nothing uploaded)."""
        if not self.probes_usable:
            return
        qsl = self.runner.query_start_loc.np
        batch = self.runner.input_batch
        for probe_id, task in self.plan.probes.items():
            row = batch.req_id_to_index.get(probe_id)
            if row is None:
                continue
            end = int(qsl[row + 1])
            rows = torch.arange(end - task.window, end, device=self.runner.device)
            self.step_probes.append((task, rows))
            self.probe_queries[task.parent] = {}

    def _uses_probe(self, sr: ScoredRequest) -> bool:
        """A middle chunk scored by its question probe: the probe's queries exist for every
        layer, or are captured this step (each layer's before its statistics)."""
        if not sr.task.probe or sr.req_id not in self.probe_queries:
            return False
        held = self.probe_queries[sr.req_id]
        return (len(held) == len(self.layer_names)
                or any(t.parent == sr.req_id for t, _ in self.step_probes))

    def _resolve_scored(self, req_ids: Sequence[str], leading_decodes: int = 0) -> None:
        """Build this step's ``ScoredRequest``s; ``leading_decodes``: the batch's first rows of
        one query token, the rows the plugin's backend serves with its kernel (the split its
        metadata builder makes): only those can be measured by the kernel."""
        for row, req_id in enumerate(req_ids):
            task = self.plan.score.get(req_id)
            if task is None:
                continue
            sr = self._scored_request(row, req_id, task)
            if sr is None:
                continue
            if self.fused and task.phase == "decode" and row < leading_decodes:
                sr.slot = row  # a decode row of the plugin's backend: its kernel measures
            names = {s.name for s in statistics_measured(
                sr.policy.needs, task.phase, in_backend=sr.slot is not None)}
            if WINDOW_ATTN in names and self._uses_probe(sr):
                names = (names - {WINDOW_ATTN}) | {PROBE_WINDOW}
            sr.set_hooked(names)
            self.scored.append(sr)

    def _scored_request(self, row: int, req_id: str, task: ScoreTask) -> ScoredRequest | None:
        """The request in batch row ``row`` as a ``ScoredRequest`` (host values only, no device
        read), or None when its row does not match the plan (reported as skipped)."""
        runner = self.runner
        qsl = runner.query_start_loc.np
        bs = self.block_table.block_size
        table = self.block_table.block_table.np
        # the compacted lengths' CPU copy (exact: no async scheduling, no drafts) and
        # positions = computed tokens + offset in the step
        seq_lens = (runner.optimistic_seq_lens_cpu if self.group_lens is None
                    else self.group_lens[1])
        computed = runner.input_batch.num_computed_tokens_cpu
        n_row = int(self.block_table.num_blocks_per_row[row])
        if n_row != len(task.kept_positions):
            self._skip(req_id, f"block row has {n_row} blocks, the plan "
                       f"{len(task.kept_positions)}")
            return None
        seq_c = int(seq_lens[row])
        kept = [(p, int(table[row, i]), False, bs if i < n_row - 1 else seq_c - (n_row - 1) * bs)
                for i, p in enumerate(task.kept_positions)]
        parked = [(p, bid, True, bs) for p, bid in task.parked]
        resident = sorted(kept + parked)
        q_start, q_end = int(qsl[row]), int(qsl[row + 1])
        sr = ScoredRequest(
            req_id=req_id,
            task=task,
            policy=self._policy(task),
            q_start=q_start,
            q_end=q_end,
            block_ids=torch.tensor([r[1] for r in resident], dtype=torch.int64),
            positions=torch.tensor([r[0] for r in resident], dtype=torch.int64),
            parked=torch.tensor([r[2] for r in resident], dtype=torch.bool),
            tokens_per_block=[r[3] for r in resident],
            query_positions=torch.from_numpy(
                int(computed[row]) + np.arange(q_end - q_start, dtype=np.int64)),
            layers={},
        )
        # The statistics read the resident blocks as one paged row and mask causally by row
        # index: that is masking by original position only if the step's query tokens are
        # the row's last tokens (then row order is position order, the queries included).
        tail = self._token_positions(sr)[-(q_end - q_start):]
        if not torch.equal(tail, sr.query_positions.long()):
            self._skip(req_id, "resident blocks do not end with this step's tokens")
            return None
        return sr

    @property
    def needs_eager_attention(self) -> bool:
        """This step must not replay a full CUDA graph (no Python runs inside one): some
        request scored this step needs statistics that only the attention hooks measure, or
        a hybrid model's full group attends over lengths its own metadata build supplies."""
        return (self.group_lens is not None or bool(self.step_probes)
                or any(sr.hooked for sr in self.scored))

    def _policy(self, task: ScoreTask):
        key = (task.policy, repr(sorted(task.options.items())))
        if key not in self.policies:
            self.policies[key] = get_policy(task.policy, task.options)
        return self.policies[key]

    def _token_positions(self, sr: ScoredRequest) -> torch.Tensor:
        bs = self.block_table.block_size
        return torch.cat([p * bs + torch.arange(n) for p, n in zip(sr.positions.tolist(), sr.tokens_per_block)])

    def _wrap_metadata(self, attn_group) -> None:
        """The full group's attention metadata is built from its own compacted lengths.

        vLLM builds one ``CommonAttentionMetadata`` per step and shallow-copies it per KV-cache
        group, swapping only the block table and slot mapping: ``seq_lens`` is shared. Here
        the full group's copy gets ``seq_lens − E`` (and the CPU upper bound and maximum to
        match) on steps where some E > 0; the sliding-window groups keep vLLM's lengths.
        """
        if getattr(attn_group, "_kvevict_wrapped", False):
            return
        original = attn_group.build_metadata

        def build_metadata(common_attn_metadata, *args, **kwargs):
            if self.group_lens is not None:
                seq_lens, upper = self.group_lens
                n = common_attn_metadata.num_reqs
                common_attn_metadata = dataclasses.replace(
                    common_attn_metadata, seq_lens=seq_lens[:n],
                    seq_lens_cpu_upper_bound=upper[:n], max_seq_len=int(upper[:n].max()),
                )
            return original(common_attn_metadata, *args, **kwargs)

        attn_group.build_metadata = build_metadata
        attn_group._kvevict_wrapped = True


def _leading_decodes(num_scheduled_tokens: np.ndarray) -> int:
    """Rows before the first with more than one query token: the decode rows the plugin's
    backend serves with its kernel (``split_decodes_and_prefills`` with threshold 1 on the
    batch vLLM reordered for it, decode rows first)."""
    longer = np.flatnonzero(np.asarray(num_scheduled_tokens) > 1)
    return int(longer[0]) if longer.size else len(num_scheduled_tokens)
