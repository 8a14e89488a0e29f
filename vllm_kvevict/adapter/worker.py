"""Worker side: attend over the compacted sequence and measure what the policies need.

The scheduler keeps positional block lists; the worker sees a *compacted* view: the block row
holds only blocks in attention, the attention length is ``seq_len − E`` and new K/V go to slot
``position − E`` (E = excluded tokens of that request). RoPE keeps the original positions, so
stock attention kernels need no change. With E = 0 nothing here touches vLLM's tensors.

A hybrid model (sliding-window layers beside full-attention ones) is evicted in its
full-attention KV-cache group only: that group gets the compacted rows, slot mapping and
lengths; the sliding-window groups attend exactly as in stock vLLM.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vllm_kvevict.adapter import probe as question_probe
from vllm_kvevict.adapter.protocol import (
    PLAN_ATTR,
    SCORES_ATTR,
    SKIPPED_ATTR,
    BlockScores,
    ScoreTask,
    StepPlan,
)
from vllm_kvevict.adapter.statistics import BY_NAME as STATISTICS_BY_NAME
from vllm_kvevict.adapter.statistics import MEASURED as STATISTIC_REGISTRY
from vllm_kvevict.adapter.statistics import PROBE_WINDOW, LayerInputs, combine_layers
from vllm_kvevict.adapter.statistics import measured as statistics_measured
from vllm_kvevict.adapter.transfers import StepTransfers
from vllm_kvevict.config import config_from_additional
from vllm_kvevict.kernels import dispatch
from vllm_kvevict.kernels.paged import PagedKV, cpu_kv_view, detect_cpu_key_layout
from vllm_kvevict.policies import get_policy
from vllm_kvevict.policies.base import WINDOW_ATTN, RequestStats

logger = logging.getLogger("vllm_kvevict")

_LAYER_INDEX = re.compile(r"\.(\d+)\.")
#: names of an attention module's output projection across vLLM's model families
_OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "dense", "c_proj")


@dataclass
class ScoredRequest:
    """One request being scored this step, resolved against the worker's batch.

    Its resident blocks (kept and parked, positional order) form one block-table row whose
    only partial block is the last: the statistics read it like any paged request.
    """

    req_id: str
    task: ScoreTask
    policy: Any
    q_start: int
    q_end: int
    block_ids: torch.Tensor  # [nb] physical ids of resident blocks, positional order
    positions: torch.Tensor  # [nb] positional block indices
    parked: torch.Tensor  # [nb] bool
    tokens_per_block: list[int]
    query_positions: torch.Tensor  # original positions of this step's query tokens
    layers: dict  # stat name -> list of per-layer tensors
    device: torch.device | str = "cpu"  # of the KV cache
    #: statistics slot in the attention backend's buffers (a decode row of the plugin's
    #: backend: the kernel measures its decode statistics), else None (the hooks do)
    slot: int | None = None
    #: names of the statistics the attention hooks measure for it this step
    hooked: frozenset = frozenset()
    #: ``device_parts()`` on the KV cache's device (set before the forward), else None
    on_device: list | None = None
    #: observation-window queries the hooks read this step (0: none)
    window: int = 0
    num_tokens: int = field(init=False)
    #: [nb] int64: column of each resident block in the decode statistics, which list the
    #: attended (kept) blocks first, in row order, then the parked ones (positional order)
    stat_columns: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.num_tokens = sum(self.tokens_per_block)
        kept = ~self.parked
        n_kept = int(kept.sum())
        self.stat_columns = torch.where(kept, kept.long().cumsum(0) - 1,
                                        n_kept + self.parked.long().cumsum(0) - 1)

    def device_parts(self) -> list[np.ndarray]:
        """What the device reads for this request, uploaded with the step's other data
        before the forward: positions, parked flags, statistics columns (``[nb]`` each) for
        the policies; for the hooks (when they measure something): the resident block ids,
        ``[num_tokens, window]`` and the window's query token indices."""
        parts = [self.positions.numpy(), self.parked.numpy(), self.stat_columns.numpy()]
        return parts + self._hook_parts() if self.hooked else parts

    def _hook_parts(self) -> list[np.ndarray]:
        return [self.block_ids.numpy(), np.array([self.num_tokens, self.window]),
                np.arange(self.q_end - self.window, self.q_end)]

    def _hook_view(self, i: int) -> torch.Tensor:
        views = self.device_views()
        if len(views) > 3:
            return views[3 + i]
        # not measured by the hooks this step (a caller reading its row directly): from here
        return torch.from_numpy(self._hook_parts()[i]).to(self.device)

    def set_hooked(self, names) -> None:
        """The statistics the attention hooks measure for it this step, and so its window
        (the policy's, at most this step's query tokens)."""
        self.hooked = frozenset(names)
        self.window = (min(self.policy.schedule.window or 32, self.q_end - self.q_start)
                       if WINDOW_ATTN in self.hooked else 0)

    def device_views(self) -> list[torch.Tensor]:
        """``device_parts()`` on the device: the step's upload, or (a request not resolved by
        the worker: unit tests) uploaded here."""
        if self.on_device is None:
            self.on_device = [torch.from_numpy(a).to(self.device) for a in self.device_parts()]
        return self.on_device

    @property
    def block_table(self) -> torch.Tensor:
        """``[1, nb]`` int32 on the device: the resident blocks as one paged row."""
        return self._hook_view(0).to(torch.int32)[None]

    @property
    def seq_lens(self) -> torch.Tensor:
        """``[1]`` int32 on the device: the resident tokens."""
        return self._hook_view(1)[:1].to(torch.int32)

    @property
    def window_index(self) -> torch.Tensor:
        """``[window]`` int64 on the device: the window queries' indices in the step's tokens."""
        return self._hook_view(2)

    @property
    def parked_block_ids(self) -> list[int]:
        """Physical ids of the parked blocks, in positional order (their statistics columns)."""
        return self.block_ids[self.parked].tolist()

    def record(self, stat: str, value: torch.Tensor) -> None:
        self.layers.setdefault(stat, []).append(value)


