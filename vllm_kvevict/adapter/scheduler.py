"""``EvictingScheduler``: vLLM's scheduler plus mid-sequence block eviction.

Each step: (1) apply decisions from the scores the workers sent last step — release, park
or restore blocks through the ``BlockLedger``; (2) let vLLM schedule as usual (with
pool-pressure eviction instead of preemption when enabled); (3) attach a ``StepPlan`` to the
``SchedulerOutput``: new compacted rows, per-request offsets E, and which requests the
workers must score during this step's forward pass.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import RequestStatus

from vllm_kvevict.adapter.keywords import block_keywords, with_keywords
from vllm_kvevict.adapter.ledger import BlockLedger, EvictionLog
from vllm_kvevict.adapter.probe import QuestionProbes
from vllm_kvevict.adapter.protocol import (
    PLAN_ATTR,
    SCORES_ATTR,
    SKIPPED_ATTR,
    ScoreTask,
    StepPlan,
)
from vllm_kvevict.adapter.vllm_internals import check_kv_cache_config
from vllm_kvevict.config import (
    CONFIG_KEY,
    EvictionConfig,
    config_from_additional,
    request_overrides,
)
from vllm_kvevict.metrics import EvictionMetrics
from vllm_kvevict.policies import get_policy
from vllm_kvevict.policies.base import EvictionPolicy, select_batch

logger = logging.getLogger("vllm_kvevict")


@dataclass
class RequestEviction:
    config: EvictionConfig
    policy: Any  # EvictionPolicy | None
    generation: int = 0
    #: the latest block scores from the workers: positions ascending, float32 values
    score_positions: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    score_values: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    decode_steps: int = 0  # decode steps since the last scoring
    evicted_tokens: int = 0  # released to the pool, cumulative (for reporting)
    visual_evicted_tokens: int = 0  # of those, multimodal embedding (image) tokens
    evicted_blocks: int = 0  # taken out of attention (parked or released), cumulative
    select_anyway: bool = False  # threshold policies (HAE) decide after prefill even in budget
    chunk_decision: bool = False  # the pending decision is between prompt chunks
    score_version: int = 0  # bumped by every set_scores (pool pressure's candidate cache key)
    #: pool pressure's evictable blocks of this request: (key, (positions, scores, kept) | None)
    pressure_cache: tuple | None = None
    #: ``prefill_query="keywords"``: [nb] keyword score per prompt block (adapter/keywords.py)
    keywords: np.ndarray | None = None

    def set_scores(self, positions, values) -> None:
        """Take the workers' ``positions`` / ``values`` (any order; the workers send them
        ascending) as the latest scores."""
        pos = np.asarray(positions, dtype=np.int64)
        values = np.asarray(values, dtype=np.float32)
        if len(pos) > 1 and not (pos[1:] > pos[:-1]).all():
            order = np.argsort(pos, kind="stable")
            pos, values = pos[order], values[order]
        self.score_positions, self.score_values = pos, values
        self.score_version += 1

    @property
    def scores(self) -> dict[int, float]:
        """``{position: score}`` view of the latest scores (reports, tests)."""
        return dict(zip(self.score_positions.tolist(), self.score_values.tolist()))


@dataclass
class _Pending:
    """One request's decision inputs, gathered before the step's batched selection."""

    request: Any
    state: RequestEviction
    positions: np.ndarray  # [nb] resident positional block indices, ascending
    committed: int
    parked: set[int]
    scores: np.ndarray  # [nb] float32 (0 where unscored; those are protected)
    scored: np.ndarray | None  # [nb] bool has a score; None: every block has one
    bounds: tuple[int, int]  # protection_bounds: positions < lo or >= hi are kept
    keep_blocks: int
    bin_blocks: int  # of the shared recycle bin, granted in running order
    release_zero: bool
    tier: np.ndarray | None  # [nb] int, release_zero policies only
    visual: torch.Tensor | None  # [nb] share of image tokens per block, multimodal requests only


class _Candidates(NamedTuple):
    """One request's evictable blocks under pool pressure (arrays over the candidates)."""

    req_id: str
    committed: int
    is_kept: np.ndarray  # bool: not parked
    shared: np.ndarray  # bool: held by another request too (prefix hit)
    scores: np.ndarray  # float32
    positions: np.ndarray  # int64


def _scores_at(state: RequestEviction, positions: np.ndarray
               ) -> tuple[np.ndarray | None, np.ndarray]:
    """([nb] bool has a score or None when every block has one, [nb] float32 score or 0) of
    the request's latest scores at ``positions``."""
    known = state.score_positions
    if not len(known):
        return np.zeros(len(positions), dtype=bool), np.zeros(len(positions), dtype=np.float32)
    if len(known) == len(positions) and known.tobytes() == positions.tobytes():
        return None, state.score_values  # the usual case: scores for exactly these blocks
    idx = np.minimum(np.searchsorted(known, positions), len(known) - 1)
    scored = known[idx] == positions
    return scored, np.where(scored, state.score_values[idx], 0.0).astype(np.float32)


