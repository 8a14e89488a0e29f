"""The step's scored requests, batched for the statistics, then turned into block scores.

Why a module of its own: between the layer hooks (``layer_hooks``) and the scheduler sit two
data shapes and one reduction, used by every step that scores. A :class:`ScoredRequest` is one
request scored this step, resolved against the worker's batch (``step_inputs`` builds them); a
:class:`ScoringBatch` is the step's requests that need one statistic as one paged batch, what
one kernel launch reads. They are the worker's side of the typed seam with
``adapter/statistics.py`` (its :class:`~vllm_kvevict.adapter.statistics.ScoredRow` and
:class:`~vllm_kvevict.adapter.statistics.RowBatch`). After the forward, :class:`StepScoring`
combines each request's per-layer statistics, runs its policy on the KV cache's device,
averages the scores over the TP group in one all-reduce and copies them to the host once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vllm_kvevict.adapter import statistics
from vllm_kvevict.adapter.protocol import SCORES_ATTR, SKIPPED_ATTR, BlockScores, ScoreTask
from vllm_kvevict.adapter.transfers import StepTransfers
from vllm_kvevict.policies.base import WINDOW_ATTN, RequestStatistics

logger = logging.getLogger("vllm_kvevict")


@dataclass
class ScoredRequest:
    """One request being scored this step, resolved against the worker's batch.

    Its resident blocks (kept and parked, positional order) form one block-table row whose
    only partial block is the last: the statistics read it like any paged request. What the
    device reads of it goes up with the step's one upload (``fix_inputs`` sets
    :attr:`on_device`); the device-side properties read that upload.
    """

    req_id: str
    task: ScoreTask
    policy: Any  # policies.base.EvictionPolicy
    q_start: int
    q_end: int
    block_ids: torch.Tensor  # [nb] physical ids of resident blocks, positional order
    positions: torch.Tensor  # [nb] positional block indices
    parked: torch.Tensor  # [nb] bool
    tokens_per_block: list[int]
    query_positions: torch.Tensor  # original positions of this step's query tokens
    layers: dict[str, list[torch.Tensor]]  # stat name -> per-layer values
    #: statistics slot in the attention backend's buffers (a decode row of the plugin's
    #: backend: the kernel measures its decode statistics), else None (the hooks do)
    slot: int | None = None
    #: names of the statistics the attention hooks measure for it this step
    hooked: frozenset[str] = frozenset()
    #: ``device_parts()`` on the KV cache's device (set before the forward), else None
    on_device: list[torch.Tensor] | None = None
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
        """What the device reads for this request, uploaded with the step's other data before
        the forward.

        Returns:
            For the policies: positions, parked flags, statistics columns (``[nb]`` each); for
            the hooks (when they measure something) also the resident block ids ``[nb]``,
            ``[num_tokens, window]`` and the window's query token indices ``[window]``.
        """
        parts = [self.positions.numpy(), self.parked.numpy(), self.stat_columns.numpy()]
        return parts + self._hook_parts() if self.hooked else parts

    def _hook_parts(self) -> list[np.ndarray]:
        return [self.block_ids.numpy(), np.array([self.num_tokens, self.window]),
                np.arange(self.q_end - self.window, self.q_end)]

    def device_views(self) -> list[torch.Tensor]:
        """``device_parts()`` on the device, from the step's upload.

        Returns:
            int64 views, one per part, in ``device_parts()`` order.
        Raises:
            RuntimeError naming ``on_device`` when the step's upload did not include it.
        """
        if self.on_device is None:
            raise RuntimeError(f"ScoredRequest.on_device of {self.req_id}: not uploaded "
                               "(the worker's fix_inputs uploads device_parts() before the "
                               "forward)")
        return self.on_device

    def _hook_view(self, i: int) -> torch.Tensor:
        views = self.device_views()
        if len(views) <= 3:
            raise RuntimeError(f"ScoredRequest.hooked of {self.req_id} is empty: its block row "
                               "was not uploaded for the attention hooks")
        return views[3 + i]

    def set_hooked(self, names: Iterable[str]) -> None:
        """Set the statistics the attention hooks measure for it this step, and so its window
        (the policy's, at most this step's query tokens).

        Args:
            names: names of ``statistics.BY_NAME`` (a registry statistic or a variant).
        """
        self.hooked = frozenset(names)
        self.window = (min(self.policy.schedule.window or 32, self.q_end - self.q_start)
                       if WINDOW_ATTN in self.hooked else 0)

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
    def device_columns(self) -> torch.Tensor:
        """``[nb]`` int64 on the device: :attr:`stat_columns` as uploaded this step."""
        return self.device_views()[2]

    @property
    def parked_block_ids(self) -> list[int]:
        """Physical ids of the parked blocks, in positional order (their statistics columns)."""
        return self.block_ids[self.parked].tolist()

    def record(self, stat: str, value: torch.Tensor) -> None:
        """Append one layer's value of the field ``stat`` (``[Hkv, nb]``, ``[Hq, T]``, ...)."""
        self.layers.setdefault(stat, []).append(value)


