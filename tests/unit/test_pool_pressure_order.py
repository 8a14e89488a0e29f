"""Pool-pressure eviction picks, over all running requests, the blocks a plain tuple sort of
(parked first, unshared first, score, request id, position) puts first."""

from __future__ import annotations

import random
from types import SimpleNamespace

import bench_scheduler  # noqa: E402
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

BS = bench_scheduler.BLOCK_SIZE


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 40), st.integers(1, 4), st.integers(0, 20))
def test_the_globally_least_important_blocks_go_first(seed, need, num_requests, need_again):
    """Twice in a row: the second call reads the candidates it cached for the requests the
    first left alone and recomputes those it released from (a stale cache would pick a
    released block again or miss the next-least important one)."""
    from vllm_kvevict.adapter.budget import request_budget
    from vllm_kvevict.adapter.request_state import RequestEviction
    from vllm_kvevict.config import EvictionConfig
    from vllm_kvevict.policies import get_policy

    rng = random.Random(seed)
    sched = bench_scheduler.build_scheduler(num_requests * 40 + 1, 40)
    sched.kv_default = EvictionConfig(policy="snapkv", budget=0.25, recycle_bin_total_blocks=64)
    sched.ledger.bin_capacity = 64
    manager = sched.ledger.manager
    expected = []
    for r in range(num_requests):
        rid, blocks = f"req-{rng.randrange(100)}-{r}", rng.randrange(8, 40)
        tokens = blocks * BS
        manager.allocate_new_blocks(rid, tokens, tokens)
        config = EvictionConfig(policy="snapkv", budget=0.25, sink_tokens=32, recent_tokens=64,
                                floor_tokens=0)
        state = RequestEviction(config=config, policy=get_policy("snapkv"))
        values = [rng.choice([0.1, 0.2, 0.2, 0.5, rng.random()]) for _ in range(blocks)]
        state.set_scores(range(blocks), values)
        sched.kv_requests[rid] = state
        request = SimpleNamespace(request_id=rid, num_computed_tokens=tokens,
                                  num_prompt_tokens=tokens, num_in_flight_tokens=0,
                                  mm_features=None)
        sched.running.append(request)
        parked = rng.sample(range(1, blocks - 2), k=min(3, blocks - 3))
        sched.ledger.park(rid, parked, tokens)
        positions = sched.ledger.resident_positions(rid)
        protected = request_budget(config, tokens, tokens, BS).protected(
            np.asarray(positions, dtype=np.int64)).tolist()  # every block has a score
        for p, prot in zip(positions, protected):
            if not prot:
                expected.append((p not in parked, False, float(np.float32(values[p])), rid, p))
    expected.sort()
    for called, total in ((need, need), (need_again, need + need_again)):
        if not called:
            continue
        assert sched.kv_pressure.free(called, sched.running, sched.kv_requests) == bool(expected[total - called:])
        released = sorted((rid, p) for rid in sched.kv_requests
                          for p in sched.ledger.requests[rid].released)
        assert released == sorted((rid, p) for *_, rid, p in expected[:total])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.sampled_from([0.0, 0.25, 0.5, float("nan")])
                          | st.floats(0, 1, width=32), st.integers(0, 3), st.integers(0, 50)),
                max_size=60, unique_by=lambda t: (t[2], t[3])),
       st.integers(0, 70))
def test_least_important_is_the_head_of_the_full_sort(rows, need):
    """The partition-based pick equals the first ``need`` of a full ``np.lexsort`` (ties on
    score broken by request and position, NaN scores last within their class)."""
    from vllm_kvevict.policies.selection import least_important

    cls, score, req, pos = (np.array(c) for c in zip(*rows)) if rows else [np.zeros(0)] * 4
    score = score.astype(np.float32)
    got = least_important((cls.astype(np.int64), score, req, pos), need)
    full = np.lexsort((pos, req, score, cls))[:need]
    assert got.tolist() == full.tolist()