def least_important(keys: tuple[np.ndarray, ...], need: int) -> np.ndarray:
    """Indices of the ``need`` smallest entries under the lexicographic order of ``keys``
    (most significant first, like reversed ``np.lexsort``), in that order - without sorting
    all of them: the first key is a small class (``int``), the second a score; within the
    last class needed, a partition finds the threshold score and only the entries at or
    below it are sorted.

    Args:
        keys: ``[n]`` arrays ``(class, score, *tie_breakers)``.
        need: how many (at most ``n`` are returned).
    Returns:
        ``[min(need, n)]`` int64 indices.
    """
    cls, score = keys[0], keys[1]
    chosen, left = [], need
    for c in np.unique(cls):
        if left <= 0:
            break
        members = np.flatnonzero(cls == c)
        if len(members) > left:  # only the `left` best of this class, found by partition
            threshold = np.partition(score[members], left - 1)[left - 1]
            members = members[~(score[members] > threshold)]  # ties (and NaN) sorted below
        order = np.lexsort(tuple(k[members] for k in reversed(keys[1:])))
        chosen.append(members[order][:left])
        left -= len(chosen[-1])
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)


def _custom_select(policy) -> bool:
    """The policy overrides ``EvictionPolicy.select`` (the batched path cannot run it)."""
    return type(policy).select is not EvictionPolicy.select


def visual_spans(request) -> list[tuple[int, int]]:
    """``(offset, length)`` of each run of prompt tokens that a multimodal encoder fills.

    vLLM's ``PlaceholderRange`` (``request.mm_features[i].mm_position``) covers an item's
    whole replacement, wrapper tokens included (Idefics3:
    ``<fake_token_around_image><global-img>`` + 64 ``<image>`` + ``<fake_token_around_image>``,
    67 tokens); its ``is_embed`` mask marks the positions that take encoder embeddings (the 64
    ``<image>`` tokens). The wrappers are ordinary text-token embeddings, so only the embedded
    runs count as visual (one run per image tile; the whole range when ``is_embed`` is None).
    """
    spans = []
    for feature in getattr(request, "mm_features", None) or []:
        pos = feature.mm_position
        if pos.is_embed is None:
            spans.append((pos.offset, pos.length))
        else:
            spans.extend((start, end + 1 - start) for start, end in pos.extract_embeds_range())
    return [(int(offset), int(length)) for offset, length in spans if length > 0]


def visual_token_count(spans: list[tuple[int, int]], positions, block_size: int) -> int:
    """Visual tokens held by the blocks at ``positions``: a block mixing text and image tokens
    counts each token by its own modality (as ``EvictingScheduler._visual_blocks`` does)."""
    total = 0
    for p in positions:
        lo, hi = p * block_size, (p + 1) * block_size
        total += sum(max(0, min(hi, off + n) - max(lo, off)) for off, n in spans)
    return total


def protection_bounds(config: EvictionConfig, committed: int, block_size: int,
                      sized_for: int | None = None) -> tuple[int, int]:
    """``(lo, hi)``: a decision keeps the blocks at positions below ``lo`` (the sink) and from
    ``hi`` on (the recent window, shrunk with the budget, and blocks not yet full or
    committed). See :func:`protected_mask`."""
    bs = block_size
    budget_blocks = config.keep_blocks(max(committed, sized_for or 0), bs)
    sink_blocks, recent_room = config.protection(budget_blocks, bs)
    recent_start = max(committed - config.recent_tokens, 0) // bs
    full_blocks = committed // bs
    if recent_room is not None:  # shrunk default: at most recent_room full recent blocks
        recent_start = max(recent_start, full_blocks - recent_room)
    return sink_blocks, min(recent_start, full_blocks)


def protected_mask(config: EvictionConfig, positions: np.ndarray, committed: int,
                   scored: np.ndarray | None, block_size: int, sized_for: int | None = None
                   ) -> np.ndarray:
    """[nb] bool: blocks a decision must keep - the sink, the recent window (shrunk with the
    budget), blocks not yet full or committed, and blocks without a score.

    Args:
        positions: ``[nb]`` positional block indices (int64).
        committed: tokens computed and not in flight.
        scored: ``[nb]`` bool, the block has a score from the workers (None: all have).
        sized_for: the sequence length whose budget sizes the sink and recent protection
            (default ``committed``). Decisions between prompt chunks pass the prompt length:
            sized for the few tokens computed so far, the protection would shrink to nothing
            and the first chunks would lose the attention sink for good.
    """
    lo, hi = protection_bounds(config, committed, block_size, sized_for)
    return protected_by_bounds(positions, lo, hi, None if scored is None else ~scored)


def protected_by_bounds(positions: np.ndarray, lo, hi, unscored: np.ndarray | None = None
                        ) -> np.ndarray:
    """The protection rule itself, for one request (``lo``, ``hi`` ints) or a padded batch
    (``[R, 1]`` columns against ``[R, W]`` positions): kept are positions below ``lo``, from
    ``hi`` on, and the ``unscored`` ones (None: every block has a score)."""
    protected = (positions < lo) | (positions >= hi)
    return protected if unscored is None else protected | unscored