@dataclass
class _Batch:
    """Scored requests as one paged batch: what one kernel launch reads for all of them.
    Built on the device from the requests' uploaded views (nothing more is uploaded)."""

    members: tuple[ScoredRequest, ...]
    block_table: torch.Tensor  # [R, max_blocks] int32 (rows padded with block 0, never read)
    seq_lens: torch.Tensor  # [R] int32, compacted lengths
    #: [R, W] int64: each request's window query indices in the step's tokens, right-aligned
    #: (W = the longest window; a shorter one repeats its last index in front, masked)
    window_index: torch.Tensor | None
    window_lens: torch.Tensor | None  # [R] int32

    @classmethod
    def of(cls, members) -> _Batch:
        device = members[0].block_table.device
        width = max(sr.block_ids.numel() for sr in members)
        table = torch.zeros(len(members), width, dtype=torch.int32, device=device)
        for i, sr in enumerate(members):
            table[i, : sr.block_ids.numel()] = sr.block_table[0]
        w = max(sr.window for sr in members)
        index = lens = None
        if w:
            index = torch.empty(len(members), w, dtype=torch.int64, device=device)
            for i, sr in enumerate(members):
                if not sr.window:  # in the batch for another statistic (or its probe's window)
                    index[i] = 0
                    continue
                view = sr.window_index
                index[i, w - sr.window:] = view
                index[i, : w - sr.window] = view[-1:]
            lens = torch.cat([sr._hook_view(1)[1:] for sr in members]).to(torch.int32)
        return cls(members, table, torch.cat([sr.seq_lens for sr in members]), index, lens)


class KeyLayoutError(RuntimeError):
    """The KV cache layout is not one this adapter knows how to read."""


