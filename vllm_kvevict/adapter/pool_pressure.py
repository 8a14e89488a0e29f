"""Pool pressure: where vLLM would preempt a running request for lack of free blocks, release
the globally least important blocks of all running requests instead.

Candidates are every running request's evictable blocks (outside its budget's protection, with
a score): parked before kept, blocks only this request holds before blocks shared through a
prefix hit (releasing those frees no memory), then by score, request id and position. The
first ``need`` are found by :func:`least_important` (a partition, not a sort of all of them)
and released with one ledger call per request.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from vllm_kvevict.adapter.accounting import EvictionBook
from vllm_kvevict.adapter.budget import request_budget
from vllm_kvevict.adapter.ledger import BlockLedger
from vllm_kvevict.adapter.request_state import RequestEviction, committed_tokens
from vllm_kvevict.policies.selection import least_important


class Candidates(NamedTuple):
    """One request's evictable blocks under pool pressure (arrays over the candidates)."""

    req_id: str
    committed: int
    is_kept: np.ndarray  # bool: not parked
    shared: np.ndarray  # bool: held by another request too (prefix hit)
    scores: np.ndarray  # float32
    positions: np.ndarray  # int64


class PoolPressure:
    """Frees blocks of running requests on demand (see the module docstring)."""

    def __init__(self, ledger: BlockLedger, book: EvictionBook, block_size: int,
                 caching: bool):
        self.ledger, self.book, self.block_size = ledger, book, block_size
        self.caching = caching  # prefix caching on: a block may be shared by a hit

    def free(self, need: int, running: list, states: dict[str, RequestEviction]) -> bool:
        """Release up to ``need`` blocks: parked ones first, then the least important.

        Args:
            need: blocks wanted.
            running: vLLM's running requests.
            states: the eviction state of each request with eviction on.
        Returns:
            False if nothing could be freed.
        """
        parts: list[Candidates] = []
        by_id = {}
        for request in running:
            req_id = request.request_id
            by_id[req_id] = request
            state = states.get(req_id)
            if state is None:
                continue
            found = self.candidates(request, state)
            if found is not None:
                parts.append(found)
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
            self.book.count(states[req_id], request=by_id[req_id], released=released,
                            evicted=len(kept_released), pressure=True)
            self.book.log(req_id, committed)
        return freed > 0

    def candidates(self, request, state: RequestEviction) -> Candidates | None:
        """The request's evictable blocks, or None when it has none."""
        req_id = request.request_id
        committed = committed_tokens(request)
        found = self._evictable(req_id, state, committed, request.num_prompt_tokens)
        if found is None:
            return None
        cand, scores, is_kept = found
        if self.caching:  # another request holds it too only through a prefix-cache hit
            blocks = self.ledger.blocks(req_id)
            shared = np.fromiter((blocks[q].ref_cnt > 1 for q in cand.tolist()), bool,
                                 len(cand))
        else:
            shared = np.zeros(len(cand), dtype=bool)
        return Candidates(req_id, committed, is_kept, shared, scores, cand)

    def _evictable(self, req_id: str, state: RequestEviction, committed: int, prompt: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """``(positions, scores, kept)`` of the request's evictable blocks (``[k]`` each:
        int64, float32, bool not parked), or None when it has none. Cached per request until
        its scores, its ledger entry or its budget change: a full pool may ask at every step,
        and most running requests have not changed since the last call."""
        if state.config.below_floor(committed):
            return None  # short requests are never evicted, not even under pool pressure
        budget = request_budget(state.config, committed, prompt, self.block_size)
        rb = self.ledger.requests.get(req_id)
        key = (state.score_version, -1 if rb is None else rb.version, budget.lo, budget.hi)
        if state.pressure_cache is not None and state.pressure_cache[0] == key:
            return state.pressure_cache[1]
        pos = self.ledger.resident_array(req_id)
        scored, scores = state.scores_at(pos)
        evictable = ~budget.protected(pos, None if scored is None else ~scored)
        found = None
        if evictable.any():
            cand = pos[evictable]
            parked = rb.parked if rb is not None else set()
            is_kept = (~np.isin(cand, np.fromiter(parked, np.int64, len(parked))) if parked
                       else np.ones(len(cand), dtype=bool))
            found = (cand, scores[evictable], is_kept)
        state.pressure_cache = (key, found)
        return found