@dataclass
class ScoringBatch:
    """The step's scored requests that need one batched statistic, as one paged batch: what
    one kernel launch reads for all of them (a ``statistics.RowBatch``, ``R`` rows in
    ``members`` order). Built on the device from the requests' uploaded views (nothing more is
    uploaded)."""

    members: tuple[ScoredRequest, ...]
    block_table: torch.Tensor  # [R, max_blocks] int32 (rows padded with block 0, never read)
    seq_lens: torch.Tensor  # [R] int32, compacted lengths
    #: [R, W] int64: each request's window query indices in the step's tokens, right-aligned
    #: (W = the longest window; a shorter one repeats its last index in front, masked; a
    #: request without a window gets zeros); None when no member has a window
    window_index: torch.Tensor | None
    window_lens: torch.Tensor | None  # [R] int32 (0: no window), None with window_index

    @classmethod
    def of(cls, members: Sequence[ScoredRequest]) -> ScoringBatch:
        """The batch of ``members`` (each hooked this step, its views uploaded).

        Args:
            members: ``R`` >= 1 scored requests.
        Returns:
            Their batch, on the device of their uploaded views.
        """
        members = tuple(members)
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


class StepScoring:
    """The worker's statistics side of a step (a part of ``WorkerEviction``): the scored
    requests as batches for the hooks, then their block scores for the scheduler, and the
    tasks that measured nothing (reported as skipped, never dropped silently).

    It owns :attr:`scored`, :attr:`pending_scores`, :attr:`skipped`, :attr:`policy_state`;
    it reads the runner facts of ``WorkerEviction`` and the layer hooks' ``layer_names`` and
    ``probe_queries``.
    """

    # of the other parts of WorkerEviction
    runner: Any
    plan: Any  # protocol.StepPlan | None
    layer_names: list[str]
    probe_queries: dict[str, dict[int, torch.Tensor]]
    block_table: Any
    num_kv_heads: int
    num_heads: int
    transfers: StepTransfers

    def __init__(self) -> None:
        #: this step's scored requests (built by ``StepInputs._resolve_scored``)
        self.scored: list[ScoredRequest] = []
        self.pending_scores: dict[str, BlockScores] = {}
        #: (req_id, generation) -> a policy's state kept across steps
        self.policy_state: dict[tuple[str, int], dict] = {}
        #: req_id -> why a scoring task of this step measured nothing (sent to the scheduler)
        self.skipped: dict[str, str] = {}
        self._warned: set[str] = set()
        self._step_batches: dict[str, ScoringBatch] | None = None

    def _skip(self, req_id: str, reason: str) -> None:
        self.skipped[req_id] = reason
        if reason not in self._warned:
            self._warned.add(reason)
            logger.warning("kv_eviction: scoring skipped (%s); counted in "
                           "vllm_kvevict_scoring_skipped_total", reason)

    def _batches(self) -> dict[str, ScoringBatch]:
        """Per statistic, the step's requests that need it as one paged batch (built at the
        first layer of the step, reused by every layer)."""
        if self._step_batches is None:
            by_members: dict[tuple, ScoringBatch] = {}
            self._step_batches = {}
            for stat in (s.name for s in statistics.MEASURED if s.batched):
                members = tuple(sr for sr in self.scored if stat in sr.hooked)
                if members:
                    key = tuple(id(sr) for sr in members)
                    if key not in by_members:
                        by_members[key] = ScoringBatch.of(members)
                    self._step_batches[stat] = by_members[key]
        return self._step_batches

    # -- after the forward ---------------------------------------------------------------------
    def finish_step(self) -> None:
        """Turn this step's statistics into block scores: policies run on the KV cache's
        device, the scores of every scored request are averaged over the TP group in one
        all-reduce on that device and copied to the host once."""
        results = [(sr, self._block_scores(sr)) for sr in self.scored]
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

    def _block_scores(self, sr: ScoredRequest) -> torch.Tensor | None:
        """``[nb]`` float32 on the device: the policy's scores of the request's resident blocks
        (positional order), or None when an expected statistic was not measured (skipped)."""
        missing = _missing_stats(sr, len(self.layer_names))
        if missing:
            self._skip(sr.req_id, f"{', '.join(missing)} not measured by the attention "
                       "hooks (a full CUDA graph replayed, or the hooks did not run)")
            return None
        fields = {k: statistics.combine_layers(k, v) for k, v in sr.layers.items()}
        positions, parked, columns = sr.device_views()[:3]
        if sr.slot is not None:  # measured by the attention backend's kernel
            from vllm_kvevict.backend import buffers as stat_buffers

            fields["decode_mass"], fields["decode_peak"] = stat_buffers.active().read(
                sr.slot, columns)
        stats = RequestStatistics(
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
        scores = sr.policy.block_scores(stats, state).to(torch.float32)
        if sr.task.phase == "prefill" and not sr.task.probe:
            self.probe_queries.pop(sr.req_id, None)  # the prompt is computed
        return scores

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

    def attach_scores(self, output: Any) -> None:
        """Put the pending block scores and skipped tasks on the runner's output for the
        scheduler (then forget them here).

        Args:
            output: a ``ModelRunnerOutput``, the async wrapper around one, or None.
        """
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


def _all_reduce_mean(scores: list[torch.Tensor | None], sizes: list[int], device,
                     download: Callable[[torch.Tensor], torch.Tensor] = lambda t: t.cpu(),
                     ) -> tuple[list[np.ndarray], list[bool]]:
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


def _missing_stats(sr: ScoredRequest, num_layers: int) -> list[str]:
    """The ``RequestStatistics`` fields the attention hooks record for this request in this step
    that were not recorded for every attention layer (sorted names)."""
    expected = {f for name in sr.hooked for f in statistics.BY_NAME[name].fields}
    return sorted(n for n in expected
                  if len(sr.layers.get(n, ())) != num_layers or num_layers == 0)