class WorkerEviction:
    """Per-runner eviction state; created only when the engine has a kv_eviction config."""

    #: the KV-cache group evicted in (the full-attention one) and whether there are others
    gid: int = 0
    hybrid: bool = False
    #: hybrid models, steps with some E > 0: the full group's own (device seq_lens, CPU upper
    #: bound) per batch row, what its attention metadata is built from; else None
    group_lens: tuple[torch.Tensor, torch.Tensor] | None = None
    #: the evicted group's layers run the plugin's attention backend (decode statistics come
    #: from its kernel, in ``backend.buffers.active()``)
    fused: bool = False
    _backend_rows: bool = False  # the backend's buffers flag scored rows (last upload)
    #: this step's question probes (set by begin_step; see __init__)
    step_probes: list | tuple = ()
    #: the projected-value norms per KV slot, or None (see __init__)
    norms = None

    def __init__(self, runner, config=None):
        self.runner = runner
        self.config = config  # the server's EvictionConfig
        self.plan: StepPlan | None = None
        self.scored: list[ScoredRequest] = []
        self.pending_scores: dict[str, BlockScores] = {}
        self.policies: dict[tuple, Any] = {}
        self.policy_state: dict[tuple[str, int], dict] = {}
        self.key_layout: str | None = None  # CPU backend: "cpu" or "cpu_t" (AVX2 hosts)
        self.grams: dict[int, torch.Tensor] = {}
        self.hooked = False
        #: layer name -> "gpu" | "cpu": how its KV cache is read (checked at KV-cache init)
        self.readers: dict[str, str] = {}
        self.layer_names: list[str] = []
        #: req_id -> why a scoring task of this step measured nothing (sent to the scheduler)
        self.skipped: dict[str, str] = {}
        self._warned: set[str] = set()
        #: question probes (``adapter/probe.py``): parent req_id -> {layer index: [Hq, W, D]}
        #: queries, kept until the parent's prompt is computed; this step's probe tasks as
        #: (task, [W] query rows on the device); layer index -> its rotary embedding, or None
        #: where turning queries by position is not exact (checked at startup)
        self.probe_queries: dict[str, dict[int, torch.Tensor]] = {}
        self.step_probes: list[tuple[Any, torch.Tensor]] = []
        self.rotaries: dict[int, Any] = {}
        #: the projected-value norms per KV slot (``adapter/value_norms.py``), on a server
        #: whose default policy reads them; else None (recomputed at scoring)
        self.norms = None

    # -- startup -------------------------------------------------------------------------------
    def check_layers(self) -> None:
        """After vLLM's initialize_kv_cache: refuse (by name) attention layers whose cache the
        statistics cannot read, then hook every layer's forward once."""
        from vllm_kvevict.adapter.startup_checks import (
            check_attention_layers,
            check_kv_cache_config,
        )

        runner = self.runner
        groups = runner.kv_cache_config.kv_cache_groups
        self.gid = check_kv_cache_config(runner.kv_cache_config)
        self.hybrid = len(groups) > 1
        layers = _attention_layers(runner.vllm_config.compilation_config.static_forward_context,
                                   names=groups[self.gid].layer_names)
        layout = runner.cache_config.get_resolved_kv_cache_layout().name
        block_size = groups[self.gid].kv_cache_spec.block_size
        self.readers = check_attention_layers(layers, layout, block_size)
        self.fused = _fused_backend(layers)
        if self.fused:
            _check_buffer_width(runner.model_config.max_model_len, block_size)
        self._warm_up(layers)
        self._check_rotaries(layers)
        self._keep_value_norms(layers, block_size)
        if not self.hooked:
            self._hook_attention(list(layers))
        if self.hybrid:
            for attn_group in runner.attn_groups[self.gid]:
                self._wrap_metadata(attn_group)

    def _warm_up(self, layers: dict) -> None:
        """On an NVIDIA GPU, compile the serving kernels now (``kernels/warmup.py``): the
        attention backend's decode kernel and the prefill statistics' kernels, on the real
        cache and widths, so no request waits for a Triton compilation."""
        name, layer = next(iter(layers.items()))
        kv = layer.kv_cache[0] if isinstance(layer.kv_cache, list | tuple) else layer.kv_cache
        if self.readers.get(name) != "gpu" or not kv.is_cuda or torch.version.hip is not None:
            return
        from vllm_kvevict.backend import buffers
        from vllm_kvevict.kernels.warmup import warm_up

        stats = buffers.active()
        options = self.config.options if self.config is not None else {}
        window = max(32, int(options.get("window") or 32))  # the server's policy options
        launched = warm_up(kv, layer.impl.num_heads, _head_size(layer, kv),
                           self.block_table.block_table.np.shape[1], decode=self.fused,
                           stats=stats.kernel_kwargs() if stats is not None else None,
                           window=window)
        logger.info("kv_eviction: %d Triton kernels compiled at startup", launched)

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

    @property
    def transfers(self) -> StepTransfers:
        """The step's host<->device traffic (made on first use, on the KV cache's device)."""
        made = self.__dict__.get("_transfers")
        if made is None:
            made = self.__dict__["_transfers"] = StepTransfers(getattr(self.runner, "device", "cpu"))
        return made

    @property
    def num_kv_heads(self) -> int:
        """KV heads of this tensor-parallel rank."""
        return self.runner.model_config.get_num_kv_heads(self.runner.parallel_config)

    @property
    def num_heads(self) -> int:
        """Query heads of this tensor-parallel rank."""
        return self.runner.model_config.get_num_attention_heads(self.runner.parallel_config)

    @property
    def block_table(self):
        """The input batch's block table of the evicted (full-attention) group."""
        return self.runner.input_batch.block_table[self.gid]

    # -- step plumbing -------------------------------------------------------------------------
    def begin_step(self, scheduler_output) -> None:
        """After vLLM's _update_states: install new compacted rows."""
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

    def _resolve_scored(self, req_ids, leading_decodes: int = 0) -> None:
        """Build this step's ``ScoredRequest``s; ``leading_decodes``: the batch's first rows of
        one query token, the rows the plugin's backend serves with its kernel (the split its
        metadata builder makes): only those can be measured by the kernel."""
        runner = self.runner
        qsl = runner.query_start_loc.np
        bs = self.block_table.block_size
        table = self.block_table.block_table.np
        # host values only (no device read): the compacted lengths' CPU copy (exact: no async
        # scheduling, no drafts) and positions = computed tokens + offset in the step
        seq_lens = (runner.optimistic_seq_lens_cpu if self.group_lens is None
                    else self.group_lens[1])
        computed = runner.input_batch.num_computed_tokens_cpu
        for row, req_id in enumerate(req_ids):
            task = self.plan.score.get(req_id)
            if task is None:
                continue
            n_row = int(self.block_table.num_blocks_per_row[row])
            if n_row != len(task.kept_positions):
                self._skip(req_id, f"block row has {n_row} blocks, the plan "
                           f"{len(task.kept_positions)}")
                continue
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
                device=runner.device,
            )
            # The statistics read the resident blocks as one paged row and mask causally by row
            # index: that is masking by original position only if the step's query tokens are
            # the row's last tokens (then row order is position order, the queries included).
            tail = self._token_positions(sr)[-(q_end - q_start):]
            if not torch.equal(tail, sr.query_positions.long()):
                self._skip(req_id, "resident blocks do not end with this step's tokens")
                continue
            if self.fused and task.phase == "decode" and row < leading_decodes:
                sr.slot = row  # a decode row of the plugin's backend: its kernel measures
            names = {s.name for s in statistics_measured(
                sr.policy.needs, task.phase, in_backend=sr.slot is not None)}
            if WINDOW_ATTN in names and self._uses_probe(sr):
                names = (names - {WINDOW_ATTN}) | {PROBE_WINDOW}
            sr.set_hooked(names)
            self.scored.append(sr)

    @property
    def needs_eager_attention(self) -> bool:
        """This step must not replay a full CUDA graph (no Python runs inside one): some
        request scored this step needs statistics that only the attention hooks measure, or
        a hybrid model's full group attends over lengths its own metadata build supplies."""
        return (self.group_lens is not None or bool(self.step_probes)
                or any(sr.hooked for sr in self.scored))

    def _skip(self, req_id: str, reason: str) -> None:
        self.skipped[req_id] = reason
        if reason not in self._warned:
            self._warned.add(reason)
            logger.warning("kv_eviction: scoring skipped (%s); counted in "
                           "vllm_kvevict_scoring_skipped_total", reason)

    def _policy(self, task: ScoreTask):
        key = (task.policy, repr(sorted(task.options.items())))
        if key not in self.policies:
            self.policies[key] = get_policy(task.policy, task.options)
        return self.policies[key]

    # -- attention hook ------------------------------------------------------------------------
    def _hook_attention(self, names: list[str]) -> None:
        """Wrap ``impl.forward`` of the layers ``names`` (the evicted group's, layer order).

        The backend's own attention output is always the one the model uses. The hooks measure
        what that backend does not: the observation window at prefill (once per request), and,
        for layers served by any backend but the plugin's own (vLLM's CPU backend here; a
        backend the user chose on a GPU), the decode statistics too, by their torch twin
        reading the layer's K/V a second time. With the plugin's backend the decode rows'
        statistics come from its kernel (``sr.slot``), so decode steps run no hook work and
        may replay FULL CUDA graphs, where no Python runs.
        """
        ctx = self.runner.vllm_config.compilation_config.static_forward_context
        for index, name in enumerate(names):
            impl = ctx[name].impl
            original = impl.forward

            def forward(layer, query, key, value, kv_cache, attn_metadata, *a,
                        _orig=original, _index=index, _name=name, **kw):
                out = _orig(layer, query, key, value, kv_cache, attn_metadata, *a, **kw)
                if attn_metadata is not None and self.norms is not None:
                    self._write_value_norms(_index, value, kv_cache, attn_metadata)
                if attn_metadata is not None and self.step_probes:
                    self._keep_probe_queries(_index, layer, query)
                if attn_metadata is not None and any(sr.hooked for sr in self.scored):
                    self._measure_layer(_index, _name, layer, query, key, kv_cache)
                return out

            impl.forward = forward
        self.hooked = True
        self.layer_names = names

    def _paged_kv(self, kv_cache: torch.Tensor, key: torch.Tensor, reader: str,
                  head_size: int) -> PagedKV:
        """One layer's cache as logical ``[num_blocks, block_size, Hkv, D]`` key/value views.

        Args:
            kv_cache: the layer's cache as vLLM hands it to ``impl.forward``: on the GPU
                backends (reader ``"gpu"``) ``[num_blocks, Hkv, block_size, 2*D]`` in any
                ``KVCacheLayout`` stride order, K and V side by side in the last axis; on the
                CPU backend (``"cpu"``) the same shape packing a key tile and a value tile per
                (block, head), keys possibly transposed per block (detected once, from the
                newest key just written: AVX2 hosts store them ``[D, block_size]``).
            key: ``[num_tokens, Hkv * D]`` this step's keys (CPU layout detection).
            reader: from :func:`check_attention_layers` at startup.
            head_size: D.
        Anything else is refused rather than misread.
        """
        if kv_cache.dim() != 4:
            raise KeyLayoutError(f"kv_eviction: unsupported KV cache shape {tuple(kv_cache.shape)}")
        if reader == "gpu":
            try:
                return PagedKV.from_vllm(kv_cache, head_size)
            except ValueError as exc:
                raise KeyLayoutError(f"kv_eviction: {exc}") from exc
        if reader != "cpu":
            raise KeyLayoutError(f"kv_eviction: no reader {reader!r} for this KV cache")
        view = cpu_kv_view(kv_cache)  # [num_blocks, Hkv, 2*bs, D]
        if self.key_layout is None:
            sr = self.scored[0]
            new_key = key.view(-1, view.shape[1], view.shape[3])[sr.q_end - 1]
            self.key_layout = self._detect_layout(view, sr, new_key)
        return PagedKV.from_cpu(view, self.key_layout)

    @staticmethod
    def _detect_layout(kv_view: torch.Tensor, sr: ScoredRequest, new_key: torch.Tensor) -> str:
        """``cpu`` or ``cpu_t``: the CPU layout in which the newest token's slot holds ``new_key``.

        ``kv_view`` is the ``[num_blocks, Hkv, 2*bs, D]`` view. Refuses to score when neither
        (or both) layouts match.
        """
        bs = kv_view.shape[2] // 2
        slot = int(sr.block_ids[-1]) * bs + sr.tokens_per_block[-1] - 1
        try:
            return detect_cpu_key_layout(kv_view, new_key, slot)
        except ValueError as exc:
            raise KeyLayoutError(f"kv_eviction: cannot read keys from the KV cache: {exc}") from exc

    def _measure_layer(self, index, name, layer, query, key, kv_cache) -> None:
        """Record this layer's statistics of every scored request: one ``dispatch`` call per
        statistic for all the requests that need it (the Triton kernels on NVIDIA GPUs, their
        torch references elsewhere); the observation window, whose length differs per
        request, one call per request at prefill.

        Args:
            query: ``[num_tokens, Hq * D]`` (or ``[num_tokens, Hq, D]``) this step's queries.
            key: ``[num_tokens, Hkv * D]`` this step's keys.
            kv_cache: the layer's cache, as vLLM hands it to ``impl.forward``.
        """
        reader = self.readers.get(name)
        if reader is None:  # never guess a layout: a wrong view gives plausible garbage
            raise KeyLayoutError(f"kv_eviction: layer {name} was not checked at startup")
        kv = self._paged_kv(kv_cache, key, reader, _head_size(layer, kv_cache))
        hq = layer.impl.num_heads
        inputs = LayerInputs(kv=kv, queries=query.view(-1, hq, kv.head_dim),
                             scale=layer.impl.scale, gram=lambda: self._gram(index, name, hq),
                             probe=lambda req_id: self.probe_queries[req_id][index],
                             value_norms=None if self.norms is None else (
                                 lambda sr: self.norms.gather(index, sr.block_table[0],
                                                              sr.num_tokens, kv.block_size)))
        batches = self._batches()
        for stat in STATISTIC_REGISTRY:
            if stat.batched:
                if stat.name in batches:
                    stat.measure(inputs, batches[stat.name])
                continue
            for sr in self.scored:
                if stat.name in sr.hooked:
                    stat.measure(inputs, sr)

    def _keep_value_norms(self, layers: dict, block_size: int) -> None:
        """On a server whose default policy reads the projected-value norms: their per-slot
        tables (the memory was taken from the KV budget) and every layer's Gram matrices now,
        so the writes in the layer calls compute nothing else."""
        from vllm_kvevict.adapter import needs_value_norms
        from vllm_kvevict.adapter.value_norms import ValueNormCache

        if self.config is None or not needs_value_norms(self.config) or self.norms is not None:
            return
        grams = [self._gram(i, name, layer.impl.num_heads) for i, (name, layer) in
                 enumerate(layers.items())]
        if any(g is None for g in grams):
            return  # no output projection found: scored without the norms (reported skipped)
        num_blocks = self.runner.kv_cache_config.num_blocks
        self.norms = ValueNormCache(len(layers), num_blocks * block_size,
                                    next(iter(layers.values())).impl.num_heads,
                                    self.runner.device)

    def _write_value_norms(self, index: int, value: torch.Tensor, kv_cache, attn_metadata) -> None:
        slots = getattr(attn_metadata, "slot_mapping", None)
        if slots is None:
            return
        dtype = kv_cache.dtype if isinstance(kv_cache, torch.Tensor) else value.dtype
        self.norms.write(index, value.to(dtype), slots, self.grams[index])

    def _keep_probe_queries(self, index: int, layer, query: torch.Tensor) -> None:
        """Keep this layer's queries of the step's question probes, turned to the positions
        their tail has in the parent prompt (``[Hq, W, D]`` per layer)."""
        queries = query.view(query.shape[0], layer.impl.num_heads, -1)
        for task, rows in self.step_probes:
            turned = question_probe.turn_queries(self.rotaries[index], queries[rows].float(),
                                                 task.shift)
            self.probe_queries[task.parent][index] = turned.to(query.dtype).transpose(0, 1).contiguous()

    def _check_rotaries(self, layers: dict) -> None:
        """Each layer's rotary embedding, where turning a query by position is exact (the
        question probe's condition, checked once at startup); else the probe is not used."""
        model = self.runner.get_model()
        for index, (name, layer) in enumerate(layers.items()):
            rotary = question_probe.find_rotary(model, name)
            head_size = getattr(layer.impl, "head_size", None) or layer.head_size
            ok = question_probe.rotation_composes(rotary, head_size, layer.impl.num_heads,
                                                  self.runner.device)
            self.rotaries[index] = rotary if ok else None
        if not all(self.rotaries.values()):
            logger.info("kv_eviction: this model's rotary embeddings cannot turn queries to "
                        "other positions exactly; prefill_query='probe' scores the prompt's "
                        "chunks by their own queries")

    @property
    def probes_usable(self) -> bool:
        return bool(self.rotaries) and all(r is not None for r in self.rotaries.values())

    def _batches(self) -> dict[str, _Batch]:
        """Per statistic, the step's requests that need it as one paged batch (built at the
        first layer of the step, reused by every layer)."""
        if getattr(self, "_step_batches", None) is None:
            by_members: dict[tuple, _Batch] = {}
            self._step_batches = {}
            for stat in (s.name for s in STATISTIC_REGISTRY if s.batched):
                members = tuple(sr for sr in self.scored if stat in sr.hooked)
                if members:
                    key = tuple(id(sr) for sr in members)
                    if key not in by_members:
                        by_members[key] = _Batch.of(members)
                    self._step_batches[stat] = by_members[key]
        return self._step_batches

    def _token_positions(self, sr: ScoredRequest) -> torch.Tensor:
        bs = self.block_table.block_size
        return torch.cat([p * bs + torch.arange(n) for p, n in zip(sr.positions.tolist(), sr.tokens_per_block)])

    def _gram(self, index: int, name: str, hq: int) -> torch.Tensor | None:
        """Per-head Gram matrices G_h = W_O^h W_O^hᵀ of this layer's output projection (the
        attention module's ``o_proj``, ``out_proj``, ``dense`` or ``c_proj``), or None when the
        model names it otherwise: the statistic is then not measured and the scoring task is
        reported as skipped instead of failing the step."""
        if index not in self.grams:
            model, parent = self.runner.get_model(), name.rsplit(".", 1)[0]
            gram = None
            for child in _OUTPUT_PROJECTIONS:
                try:
                    o_proj = model.get_submodule(f"{parent}.{child}")
                except AttributeError:
                    continue
                # [hidden, Hq*D]: this rank's heads
                gram = dispatch.wo_gram(_linear_weight(o_proj), hq)
                break
            self.grams[index] = gram
        return self.grams[index]

    # -- after the forward ---------------------------------------------------------------------
    def finish_step(self) -> None:
        """Turn this step's statistics into block scores: policies run on the KV cache's
        device, the scores of every scored request are averaged over the TP group in one
        all-reduce on that device and copied to the host once."""
        results = []
        for sr in self.scored:
            missing = _missing_stats(sr, len(self.layer_names))
            if missing:
                self._skip(sr.req_id, f"{', '.join(missing)} not measured by the attention "
                           "hooks (a full CUDA graph replayed, or the hooks did not run)")
                results.append((sr, None))
                continue
            fields = {k: combine_layers(k, v) for k, v in sr.layers.items()}
            positions, parked, columns = sr.device_views()[:3]
            if sr.slot is not None:  # measured by the attention backend's kernel
                from vllm_kvevict.backend import buffers as stat_buffers

                fields["decode_mass"], fields["decode_peak"] = stat_buffers.active().read(
                    sr.slot, columns)
            stats = RequestStats(
                block_size=self.block_table.block_size,
                block_index=positions,
                num_tokens=sr.num_tokens,
                num_kv_heads=self.num_kv_heads,
                parked=parked.bool(),
                phase=sr.task.phase,
                visual=self._visual_mask(sr, positions),
                num_layers=len(self.layer_names),
                num_heads=self.num_heads,
                position_limit=int(sr.positions.max()) + 1,  # host tensor: no read-back
                **fields,
            )
            state = self.policy_state.setdefault((sr.req_id, sr.task.generation), {})
            results.append((sr, sr.policy.block_scores(stats, state).to(torch.float32)))
            if sr.task.phase == "prefill" and not sr.task.probe:
                self.probe_queries.pop(sr.req_id, None)  # the prompt is computed
        self.scored = []
        self._step_batches = None
        if not results:
            return
        flat, measured = _all_reduce_mean(
            [scores for _, scores in results], [sr.positions.numel() for sr, _ in results],
            device=self.runner.device, download=self.transfers.download,
        )
        for (sr, _), scores, ok in zip(results, flat, measured):
            if not ok:
                if sr.req_id not in self.skipped:
                    self._skip(sr.req_id, "another tensor-parallel rank measured nothing")
                continue
            self.pending_scores[sr.req_id] = BlockScores(
                generation=sr.task.generation, positions=sr.positions.cpu().numpy(), scores=scores,
                phase=sr.task.phase,
            )

    def _visual_mask(self, sr: ScoredRequest, positions: torch.Tensor) -> torch.Tensor | None:
        """[T] bool on the device of ``positions`` (the resident blocks' positional indices):
        the multimodal placeholder tokens. Token positions are computed there (every resident
        block is full but the last), the spans are host ints: nothing is uploaded."""
        if not sr.task.visual_spans:
            return None
        bs = self.block_table.block_size
        offsets = torch.arange(bs, device=positions.device)
        pos = (positions[:, None] * bs + offsets).flatten()[: sr.num_tokens]
        mask = torch.zeros_like(pos, dtype=torch.bool)
        for offset, length in sr.task.visual_spans:
            mask |= (pos >= offset) & (pos < offset + length)
        return mask

    def attach_scores(self, output) -> None:
        if not (self.pending_scores or self.skipped) or output is None:
            return
        target = getattr(output, "_model_runner_output", output)
        if hasattr(target, "req_ids"):
            if self.pending_scores:
                setattr(target, SCORES_ATTR, self.pending_scores)
                self.pending_scores = {}
            if self.skipped:
                setattr(target, SKIPPED_ATTR, {r: self._policy_name(r) for r in self.skipped})
                self.skipped = {}

    def _policy_name(self, req_id: str) -> str:
        task = self.plan.score.get(req_id) if self.plan else None
        return task.policy if task is not None else "unknown"


