"""Decisions: turn the block scores the workers sent into keep / park / release, through the
ledger.

At the start of each ``schedule`` every running request with fresh scores decides: its inputs
are gathered as arrays (resident positions, scores, budget, recycle-bin share), one
:func:`select_batch` runs per selection rule for all of them, and the ledger carries out the
result. A policy with its own ``select`` (an extension point) is called per request instead.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from vllm_kvevict.adapter.accounting import EvictionBook
from vllm_kvevict.adapter.budget import (
    Budget,
    keep_blocks_at,
    protected_by_bounds,
    request_budget,
)
from vllm_kvevict.adapter.keywords import with_keywords
from vllm_kvevict.adapter.ledger import BlockLedger
from vllm_kvevict.adapter.request_state import RequestEviction, committed_tokens
from vllm_kvevict.adapter.visual import visual_block_shares
from vllm_kvevict.policies.base import EvictionPolicy
from vllm_kvevict.policies.selection import select_batch


@dataclass
class DecisionInput:
    """One request's decision inputs, gathered before the step's batched selection."""

    request: object  # vLLM's Request
    state: RequestEviction
    positions: np.ndarray  # [nb] resident positional block indices, ascending
    committed: int
    parked: set[int]
    scores: np.ndarray  # [nb] float32 (0 where unscored; those are protected)
    scored: np.ndarray | None  # [nb] bool has a score; None: every block has one
    budget: Budget
    bin_blocks: int  # of the shared recycle bin, granted in running order
    tier: np.ndarray | None  # [nb] int, release_zero policies only
    visual: torch.Tensor | None  # [nb] share of image tokens per block, multimodal requests only

    @property
    def release_zero(self) -> bool:
        return self.state.policy.schedule.release_zero

    def protected(self) -> np.ndarray:
        """[nb] bool: the blocks this decision must keep."""
        return self.budget.protected(self.positions,
                                     None if self.scored is None else ~self.scored)


def custom_select(policy: EvictionPolicy) -> bool:
    """The policy overrides ``EvictionPolicy.select`` (the batched path cannot run it)."""
    return type(policy).select is not EvictionPolicy.select


class Decisions:
    """The scheduler's decisions (see the module docstring)."""

    def __init__(self, ledger: BlockLedger, book: EvictionBook, block_size: int):
        self.ledger, self.book, self.block_size = ledger, book, block_size
        #: requests whose scores arrived since their last decision (decide at the next step)
        self.fresh: set[str] = set()

    def note_scores(self, req_id: str, state: RequestEviction, positions, values,
                    phase: str = "decode") -> None:
        """Take a request's fresh block scores: it decides at the next ``schedule``."""
        state.set_scores(positions, values, phase)
        self.fresh.add(req_id)

    def forget(self, req_id: str) -> None:
        self.fresh.discard(req_id)

    def apply(self, running: list, states: dict[str, RequestEviction]) -> None:
        """Decide for every running request with fresh scores.

        Args:
            running: vLLM's running requests, in running order (the bin is granted in it).
            states: the eviction state of each request with eviction on.
        """
        if not self.fresh:
            return
        fresh = self.fresh
        deciding = [(r, states[r.request_id]) for r in running
                    if r.request_id in fresh and r.request_id in states]
        # the decided leave the set, and the finished; one not running now keeps its scores
        fresh.difference_update(r.request_id for r, _ in deciding)
        fresh.intersection_update(states)
        if deciding:
            self.decide(deciding)

    def decide(self, deciding: list[tuple[object, RequestEviction]]) -> None:
        """Decide for ``deciding`` (``(request, state)`` in running order) now."""
        started = time.perf_counter()
        pending = [p for p in (self.gather(r, s) for r, s in deciding) if p is not None]
        self._grant_bin(pending)
        groups: dict[bool, list[DecisionInput]] = {False: [], True: []}  # by release_zero
        for p in pending:
            if custom_select(p.state.policy):
                self._select_one(p)
            else:
                groups[p.release_zero].append(p)
        for release_zero, group in groups.items():
            if group:
                self._select_batch(group, release_zero)
        share = (time.perf_counter() - started) / len(deciding)
        for policy, count in Counter(s.config.policy for _, s in deciding).items():
            self.book.metrics.policy(policy).observe_decision(share, count)

    def gather(self, request, state: RequestEviction) -> DecisionInput | None:
        """What a decision needs, as arrays; None when this request has nothing to decide."""
        req_id, bs, ledger = request.request_id, self.block_size, self.ledger
        committed, prompt = committed_tokens(request), request.num_prompt_tokens
        rb = ledger.requests.get(req_id)
        parked = set(rb.parked) if rb is not None and rb.parked else set()
        schedule = state.policy.schedule
        # a threshold method decides after each prefill scoring even within budget
        threshold = schedule.select_after_prefill and state.score_phase == "prefill"
        # blocks in attention, O(1): policies scored at every step (H2O, HybridKV) get here at
        # every step, and are within budget at most of them
        if (ledger.num_attended(req_id) <= keep_blocks_at(state.config, committed, prompt, bs)
                and not parked and not threshold):
            return None
        budget = request_budget(state.config, committed, prompt, bs)
        pos = ledger.resident_array(req_id)
        if not len(pos):
            return None
        scored, scores = state.scores_at(pos)
        if committed < request.num_prompt_tokens and state.keywords is not None:
            scores = with_keywords(scores, pos, state.keywords)  # between prompt chunks
        visual = (visual_block_shares(request, pos.tolist(), bs)
                  if getattr(request, "mm_features", None) else None)
        tier = state.policy.tier(visual) if schedule.release_zero else None
        return DecisionInput(
            request=request, state=state, positions=pos, committed=committed, parked=parked,
            scores=scores, scored=scored, budget=budget, bin_blocks=0,
            tier=None if tier is None else tier.cpu().numpy(), visual=visual,
        )

    def _grant_bin(self, pending: list[DecisionInput]) -> None:
        """The recycle bin is shared: each request's share is granted from what the ones
        before it (running order) may take, so that all of them parking at once never
        overfill it."""
        room = self.ledger.bin_capacity - self.ledger.num_parked_total()
        for p in pending:
            available = room + len(p.parked)
            wanted = p.state.config.recycle_bin_blocks
            if not p.state.config.prefill_eviction:  # its pool holds budget + a chunk only
                wanted = max(wanted, p.state.policy.store_blocks(p.budget.keep_blocks))
            p.bin_blocks = max(0, min(wanted, available))
            room = available - p.bin_blocks

    def _select_one(self, p: DecisionInput) -> None:
        """A policy with its own ``select``: called as is, per request."""
        decision = p.state.policy.select(
            torch.from_numpy(p.scores), block_index=torch.from_numpy(p.positions),
            keep_blocks=p.budget.keep_blocks, protected=torch.from_numpy(p.protected()),
            bin_blocks=p.bin_blocks, visual_blocks=p.visual,
        )
        self.carry_out(p, p.positions[decision.keep.numpy()],
                       p.positions[decision.park.numpy()], p.positions[decision.release.numpy()])

    def _select_batch(self, group: list[DecisionInput], release_zero: bool) -> None:
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
        lo = np.array([p.budget.lo for p in group])[:, None]
        hi = np.array([p.budget.hi for p in group])[:, None]
        protected = valid & protected_by_bounds(positions, lo, hi, unscored)
        decision = select_batch(
            scores, valid, protected, np.array([p.budget.keep_blocks for p in group]),
            np.array([p.bin_blocks for p in group]), release_zero=release_zero, tier=tier,
        )
        for i, p in enumerate(group):
            row = positions[i]
            if p.parked or p.bin_blocks:
                self.carry_out(p, row[decision.keep[i]], row[decision.park[i]],
                               row[decision.release[i]])
            else:  # nothing parked before or after: the kept blocks need no ledger call
                self.carry_out(p, None, None, row[decision.release[i]])

    def carry_out(self, p: DecisionInput, keep: np.ndarray | None, park: np.ndarray | None,
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
        self.book.count(p.state, request=p.request, restored=restored, released=released,
                        parked=newly_parked, evicted=len(released) - from_bin + newly_parked)
        self.book.log(req_id, p.committed)