def request_config(default: EvictionConfig, request) -> EvictionConfig:
    """The request's config: the server default with its ``extra_args.kv_eviction`` applied."""
    params = getattr(request, "sampling_params", None)
    overrides = request_overrides(getattr(params, "extra_args", None))
    return default if overrides is None else default.with_overrides(overrides)


class EvictingScheduler(Scheduler):
    def __init__(self, vllm_config, kv_cache_config, *args, **kwargs):
        #: the KV-cache group evicted in (the full-attention one); other groups are untouched
        self.kv_gid = check_kv_cache_config(kv_cache_config)
        self.kv_hybrid = len(kv_cache_config.kv_cache_groups) > 1
        super().__init__(vllm_config, kv_cache_config, *args, **kwargs)
        self.kv_default = config_from_additional(vllm_config.additional_config) or EvictionConfig()
        manager = self.kv_cache_manager.coordinator.single_type_managers[self.kv_gid]
        self.ledger = BlockLedger(manager, bin_capacity=self.kv_default.recycle_bin_total_blocks)
        self.kv_block_size = manager.block_size
        self.kv_requests: dict[str, RequestEviction] = {}
        group = kv_cache_config.kv_cache_groups[self.kv_gid]
        self.kv_metrics = EvictionMetrics(
            block_bytes=group.kv_cache_spec.page_size_bytes * len(group.layer_names)
        )
        # req_id -> [(effective from token, excluded positions)], dropped at finish; kept for
        # the last finished requests only (bounded) so tests can rebuild reference masks.
        # Only with KVEVICT_EVICTION_LOG=1 (the tests and bench_quality set it): a serving
        # engine does not pay a mask copy per decision for it.
        self.kv_log_enabled = os.environ.get("KVEVICT_EVICTION_LOG") == "1"
        self.kv_log: dict[str, EvictionLog] = {}
        self.kv_log_finished: dict[str, EvictionLog] = {}
        #: requests whose scores arrived since their last decision (decide at the next step)
        self.kv_fresh: set[str] = set()
        #: hidden question-probe requests (``prefill_query="probe"``), and probes to abort
        self.kv_probes = QuestionProbes(self.kv_block_size)
        self.kv_probe_aborts: list[str] = []
        self._install_guards()

    @property
    def kv_counters(self):
        """Engine-wide totals over all policies (tests, logs)."""
        return self.kv_metrics.totals

    # -- vLLM instance hooks -------------------------------------------------------------------
    def _install_guards(self) -> None:
        coordinator = self.kv_cache_manager.coordinator
        original_cache_blocks = coordinator.cache_blocks
        ledger = self.ledger

        def cache_blocks(request, num_computed_tokens):
            # prefix-cache poisoning: never publish blocks computed after an eviction (they
            # hold K/V computed without the evicted tokens)
            num = ledger.cacheable_tokens(request.request_id, num_computed_tokens)
            return original_cache_blocks(request, num)

        coordinator.cache_blocks = cache_blocks

        original_allocate = self.kv_cache_manager.allocate_slots

        def allocate_slots(request, num_new_tokens, *args, **kwargs):
            if kwargs.get("full_sequence_must_fit") and self._bounded_prefill(request):
                # vLLM admits a request only if its whole prompt fits the pool; with prefill
                # eviction it never holds more than its peak (budget + one chunk)
                if not self._peak_fits(request):
                    return None
                kwargs["full_sequence_must_fit"] = False
            blocks = original_allocate(request, num_new_tokens, *args, **kwargs)
            # Only where vLLM would preempt: a *running* request short of blocks. A waiting
            # request short of blocks just waits; evicting to admit it would trade quality
            # for concurrency nobody asked for.
            if (blocks is not None or not self.kv_default.pool_pressure
                    or request.status != RequestStatus.RUNNING):
                return blocks
            need = math.ceil(max(num_new_tokens, 1) / self.kv_block_size) + 1
            while blocks is None and self._free_under_pressure(need):
                blocks = original_allocate(request, num_new_tokens, *args, **kwargs)
            if blocks is not None:
                self.kv_metrics.preemptions_avoided += 1
                self.kv_metrics.dirty = True
            return blocks

        self.kv_cache_manager.allocate_slots = allocate_slots

        original_computed = self.kv_cache_manager.get_computed_blocks

        def get_computed_blocks(request, *args, **kwargs):
            # vLLM 0.33 passes max_cache_hit_length (an upper bound on the hit); the cap below
            # only ever shortens what vLLM found, so it composes with that bound
            return self._cap_prefix_hit(request, *original_computed(request, *args, **kwargs))

        self.kv_cache_manager.get_computed_blocks = get_computed_blocks

    def _bounded_prefill(self, request) -> bool:
        """The request evicts between prefill chunks (not on hybrid models: their sliding-window
        groups hold blocks the full group's bound does not describe, so vLLM's whole-prompt
        admission check stays)."""
        state = self.kv_requests.get(request.request_id)
        return (state is not None and state.config.enabled and state.config.prefill_eviction
                and not self.kv_hybrid)

    def _peak_fits(self, request) -> bool:
        """Admission with prefill eviction: the pool has room for the most blocks the request
        can hold at once (``EvictionConfig.peak_blocks`` of its current length), in place of
        vLLM's whole-prompt check."""
        config = self.kv_requests[request.request_id].config
        peak = config.peak_blocks(request.num_tokens, self.max_num_scheduled_tokens,
                                  self.kv_block_size)
        held = len(self.ledger.resident_array(request.request_id))
        return self.kv_cache_manager.block_pool.get_num_free_blocks() >= peak - held

    def _cap_prefix_hit(self, request, blocks, num_computed: int, *rest):
        """A windowed policy scores the prompt through the queries computed in its last
        prefill step; a prefix-cache hit can leave fewer than its ``window`` (a prompt whose
        length is not a block multiple keeps only ``len % block_size`` queries). So for a
        request that will be scored at prefill the hit stops where at least ``window`` prompt
        tokens remain to compute: those blocks are recomputed (exactly: they hold prefix-cache
        K/V computed with full attention). A hybrid model gets no hit instead: a shorter hit
        is not valid for its sliding-window groups, whose cached rows hold only the blocks
        of the window before the hit's end (the rest are null blocks)."""
        state = self.kv_requests.get(request.request_id)
        window = state.policy.window if state is not None else 0
        bs, prompt = self.kv_block_size, request.num_prompt_tokens
        if not window or not num_computed or state.config.below_floor(prompt):
            return (blocks, num_computed, *rest)
        scored = (state.config.keep_blocks(prompt, bs) < math.ceil(prompt / bs)
                  or state.policy.select_after_prefill)
        limit = max(prompt - window, 0) // bs * bs
        if not scored or num_computed <= limit:
            return (blocks, num_computed, *rest)
        if self.kv_hybrid:
            # no hit: 0.32/0.33's third value (a shared-prefix boundary) is 0 with it
            return (self.kv_cache_manager.empty_kv_cache_blocks, 0, *(0 for _ in rest))
        from vllm.v1.core.kv_cache_manager import KVCacheBlocks

        capped = KVCacheBlocks(tuple(list(group[: limit // bs]) for group in blocks.blocks))
        return (capped, limit, *rest)

    # -- request lifecycle ---------------------------------------------------------------------
    def add_request(self, request) -> None:
        try:
            config = request_config(self.kv_default, request)
        except ValueError as exc:
            # The front end validates per-request options; this is a last line of defence.
            logger.warning("request %s: %s; using the server default", request.request_id, exc)
            config = self.kv_default
        if config.enabled:
            state = self.kv_requests[request.request_id] = RequestEviction(
                config=config, policy=get_policy(config.policy, config.options)
            )
            if (config.prefill_eviction and config.prefill_query == "keywords"
                    and getattr(state.policy, "window", 0) and request.prompt_token_ids):
                state.keywords = block_keywords(request.prompt_token_ids, self.kv_block_size,
                                                state.policy.window)
            probe = self._question_probe(request, state)
            if probe is not None:
                super().add_request(probe)  # ahead of its parent: computed with its first chunk
        super().add_request(request)

    def _question_probe(self, request, state: RequestEviction):
        """The hidden probe request of a prompt whose middle chunks will be evicted with the
        question's queries (``prefill_query="probe"``, ``adapter/probe.py``), or None."""
        config, window = state.config, getattr(state.policy, "window", 0)
        prompt = request.num_prompt_tokens
        if not (config.prefill_eviction and config.prefill_query == "probe" and window
                and not self.kv_hybrid and prompt > self.max_num_scheduled_tokens
                and not config.below_floor(prompt)):
            return None
        return self.kv_probes.make(request, window)

    def _free_request(self, request, *args, **kwargs):
        """Finish: report what was evicted for this request on its final output (vLLM carries
        ``kv_transfer_params`` to ``RequestOutput`` and to non-streaming OpenAI responses)."""
        report = self._eviction_report(request)
        kv_params, *rest = super()._free_request(request, *args, **kwargs)
        if report is not None:
            kv_params = {**(kv_params or {}), CONFIG_KEY: report}
        return (kv_params, *rest)

    def _eviction_report(self, request) -> dict | None:
        state = self.kv_requests.get(request.request_id)
        if state is None:
            return None
        bs = self.kv_block_size
        rb = self.ledger.requests.get(request.request_id)
        total = request.num_computed_tokens
        excluded = (len(rb.parked) + rb.num_released) * bs if rb else 0
        return {
            "policy": state.config.policy,
            "total_tokens": total,
            "attended_tokens": total - excluded,  # in attention at the end
            "evicted_tokens": state.evicted_tokens,  # returned to the pool
            # by modality (image placeholder tokens vs the rest; sums to evicted_tokens)
            "visual_evicted_tokens": state.visual_evicted_tokens,
            "text_evicted_tokens": state.evicted_tokens - state.visual_evicted_tokens,
            "parked_tokens": len(rb.parked) * bs if rb else 0,
            "evicted_blocks": state.evicted_blocks,  # ever taken out of attention
        }

    def _free_request_blocks(self, request) -> None:
        # Finish, abort and preemption all pass here. vLLM frees every non-null block in the
        # list (parked ones included); a preempted request restarts with full attention.
        super()._free_request_blocks(request)
        self.ledger.forget(request.request_id)
        state = self.kv_requests.get(request.request_id)
        if state is None:
            return
        log = self.kv_log.pop(request.request_id, None)
        if request.is_finished():
            del self.kv_requests[request.request_id]
            probe = self.kv_probes.parent_gone(request.request_id)
            if probe is not None:
                self.kv_probe_aborts.append(probe)  # never computed: aborted at the next step
            if log:
                self.kv_log_finished[request.request_id] = log
                while len(self.kv_log_finished) > 64:
                    self.kv_log_finished.pop(next(iter(self.kv_log_finished)))
        else:
            state.generation += 1
            state.set_scores([], [])
            self.kv_fresh.discard(request.request_id)
            state.decode_steps = 0
            state.chunk_decision = False

    # -- the step ------------------------------------------------------------------------------
    def schedule(self, *args, **kwargs):
        if self.kv_probe_aborts:
            self._abort_probes()
        if self.kv_requests:
            self._apply_decisions()
        output = super().schedule(*args, **kwargs)
        setattr(output, PLAN_ATTR, self._step_plan(output) if self.kv_requests else None)
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
        if scores:
            for req_id, block_scores in scores.items():
                state = self.kv_requests.get(req_id)
                if state is None or state.generation != block_scores.generation:
                    continue  # finished or preempted since: the scores describe old blocks
                self._note_scores(req_id, state, block_scores.positions, block_scores.scores)

    def _note_scores(self, req_id: str, state: RequestEviction, positions, values) -> None:
        """Take a request's fresh block scores: it decides at the next ``schedule``."""
        state.set_scores(positions, values)
        self.kv_fresh.add(req_id)

    # -- decisions -----------------------------------------------------------------------------
    def _committed_tokens(self, request) -> int:
        return request.num_computed_tokens - getattr(request, "num_in_flight_tokens", 0)

    def _protected(self, config: EvictionConfig, positions: list[int], committed: int,
                   scores: dict[int, float]) -> torch.Tensor:
        """:func:`protected_mask` for a position list and a ``{position: score}`` dict."""
        scored = np.fromiter((p in scores for p in positions), dtype=bool, count=len(positions))
        pos = np.asarray(positions, dtype=np.int64)
        return torch.from_numpy(protected_mask(config, pos, committed, scored, self.kv_block_size))

    def _apply_decisions(self) -> None:
        """Decide for every running request with fresh scores: the inputs of each gathered,
        one :func:`select_batch` per selection rule for all of them, then the ledger."""
        if not self.kv_fresh:
            return
        fresh = self.kv_fresh
        deciding = []
        for request in self.running:  # in running order: the bin is granted in that order
            if request.request_id in fresh:
                state = self.kv_requests.get(request.request_id)
                if state is not None:
                    deciding.append((request, state))
        # the decided leave the set, and the finished; one not running now keeps its scores
        fresh.difference_update(r.request_id for r, _ in deciding)
        fresh.intersection_update(self.kv_requests)
        if deciding:
            self._decide_batch(deciding)

    def _decide_batch(self, deciding: list) -> None:
        started = time.perf_counter()
        pending = [p for p in (self._decision_input(r, s) for r, s in deciding) if p is not None]
        # the recycle bin is shared: each request's share is granted from what the ones before
        # it (running order) may take, so that all of them parking at once never overfill it
        room = self.ledger.bin_capacity - self.ledger.num_parked_total()
        for p in pending:
            available = room + len(p.parked)
            wanted = p.state.config.recycle_bin_blocks
            if not p.state.config.prefill_eviction:  # its pool holds budget + a chunk only
                wanted = max(wanted, p.state.policy.store_blocks(p.keep_blocks))
            p.bin_blocks = max(0, min(wanted, available))
            room = available - p.bin_blocks
        for p in [p for p in pending if _custom_select(p.state.policy)]:
            self._select_one(p)
        pending = [p for p in pending if not _custom_select(p.state.policy)]
        for release_zero in (False, True):
            group = [p for p in pending if p.release_zero == release_zero]
            if group:
                self._select_and_apply(group, release_zero)
        share = (time.perf_counter() - started) / len(deciding)
        for policy, count in Counter(s.config.policy for _, s in deciding).items():
            self.kv_metrics.policy(policy).observe_decision(share, count)

    def _decision_input(self, request, state: RequestEviction) -> _Pending | None:
        """What a decision needs, as arrays; None when this request has nothing to decide."""
        req_id, bs, ledger = request.request_id, self.kv_block_size, self.ledger
        committed = self._committed_tokens(request)
        config = state.config
        # between prompt chunks the request may hold its whole prompt's budget (see _score_task)
        keep_blocks = config.keep_blocks(
            request.num_prompt_tokens if state.chunk_decision else committed, bs)
        rb = ledger.requests.get(req_id)
        parked = set(rb.parked) if rb is not None and rb.parked else set()
        select_anyway, state.select_anyway = state.select_anyway, False
        # blocks in attention, O(1): policies scored at every step (H2O, HybridKV) get here at
        # every step, and are within budget at most of them
        if ledger.num_attended(req_id) <= keep_blocks and not parked and not select_anyway:
            return None
        pos = ledger.resident_array(req_id)
        if not len(pos):
            return None
        scored, scores = _scores_at(state, pos)
        if state.chunk_decision and state.keywords is not None:
            scores = with_keywords(scores, pos, state.keywords)
        visual = self._visual_blocks(request, pos.tolist()) if getattr(request, "mm_features", None) else None
        tier = state.policy.tier(visual) if state.policy.release_zero else None
        return _Pending(
            request=request, state=state, positions=pos, committed=committed, parked=parked,
            scores=scores, scored=scored, keep_blocks=keep_blocks,
            bounds=protection_bounds(config, committed, bs, sized_for=request.num_prompt_tokens),
            bin_blocks=0,  # granted by _decide_batch
            release_zero=state.policy.release_zero,
            tier=None if tier is None else tier.cpu().numpy(), visual=visual,
        )

    def _select_one(self, p: _Pending) -> None:
        """A policy with its own ``select`` (an extension point): called as is, per request."""
        decision = p.state.policy.select(
            torch.from_numpy(p.scores), block_index=torch.from_numpy(p.positions),
            keep_blocks=p.keep_blocks, protected=torch.from_numpy(protected_by_bounds(
                p.positions, *p.bounds, None if p.scored is None else ~p.scored)),
            bin_blocks=p.bin_blocks, visual_blocks=p.visual,
        )
        self._apply(p, p.positions[decision.keep.numpy()], p.positions[decision.park.numpy()],
                    p.positions[decision.release.numpy()])

    def _select_and_apply(self, group: list[_Pending], release_zero: bool) -> None:
        """One :func:`select_batch` for ``group``: its inputs padded to ``[R, W]`` (one row
        per request, positions ascending), protection computed for all rows at once."""
        lens = np.fromiter((len(p.positions) for p in group), np.int64, len(group))
        shape = (len(group), int(lens.max()))
        positions = np.zeros(shape, dtype=np.int64)
        scores, unscored = np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=bool)
        has_tier = release_zero and any(p.tier is not None for p in group)
        tier = np.zeros(shape, dtype=np.int64) if has_tier else None
        for i, p in enumerate(group):
            n = len(p.positions)
            positions[i, :n], scores[i, :n] = p.positions, p.scores
            if p.scored is not None:
                unscored[i, :n] = ~p.scored
            if tier is not None and p.tier is not None:
                tier[i, :n] = p.tier
        valid = np.arange(shape[1]) < lens[:, None]
        lo, hi = (np.array(b) for b in zip(*(p.bounds for p in group)))
        protected = valid & protected_by_bounds(positions, lo[:, None], hi[:, None], unscored)
        decision = select_batch(
            scores, valid, protected, np.array([p.keep_blocks for p in group]),
            np.array([p.bin_blocks for p in group]), release_zero=release_zero, tier=tier,
        )
        for i, p in enumerate(group):
            row = positions[i]
            if p.parked or p.bin_blocks:
                self._apply(p, row[decision.keep[i]], row[decision.park[i]],
                            row[decision.release[i]])
            else:  # nothing parked before or after: the kept blocks need no ledger call
                self._apply(p, None, None, row[decision.release[i]])

    def _apply(self, p: _Pending, keep: np.ndarray | None, park: np.ndarray | None,
               release: np.ndarray) -> None:
        """Carry out one request's decision through the ledger: restore parked blocks it
        keeps, release, park; count and log.

        Args:
            keep, park, release: int64 positions, each ascending (``[k]``, disjoint); keep
                and park may be None when the request has no recycle bin and nothing parked.
        """
        req_id, parked = p.request.request_id, p.parked
        restored = from_bin = newly_parked = 0
        if parked:
            restored = self.ledger.restore(req_id, parked.intersection(keep.tolist()))
            from_bin = len(parked.intersection(release.tolist()))
        released = self.ledger.release(req_id, release, p.committed, ordered=True)
        if park is not None and len(park):
            newly_parked = self.ledger.park(
                req_id, [q for q in park.tolist() if q not in parked], p.committed)
        self._count(p.state, restored=restored, released=len(released), parked=newly_parked,
                    evicted=len(released) - from_bin + newly_parked,
                    visual=self._visual_tokens(p.request, released))
        self._log(req_id, p.committed)

    def _visual_tokens(self, request, positions) -> int:
        spans = visual_spans(request)
        return visual_token_count(spans, positions, self.kv_block_size) if spans else 0

    def _count(self, state: RequestEviction, *, restored: int = 0, released: int = 0,
               parked: int = 0, evicted: int = 0, pressure: int = 0, visual: int = 0) -> None:
        """Update the per-policy metrics and the request's own report; ``visual`` of the
        ``released`` blocks' tokens are image tokens."""
        state.evicted_tokens += released * self.kv_block_size
        state.visual_evicted_tokens += visual
        if not (restored or released or parked or evicted):
            return
        metrics = self.kv_metrics
        counters = metrics.policy(state.config.policy)
        if evicted and not state.evicted_blocks:
            counters.requests_with_eviction += 1
        state.evicted_blocks += evicted
        counters.restored_blocks += restored
        counters.released_blocks += released
        counters.parked_blocks += parked
        counters.evicted_blocks += evicted
        counters.pool_pressure_released_blocks += pressure
        counters.bytes_freed += released * metrics.block_bytes
        counters.visual_evicted_tokens += visual
        counters.text_evicted_tokens += released * self.kv_block_size - visual
        metrics.parked_blocks_now = self.ledger.num_parked_total()

    def _log(self, req_id: str, committed: int) -> None:
        """Record the excluded set and the token from which it applies (tests rebuild the
        reference attention mask from this log)."""
        if not self.kv_log_enabled:
            return
        log = self.kv_log.get(req_id)
        if log is None:
            log = self.kv_log[req_id] = EvictionLog()
        log.record(committed, self.ledger.excluded_mask(req_id))

    def _visual_blocks(self, request, positions: list[int]) -> torch.Tensor | None:
        """[nb] float32: the share of each block's tokens that are multimodal embedding tokens
        (1: an all-image block, 0: text only, between: a mixed block)."""
        spans = visual_spans(request)
        if not spans:
            return None
        bs = self.kv_block_size
        return torch.tensor([visual_token_count(spans, (p,), bs) / bs for p in positions],
                            dtype=torch.float32)

    def _free_under_pressure(self, need: int) -> bool:
        """Pool-pressure mode: release parked blocks first, then the globally least important
        evictable blocks of running requests. Returns False if nothing could be freed.

        The candidates of every running request are gathered as arrays and the first
        ``need`` picked by :func:`least_important` (a partition, not a sort of all of them):
        parked before kept, blocks only this request holds before blocks shared through a
        prefix hit (releasing those frees no memory), then by score, request id and
        position; they are released with one ledger call per request."""
        parts: list[_Candidates] = []
        running = {}
        caching = self.kv_cache_manager.enable_caching
        for request in self.running:
            req_id = request.request_id
            running[req_id] = request
            state = self.kv_requests.get(req_id)
            if state is None:
                continue
            committed = self._committed_tokens(request)
            found = self._pressure_candidates(req_id, state, committed)
            if found is None:
                continue
            cand, scores, is_kept = found
            if caching:  # another request holds it too only through a prefix-cache hit
                blocks = self.ledger.blocks(req_id)
                shared = np.fromiter((blocks[q].ref_cnt > 1 for q in cand.tolist()), bool,
                                     len(cand))
            else:
                shared = np.zeros(len(cand), dtype=bool)
            parts.append(_Candidates(req_id, committed, is_kept, shared, scores, cand))
        if not parts:
            return False
        rank = {req_id: r for r, req_id in enumerate(sorted(p.req_id for p in parts))}
        req = np.repeat(np.array([rank[p.req_id] for p in parts]),
                        [len(p.positions) for p in parts])
        pos = np.concatenate([p.positions for p in parts])
        is_kept = np.concatenate([p.is_kept for p in parts])
        shared = np.concatenate([p.shared for p in parts])
        order = least_important(
            (2 * is_kept + shared, np.concatenate([p.scores for p in parts]), req, pos), need)
        chosen: dict[int, list[int]] = {}
        for i in order.tolist():
            chosen.setdefault(int(req[i]), []).append(i)
        freed = 0
        for req_id, committed, *_ in parts:
            picked = chosen.get(rank[req_id])
            if not picked:
                continue
            released = self.ledger.release(req_id, pos[picked].tolist(), committed)
            kept_released = set(pos[[i for i in picked if is_kept[i]]].tolist()) & set(released)
            freed += len(released)
            self._count(self.kv_requests[req_id], released=len(released), pressure=len(released),
                        evicted=len(kept_released),
                        visual=self._visual_tokens(running[req_id], released))
            self._log(req_id, committed)
        return freed > 0

    def _pressure_candidates(self, req_id: str, state: RequestEviction, committed: int
                             ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """``(positions, scores, kept)`` of the request's evictable blocks (``[k]`` each:
        int64, float32, bool not parked), or None when it has none. Cached per request until
        its scores, its ledger entry or its protection bounds change: a full pool may ask at
        every step, and most running requests have not changed since the last call."""
        if state.config.below_floor(committed):
            return None  # short requests are never evicted, not even under pool pressure
        lo, hi = protection_bounds(state.config, committed, self.kv_block_size)
        rb = self.ledger.requests.get(req_id)
        key = (state.score_version, -1 if rb is None else rb.version, lo, hi)
        if state.pressure_cache is not None and state.pressure_cache[0] == key:
            return state.pressure_cache[1]
        pos = self.ledger.resident_array(req_id)
        scored, scores = _scores_at(state, pos)
        evictable = ~protected_by_bounds(pos, lo, hi, None if scored is None else ~scored)
        found = None
        if evictable.any():
            cand = pos[evictable]
            parked = rb.parked if rb is not None else set()
            is_kept = (~np.isin(cand, np.fromiter(parked, np.int64, len(parked))) if parked
                       else np.ones(len(cand), dtype=bool))
            found = (cand, scores[evictable], is_kept)
        state.pressure_cache = (key, found)
        return found

    # -- the plan for the workers --------------------------------------------------------------
    def _step_plan(self, output) -> StepPlan:
        """What the workers need this step: the changed compacted rows, every scheduled
        request's offset E, and the scoring tasks due. Runs for every scheduled request each
        step, so the per-request path is a few attribute reads; rows and offsets come from
        what the ledger keeps up to date."""
        scheduled = output.num_scheduled_tokens
        ledger, bs = self.ledger, self.kv_block_size
        # every request with blocks out of attention (the workers read the scheduled ones)
        plan = StepPlan(offsets={r: n * bs for r, n in ledger.excluded_blocks.items()})
        rows = {r: ledger.compacted_row(r) for r in ledger.take_changed(scheduled)
                if r in self.kv_requests}
        plan.rows = {r: ids for r, (ids, _) in rows.items()}
        requests, states = self.requests, self.kv_requests
        for req_id, num_tokens in scheduled.items():
            state = states.get(req_id)
            if state is None:
                if self.kv_probes.is_probe(req_id):
                    probe = self.kv_probes.task(requests[req_id], num_tokens)
                    if probe is not None and probe.parent in states:
                        plan.probes[req_id] = probe
                continue
            request = requests[req_id]
            if request.num_computed_tokens - num_tokens >= request.num_prompt_tokens:
                # decode: due every ``interval`` of its decode steps (or every step)
                state.decode_steps += 1
                if (state.decode_steps < state.config.interval
                        and not state.policy.score_every_step):
                    continue
            task = self._score_task(request, state, num_tokens, rows.get(req_id))
            if task is not None:
                plan.score[req_id] = task
        return plan

    def _score_task(self, request, state: RequestEviction, num_tokens: int,
                    row: tuple[list[int], list[int]] | None = None) -> ScoreTask | None:
        """Score right after prefill, then every ``interval`` decode steps while over budget
        (or while blocks sit in the recycle bin, which may need restoring). With
        ``prefill_eviction`` also every earlier prompt chunk that leaves the request over
        budget, scored (phase ``"prefill"``) by that chunk's own queries; the decision runs
        at the next ``schedule``, before the next chunk is allocated.

        Called by ``_step_plan`` for prefill steps and for decode steps that are due (it has
        counted the decode step). ``row``: the request's ``compacted_row`` if already built.
        """
        done = request.num_computed_tokens  # already advanced by this step's tokens
        before = done - num_tokens
        prompt = request.num_prompt_tokens
        middle = False
        if before < prompt <= done:
            phase = "prefill"
        elif before >= prompt:
            phase = "decode"
        elif state.config.prefill_eviction:
            phase, middle = "prefill", True
        else:
            return None  # a middle prefill chunk
        req_id = request.request_id
        rb = self.ledger.requests.get(req_id)
        if state.config.below_floor(max(done, prompt)) and not (rb and rb.parked):
            return None  # never scored nor evicted, whatever the policy (floor_tokens)
        kept = self.ledger.num_attended(req_id)
        # Between prompt chunks the request is brought back to its *prompt's* budget, not to
        # the budget of the tokens computed so far: its peak (that budget + one chunk) is the
        # same either way, and a middle chunk's queries cannot know the question at the
        # prompt's end, so every block they need not rank away is one the question may still
        # find. Measured on 1k-token pass-key prompts at 25 % (256-token chunks): 12 of 12
        # answered, 8 of 12 when each chunk evicted down to a quarter of what was computed.
        state.chunk_decision = middle
        over = kept > state.config.keep_blocks(prompt if middle else done, self.kv_block_size)
        if middle and not over:
            return None
        threshold = phase == "prefill" and state.policy.select_after_prefill
        # windowed methods (SnapKV, LaProx, HAE, HybridKV) only see the prompt's window now
        windowed = phase == "prefill" and getattr(state.policy, "window", 0) > 0
        # pool-pressure mode ranks every running request's blocks: keep scores fresh
        pressure = phase == "decode" and self.kv_default.pool_pressure
        if not (over or threshold or windowed or pressure or state.policy.score_every_step
                or (rb and rb.parked)):
            return None
        state.select_anyway = threshold
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