def _linear_weight(linear) -> torch.Tensor:
    """``[out, in]`` weight of a vLLM linear layer (this rank's shard), as the layer applies it.

    A plain unquantised weight is used as is. Otherwise — vLLM's CPU backend packs weights for
    its GEMM library and leaves ``weight`` empty; quantised methods (FP8, AWQ, GPTQ...) keep
    packed or scaled tensors, some transposed — the weight is read back by applying the layer's
    own GEMM (no bias, no TP all-reduce) to the identity: row ``i`` of ``I · Wᵀ`` is column
    ``i`` of the weight the layer really multiplies by (dequantised), exact for a plain one.
    """
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    weight = getattr(linear, "weight", None)
    if (isinstance(linear.quant_method, UnquantizedLinearMethod) and weight is not None
            and weight.dim() == 2 and weight.numel()
            and weight.dtype in (torch.float16, torch.bfloat16, torch.float32)):
        return weight.detach()
    device = next(iter(linear.parameters())).device if weight is None else weight.device
    eye = torch.eye(linear.input_size_per_partition, dtype=linear.params_dtype, device=device)
    return linear.quant_method.apply(linear, eye).t()


def _all_reduce_mean(scores: list[torch.Tensor | None], sizes: list[int], device,
                     download=lambda t: t.cpu()) -> tuple[list[np.ndarray], list[bool]]:
    """Average every scored request's block scores over the TP group in one all-reduce.

    Each TP rank measured only its own heads and only rank 0's output reaches the scheduler,
    so the scores are summed over the group. The tensor goes to the communicator on
    ``device`` (the KV cache's: pynccl all-reduces CUDA tensors only, gloo/shm CPU ones), with
    one 0/1 "measured" flag per request so a request any rank failed to measure is dropped on
    all of them, then comes to the host in one copy.

    Args:
        scores: per request ``[nb_i]`` float32 on ``device``, or None (not measured here).
        sizes: ``nb_i`` of each request (the same on every rank: the plan is shared).
    Returns:
        (per-request float32 score arrays ``[nb_i]``, per-request measured-by-every-rank
        flags).
    """
    parts = [s.to(device, torch.float32) if s is not None else
             torch.zeros(n, dtype=torch.float32, device=device) for s, n in zip(scores, sizes)]
    # made on the device (a tensor from a Python list would be an upload)
    flags = [torch.ones(1, device=device) if s is not None else torch.zeros(1, device=device)
             for s in scores]
    flat = torch.cat([*parts, *flags])
    world = _tp_world_size()
    if world > 1:
        from vllm.distributed import tensor_model_parallel_all_reduce

        flat = tensor_model_parallel_all_reduce(flat)
    host = download(flat)  # the step's one device -> host copy
    values, measured = host[: sum(sizes)] / world, host[sum(sizes):]
    out, start = [], 0
    for n in sizes:
        out.append(values[start: start + n].numpy())  # views of the one host copy
        start += n
    return out, [bool(m == world) for m in measured.tolist()]


