"""The scheduler's batched decisions on vLLM's real block pool (no engine): what requests
deciding in the same step share, and the steady-state bookkeeping."""

from __future__ import annotations

import random
from types import SimpleNamespace

import bench_scheduler  # noqa: E402

BS = bench_scheduler.BLOCK_SIZE


def add_request(sched, rid: str, blocks: int, config, rng: random.Random):
    from vllm_kvevict.adapter.request_state import RequestEviction
    from vllm_kvevict.policies import get_policy

    tokens = blocks * BS
    sched.ledger.manager.allocate_new_blocks(rid, tokens, tokens)
    state = RequestEviction(config=config, policy=get_policy(config.policy))
    sched.kv_requests[rid] = state
    request = SimpleNamespace(request_id=rid, num_computed_tokens=tokens, num_prompt_tokens=tokens,
                              num_in_flight_tokens=0, mm_features=None)
    sched.running.append(request)
    sched.requests[rid] = request
    sched.kv_decisions.note_scores(rid, state, range(blocks), [rng.random() for _ in range(blocks)])
    return request


def test_requests_deciding_together_share_the_recycle_bin_without_overfilling_it():
    """Each deciding request's bin share is granted in turn from what the others left: granted
    all at once from the same free room, the second request's park overfilled the bin (the
    ledger raised "recycle bin full" inside the engine core's step)."""
    from vllm_kvevict.config import EvictionConfig

    rng = random.Random(0)
    sched = bench_scheduler.build_scheduler(3 * 40 + 1, 40)
    sched.ledger.bin_capacity = 12
    config = EvictionConfig(policy="snapkv", budget=0.25, recycle_bin_blocks=10)
    for r in range(3):
        add_request(sched, f"r{r}", 40, config, rng)
    sched.kv_decisions.apply(sched.running, sched.kv_requests)
    parked = [len(sched.ledger.requests[f"r{r}"].parked) for r in range(3)]
    assert sum(parked) == sched.ledger.num_parked_total() == 12
    assert parked == [10, 2, 0]  # granted in running order


def test_only_requests_with_fresh_scores_decide_and_each_once():
    from vllm_kvevict.config import EvictionConfig

    rng = random.Random(1)
    sched = bench_scheduler.build_scheduler(4 * 32 + 1, 32)
    config = EvictionConfig(policy="snapkv", budget=0.25)
    for r in range(4):
        add_request(sched, f"r{r}", 32, config, rng)
    sched.kv_decisions.apply(sched.running, sched.kv_requests)
    held = {r: len(sched.ledger.resident_array(f"r{r}")) for r in range(4)}
    assert set(held.values()) == {config.keep_blocks(32 * BS, BS)}
    # new scores for r2 only: it decides again, nobody else does
    request = sched.requests["r2"]
    request.num_computed_tokens += 4 * BS
    sched.ledger.manager.allocate_new_blocks("r2", request.num_computed_tokens,
                                             request.num_computed_tokens)
    positions = sched.ledger.resident_positions("r2")
    sched.kv_decisions.note_scores("r2", sched.kv_requests["r2"], positions,
                       [rng.random() for _ in positions])
    before = {r: sched.kv_requests[f"r{r}"].evicted_blocks for r in range(4)}
    sched.kv_decisions.apply(sched.running, sched.kv_requests)
    after = {r: sched.kv_requests[f"r{r}"].evicted_blocks for r in range(4)}
    assert [after[r] - before[r] for r in range(4)] == [0, 0, after[2] - before[2], 0]
    assert after[2] > before[2]
    sched.kv_decisions.apply(sched.running, sched.kv_requests)  # no fresh scores: nothing happens
    assert {r: sched.kv_requests[f"r{r}"].evicted_blocks for r in range(4)} == after
