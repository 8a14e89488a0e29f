"""The books of eviction: what every decision and pool-pressure release did, per policy (the
Prometheus metrics), per request (the report on its final output) and, for tests, the excluded
set over time (the log reference attention masks are rebuilt from).

Kept apart from the decisions so that decisions and pool pressure count the same way.
"""

from __future__ import annotations

import os

from vllm_kvevict.adapter.ledger import BlockLedger, EvictionLog
from vllm_kvevict.adapter.request_state import RequestEviction
from vllm_kvevict.adapter.visual import visual_tokens
from vllm_kvevict.metrics import EvictionMetrics

#: finished requests whose eviction log is kept (the newest ones)
FINISHED_LOGS = 64


class EvictionBook:
    """Counts, the per-request report and the eviction log of one scheduler.

    The log is kept only with ``KVEVICT_EVICTION_LOG=1`` (the tests and bench_quality set it):
    a serving engine does not pay a mask copy per decision for it.
    """

    def __init__(self, ledger: BlockLedger, metrics: EvictionMetrics, block_size: int):
        self.ledger, self.metrics, self.block_size = ledger, metrics, block_size
        self.log_enabled = os.environ.get("KVEVICT_EVICTION_LOG") == "1"
        #: req_id -> excluded positions over time, while the request runs
        self.logs: dict[str, EvictionLog] = {}
        #: the logs of the last ``FINISHED_LOGS`` finished requests
        self.finished_logs: dict[str, EvictionLog] = {}

    def count(self, state: RequestEviction, *, request=None, restored: int = 0,
              released: list[int] | None = None, parked: int = 0, evicted: int = 0,
              pressure: bool = False) -> None:
        """Count one request's decision (or pool-pressure release) in the per-policy metrics
        and the request's own report.

        Args:
            request: vLLM's request (its image spans split the released tokens by modality).
            restored, parked, evicted: block counts (``evicted``: newly out of attention).
            released: positions of the blocks returned to the pool.
            pressure: the release was pool pressure's.
        """
        bs = self.block_size
        released = released if released is not None else []
        visual = visual_tokens(request, released, bs) if request is not None and released else 0
        n_released = len(released)
        state.evicted_tokens += n_released * bs
        state.visual_evicted_tokens += visual
        if not (restored or n_released or parked or evicted):
            return
        metrics = self.metrics
        counters = metrics.policy(state.config.policy)
        if evicted and not state.evicted_blocks:
            counters.requests_with_eviction += 1
        state.evicted_blocks += evicted
        counters.restored_blocks += restored
        counters.released_blocks += n_released
        counters.parked_blocks += parked
        counters.evicted_blocks += evicted
        counters.pool_pressure_released_blocks += n_released if pressure else 0
        counters.bytes_freed += n_released * metrics.block_bytes
        counters.visual_evicted_tokens += visual
        counters.text_evicted_tokens += n_released * bs - visual
        metrics.parked_blocks_now = self.ledger.num_parked_total()

    def log(self, req_id: str, committed: int) -> None:
        """Record the request's excluded set and the token from which it applies."""
        if not self.log_enabled:
            return
        log = self.logs.get(req_id)
        if log is None:
            log = self.logs[req_id] = EvictionLog()
        log.record(committed, self.ledger.excluded_mask(req_id))

    def close_log(self, req_id: str, finished: bool) -> None:
        """The request left the running set: keep its log if it finished (bounded), drop it
        if it was preempted (it restarts with full attention)."""
        log = self.logs.pop(req_id, None)
        if finished and log:
            self.finished_logs[req_id] = log
            while len(self.finished_logs) > FINISHED_LOGS:
                self.finished_logs.pop(next(iter(self.finished_logs)))

    def report(self, request, state: RequestEviction) -> dict:
        """What was evicted for ``request``, for its final output."""
        bs = self.block_size
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