def _tp_world_size() -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_world_size

        return get_tensor_model_parallel_world_size()
    except (ImportError, AssertionError):  # no TP group initialised (unit tests)
        return 1


def _attention_layers(ctx: dict, names=None) -> dict:
    """Attention layers with a KV cache from ``static_forward_context``, in layer order
    (only those in ``names`` when given: one KV-cache group's ``layer_names``)."""
    def index(name: str) -> int:
        match = _LAYER_INDEX.search(name + ".")
        return int(match.group(1)) if match else 0

    wanted = None if names is None else set(names)
    names = sorted((n for n, layer in ctx.items()
                    if hasattr(layer, "impl") and hasattr(layer, "kv_cache")
                    and (wanted is None or n in wanted)), key=index)
    return {n: ctx[n] for n in names}


def _head_size(layer, kv_cache: torch.Tensor) -> int:
    size = getattr(layer.impl, "head_size", None)
    return int(size) if size else kv_cache.shape[-1] // 2


def _expected_stats(sr: ScoredRequest) -> set[str]:
    """The ``RequestStats`` fields the attention hooks record for this request in this step."""
    return {f for name in sr.hooked for f in STATISTICS_BY_NAME[name].fields}


def _leading_decodes(num_scheduled_tokens: np.ndarray) -> int:
    """Rows before the first with more than one query token: the decode rows the plugin's
    backend serves with its kernel (``split_decodes_and_prefills`` with threshold 1 on the
    batch vLLM reordered for it, decode rows first)."""
    longer = np.flatnonzero(np.asarray(num_scheduled_tokens) > 1)
    return int(longer[0]) if longer.size else len(num_scheduled_tokens)


def _check_buffer_width(max_model_len: int, block_size: int) -> None:
    """The statistics buffers were sized at load time from the cache config's block size; the
    evicted group's real block size must not need more blocks per request (else a request's
    last blocks would have no statistics)."""
    from vllm_kvevict.adapter.startup_checks import UnsupportedConfigError
    from vllm_kvevict.backend import buffers

    need = -(-max_model_len // block_size)
    if buffers.active().max_blocks < need:
        raise UnsupportedConfigError(
            f"kv_eviction: the attention backend's statistics buffers hold "
            f"{buffers.active().max_blocks} blocks per request, the evicted KV-cache group needs "
            f"{need} ({max_model_len} tokens in blocks of {block_size}); set --block-size "
            f"explicitly")


def _fused_backend(layers: dict) -> bool:
    """Whether the evicted group's layers run the plugin's attention backend (all or none:
    a mix is refused by name), and its statistics buffers exist."""
    from vllm_kvevict.adapter.startup_checks import UnsupportedConfigError
    from vllm_kvevict.backend import NAME, buffers

    ours = [name for name, layer in layers.items() if layer.attn_backend.get_name() == NAME]
    if not ours:
        return False
    if len(ours) != len(layers):
        raise UnsupportedConfigError(
            f"kv_eviction: {len(ours)} of {len(layers)} evicted attention layers run the "
            f"plugin's attention backend ({NAME}); all or none must")
    if buffers.active() is None:
        raise UnsupportedConfigError(
            "kv_eviction: the attention layers run the plugin's backend but its statistics "
            "buffers were not allocated when the model was loaded")
    return True


def _missing_stats(sr: ScoredRequest, num_layers: int) -> list[str]:
    """Expected statistics not recorded for every attention layer (sorted names)."""
    return sorted(n for n in _expected_stats(sr)
                  if len(sr.layers.get(n, ())) != num_layers or num_layers == 0)


# -- class-level patches, inert unless the runner's engine has a kv_eviction config ------------
def _eviction(runner) -> WorkerEviction | None:
    state = runner.__dict__.get("_kvevict")
    if state is None:
        config = config_from_additional(getattr(runner.vllm_config, "additional_config", None))
        state = WorkerEviction(runner, config) if config is not None else False
        runner.__dict__["_kvevict"] = state
    return state or None


def install_runner_hooks() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner, "_kvevict_hooked", False):
        return
    update_states = GPUModelRunner._update_states
    prepare_inputs = GPUModelRunner._prepare_inputs
    determine_execution = GPUModelRunner._determine_batch_execution_and_padding
    execute_model = GPUModelRunner.execute_model
    sample_tokens = GPUModelRunner.sample_tokens
    initialize_kv_cache = GPUModelRunner.initialize_kv_cache
    load_model = GPUModelRunner.load_model

    def load_model_hook(self, *a, **k):
        result = load_model(self, *a, **k)
        ev = _eviction(self)
        if ev is not None:
            from vllm_kvevict.backend import buffers

            made = buffers.allocate(self.vllm_config, ev.config, self.device)
            if made is not None:
                logger.info("kv_eviction: attention backend statistics buffers: %.1f MiB "
                            "(%d KiB per scored request), before the KV pool is sized",
                            made.nbytes / 2**20, made.bytes_per_request() // 1024)
        return result

    def initialize_kv_cache_hook(self, *a, **k):
        result = initialize_kv_cache(self, *a, **k)
        ev = _eviction(self)
        if ev is not None:
            ev.check_layers()
        return result

    def _update_states_hook(self, scheduler_output, *a, **k):
        result = update_states(self, scheduler_output, *a, **k)
        ev = _eviction(self)
        if ev is not None:
            ev.begin_step(scheduler_output)
        return result

    def _prepare_inputs_hook(self, scheduler_output, num_scheduled_tokens, *a, **k):
        result = prepare_inputs(self, scheduler_output, num_scheduled_tokens, *a, **k)
        ev = _eviction(self)
        if ev is not None:
            ev.fix_inputs(num_scheduled_tokens)
        return result

    def _determine_execution_hook(self, *a, **k):
        ev = _eviction(self)
        if ev is None or not ev.needs_eager_attention:
            return determine_execution(self, *a, **k)
        with without_full_cudagraphs(self.cudagraph_dispatcher):
            return determine_execution(self, *a, **k)

    def execute_model_hook(self, *a, **k):
        output = execute_model(self, *a, **k)
        ev = _eviction(self)
        if ev is not None:
            ev.finish_step()
            ev.attach_scores(output)
        return output

    def sample_tokens_hook(self, *a, **k):
        output = sample_tokens(self, *a, **k)
        ev = _eviction(self)
        if ev is not None:
            ev.attach_scores(output)
        return output

    GPUModelRunner.initialize_kv_cache = initialize_kv_cache_hook
    GPUModelRunner.load_model = load_model_hook
    GPUModelRunner._update_states = _update_states_hook
    GPUModelRunner._prepare_inputs = _prepare_inputs_hook
    GPUModelRunner._determine_batch_execution_and_padding = _determine_execution_hook
    GPUModelRunner.execute_model = execute_model_hook
    GPUModelRunner.sample_tokens = sample_tokens_hook
    GPUModelRunner._kvevict_hooked = True


@contextmanager
def without_full_cudagraphs(dispatcher):
    """Within the block, ``dispatcher.dispatch`` never picks a FULL CUDA graph.

    A full graph replays the whole forward with no Python, so the ``impl.forward`` hooks that
    measure attention statistics would not run. The step then gets the mode vLLM itself uses
    when a full graph is not allowed (e.g. encoder-decoder steps with encoder outputs): a
    PIECEWISE graph where one was captured (attention runs eagerly between the pieces), else
    eager. vLLM's KV-cache writes and the compacted seq_lens/slot mapping are unaffected.
    """
    from vllm.config import CUDAGraphMode

    dispatch, own = dispatcher.dispatch, "dispatch" in vars(dispatcher)

    def no_full(*args, invalid_modes=None, **kwargs):
        invalid = set(invalid_modes or ()) | {CUDAGraphMode.FULL}
        return dispatch(*args, invalid_modes=invalid, **kwargs)

    dispatcher.dispatch = no_full
    try:
        yield
    finally:
        if own:
            dispatcher.dispatch = dispatch
        else:
            del dispatcher.dispatch  # back to the class's method
