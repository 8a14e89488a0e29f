"""Scheduler cost: the time one scheduling step spends deciding evictions, by requests x blocks.

No engine and no model: the plugin's real ``EvictingScheduler`` is built over a real vLLM
``KVCacheManager`` / ``BlockPool`` (as tests/unit/test_ledger.py builds them; only vLLM's own
``Scheduler.__init__`` is replaced by a stub that installs that manager). For R running
requests of B full blocks each (32-token blocks) with fresh per-block scores (seeded random),
one step's decisions are timed: the protected masks, the selection at a 25 % budget and the
``BlockLedger`` bookkeeping (release to the pool, log). Two patterns:

* ``all``: every request takes its first decision in this step (75 % of its blocks released)
  - the worst step;
* ``staggered``: the steady state of a serving engine - every request at its budget already,
  ``1/16`` of them (the default ``interval``) deciding in the step, each grown by 4 blocks,
  plus the step plan for the workers over all of them (new rows, offsets, the score tasks of
  the ``1/16`` due for scoring) - everything the plugin adds to a decode step's scheduling.

and two implementations, in one run: ``batched`` (the scheduler: one ``select_batch`` for all
the step's decisions) and ``per_request`` (one selection per request, as before batching). The
workers' block scoring happens during the forward pass and is not part of it. Setup
(allocation, the untimed first decision of ``staggered``) is not timed.

    python benchmarks/bench_scheduler.py --profile quick     # ~4 min
    python benchmarks/bench_scheduler.py --profile full

Writes ``results/scheduler.json``; ``ms`` is the median step time over repeats, per policy;
``select_ms`` the part spent in ``select_batch``; ``summaries``: the slowest policy per cell.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from types import SimpleNamespace
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402
import numpy as np  # noqa: E402

REQUESTS = (1, 16, 256)
BLOCKS = (64, 512, 4096)
BLOCK_SIZE = 32
BUDGET = 0.25
INTERVAL = 16  # decode steps between a request's decisions (the default ``interval``)
#: staggered pattern: blocks each deciding request grew by since its last decision (4 rather
#: than the half block of 16 decode tokens, so that every timed decision releases blocks)
GROWTH = 4
PROFILES = {"quick": {"repeats": 2}, "full": {"repeats": 7}}


def build_scheduler(num_blocks: int, max_blocks_per_request: int):
    """A real EvictingScheduler over a real KVCacheManager of ``num_blocks`` blocks."""
    import torch
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
        KVCacheTensor,
    )

    from vllm_kvevict.adapter.scheduler import EvictingScheduler

    # SmolLM2's KV geometry: 3 KV heads of 64, float32
    spec = FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=3, head_size=64, dtype=torch.float32)
    config = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[KVCacheTensor(size=spec.page_size_bytes * num_blocks, layers=["l0"],
                                        layer_stride=0, block_stride=spec.page_size_bytes)],
        kv_cache_groups=[KVCacheGroupSpec(["l0"], spec)],
    )

    def stub_init(self, vllm_config, kv_cache_config, *args, **kwargs):
        self.kv_cache_manager = KVCacheManager(
            kv_cache_config, max_model_len=max_blocks_per_request * BLOCK_SIZE,
            scheduler_block_size=BLOCK_SIZE, hash_block_size=BLOCK_SIZE, enable_caching=False)
        self.running = []
        self.requests = {}

    vllm_config = SimpleNamespace(additional_config={"kv_eviction": {"policy": "snapkv", "budget": BUDGET}})
    with mock.patch.object(Scheduler, "__init__", stub_init):
        return EvictingScheduler(vllm_config, config)


def time_step(sched, policy_name: str, requests: int, blocks: int, rng: random.Random,
              batched: bool = True, staggered: bool = False, keep: bool = False
              ) -> tuple[float, float, float]:
    """(seconds of one step's eviction work, of it inside the selection, of it building the
    step plan).

    ``staggered=False``: every request decides its first decision in this step (the worst
    step: 75 % of every request's blocks released). ``staggered=True``: the steady state of a
    serving engine - all requests already at their budget (an untimed first decision), then
    ``1/INTERVAL`` of them grown by ``GROWTH`` blocks and deciding in the timed step on scores
    of their resident blocks taken from the workers' output (``_take_worker_output``), and the
    step's plan for the workers built for all of them (``StepPlanner.plan``: the
    deciding requests' new rows, every request's offset, and score tasks for the
    ``1/INTERVAL`` due). ``batched``: the scheduler's one batched selection for all of
    them; False: one selection per request (a batch of one), as the scheduler decided before
    batching. ``keep``: leave the requests in place (the caller calls :func:`cleanup`).
    """
    from vllm_kvevict.adapter import decisions as S
    from vllm_kvevict.adapter.protocol import BlockScores
    from vllm_kvevict.adapter.request_state import RequestEviction
    from vllm_kvevict.config import EvictionConfig
    from vllm_kvevict.policies import get_policy

    manager = sched.ledger.manager
    config = EvictionConfig(policy=policy_name, budget=BUDGET)
    tokens = blocks * BLOCK_SIZE
    select_s = [0.0]
    original_select = S.select_batch

    def timed_select(*a, **k):
        t0 = time.perf_counter()
        try:
            return original_select(*a, **k)
        finally:
            select_s[0] += time.perf_counter() - t0

    def fresh(rid, n_blocks):
        sched.kv_decisions.note_scores(rid, sched.kv_requests[rid], range(n_blocks),
                                       [rng.random() for _ in range(n_blocks)])

    for i in range(requests):
        rid = f"r{i}"
        manager.allocate_new_blocks(rid, tokens, tokens)
        sched.kv_requests[rid] = RequestEviction(config=config, policy=get_policy(policy_name))
        fresh(rid, blocks)
        # staggered: decoding (the prompt ended a few blocks ago)
        prompt = tokens - 2 * BLOCK_SIZE if staggered else tokens
        request = SimpleNamespace(request_id=rid, num_computed_tokens=tokens,
                                  num_prompt_tokens=prompt, num_in_flight_tokens=0,
                                  mm_features=None)
        sched.running.append(request)
        sched.requests[rid] = request
    deciding = list(range(requests))
    if staggered:
        sched.kv_decisions.apply(sched.running, sched.kv_requests)  # untimed: everyone at its budget
        for rid in sched.ledger.take_changed(sched.requests):  # sent in that step's plan
            sched.ledger.compacted_row(rid)
        deciding = list(range(0, requests, INTERVAL))
        # the workers' output of the previous step: scores of exactly the resident blocks, for
        # the deciding requests - and for every request with a policy scored at every step
        # (H2O, HybridKV: all of them decide, most within budget)
        every_step = get_policy(policy_name).schedule.every_step
        worker_output = SimpleNamespace(kv_eviction_skipped={}, kv_eviction_scores={})
        for i in range(requests) if every_step else deciding:
            rid, request = f"r{i}", sched.running[i]
            if i in deciding:
                grown = tokens + GROWTH * BLOCK_SIZE
                request.num_computed_tokens = grown
                manager.allocate_new_blocks(rid, grown, grown)
            positions = sched.ledger.resident_array(rid)  # arrays, as the workers send
            worker_output.kv_eviction_scores[rid] = BlockScores(
                generation=0, positions=positions,
                scores=np.array([rng.random() for _ in positions], dtype=np.float32))
        for i in range(requests):  # 1/INTERVAL of them are due for scoring in this step
            sched.kv_requests[f"r{i}"].decode_steps = i % INTERVAL  # deciding ones: 0
            if i % INTERVAL == INTERVAL - 1:  # and grown past their budget since then
                request, grown = sched.running[i], tokens + GROWTH * BLOCK_SIZE
                request.num_computed_tokens = grown
                manager.allocate_new_blocks(f"r{i}", grown, grown)
        # the step's output: one decode token each
        output = SimpleNamespace(num_scheduled_tokens={f"r{i}": 1 for i in range(requests)})
    before = sum(_out_of_attention(sched, f"r{i}") for i in deciding)
    S.select_batch = timed_select
    try:
        started = time.perf_counter()
        if staggered:  # taking the scores that came with the previous step's output
            sched._take_worker_output(worker_output)
        if batched:
            sched.kv_decisions.apply(sched.running, sched.kv_requests)
        else:
            for request in sched.running:
                if request.request_id in sched.kv_decisions.fresh:
                    sched.kv_decisions.fresh.discard(request.request_id)
                    sched.kv_decisions.decide([(request, sched.kv_requests[request.request_id])])
        plan_started = time.perf_counter()
        if staggered:  # and the plan for the workers: rows that changed, offsets, score tasks
            plan = sched.kv_planner.plan(output, sched.requests, sched.kv_requests)
        elapsed = time.perf_counter() - started
        plan_s = time.perf_counter() - plan_started
    finally:
        S.select_batch = original_select
    # released, or parked (HybridKV's retrieval store keeps ranked-out blocks restorable)
    released = sum(_out_of_attention(sched, f"r{i}") for i in deciding) - before
    if not keep:
        cleanup(sched, requests)
    # H2O and HybridKV are scored at every decode step, the others every INTERVAL (and with
    # scores at every step the grown requests due for scoring decide too)
    every_step = get_policy(policy_name).schedule.every_step
    due = requests if every_step else requests // INTERVAL
    rows = len(deciding) * (2 if every_step else 1)
    # a method with a retrieval store (HybridKV) parks and restores at every decision: any
    # request's row may change, none beyond the requests
    stores = get_policy(policy_name).store_blocks(1) > 0
    if staggered and requests >= INTERVAL and not (
            (len(deciding) <= len(plan.rows) <= requests if stores else len(plan.rows) == rows)
            and len(plan.score) == due):
        raise RuntimeError(f"{policy_name}: the plan holds {len(plan.rows)} rows and "
                           f"{len(plan.score)} score tasks (expected {rows} and {due})")
    expected = (len(deciding) * (blocks - max(-(-int(BUDGET * tokens) // BLOCK_SIZE), 4))
                if not staggered else len(deciding) * (GROWTH - 2))
    if blocks > 8 and released < 0.9 * expected:
        raise RuntimeError(f"{policy_name}: only {released} blocks evicted (expected about "
                           f"{expected}); the decision did not run as intended")
    return elapsed, select_s[0], plan_s


def _out_of_attention(sched, req_id: str) -> int:
    """Blocks of ``req_id`` released or parked so far."""
    rb = sched.ledger.requests.get(req_id)
    return 0 if rb is None else len(rb.released) + len(rb.parked)


def time_pressure(sched, policy_name: str, requests: int, blocks: int, rng: random.Random,
                  full_sort: bool = False, need: int = 2, repeat: bool = False) -> float:
    """Seconds of one pool-pressure call (``PoolPressure.free(need, ...)``: a decode step short
    of ``need`` blocks) over ``requests`` running requests of ``blocks`` blocks, all at their
    budget already (an untimed first decision) and freshly scored. ``full_sort``: pick with a
    full ``np.lexsort`` of every candidate (as before :func:`least_important`). ``repeat``:
    time the second of two calls in a row (a full pool asks at every step; the candidates of
    the requests the first call left alone are cached)."""
    from vllm_kvevict.adapter import pool_pressure as S

    time_step(sched, policy_name, requests, blocks, rng, keep=True)
    for i in range(requests):
        rid = f"r{i}"
        positions = sched.ledger.resident_positions(rid)
        sched.kv_requests[rid].set_scores(positions, [rng.random() for _ in positions])
    original = S.least_important
    if full_sort:
        S.least_important = lambda keys, need: np.lexsort(tuple(reversed(keys)))[:need]
    try:
        if repeat:
            sched.kv_pressure.free(need, sched.running, sched.kv_requests)
        before = sum(sched.ledger.requests[f"r{i}"].num_released for i in range(requests))
        started = time.perf_counter()
        freed = sched.kv_pressure.free(need, sched.running, sched.kv_requests)
        elapsed = time.perf_counter() - started
        released = sum(sched.ledger.requests[f"r{i}"].num_released
                       for i in range(requests)) - before
    finally:
        S.least_important = original
        cleanup(sched, requests)
    if not freed or released != need:
        raise RuntimeError(f"{policy_name}: pool pressure released {released} (wanted {need})")
    return elapsed


def cleanup(sched, requests: int) -> None:
    manager = sched.ledger.manager
    for i in range(requests):
        manager.free(f"r{i}")
        sched.ledger.forget(f"r{i}")
    sched.kv_requests.clear()
    sched.running.clear()
    sched.requests.clear()
    sched.kv_book.logs.clear()
    sched.kv_decisions.fresh.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--policies", default="",
                        help="comma-separated registered policies (default: every compared "
                        "method, common.compared_policies(); the first also times pool pressure)")
    args = parser.parse_args()
    common.engine_env()
    import torch

    torch.set_num_threads(1)  # the scheduler runs in one thread of the engine core
    repeats = PROFILES[args.profile]["repeats"]
    policies = common.check_policies(args.policies) or common.compared_policies()
    started = time.perf_counter()
    sched = build_scheduler(max(REQUESTS) * (max(BLOCKS) + GROWTH) + 1, max(BLOCKS) + GROWTH)
    setup_s = time.perf_counter() - started
    rng = random.Random(common.SEED)
    rows = []
    for pattern in ("all", "staggered"):
        for requests in REQUESTS:
            for blocks in BLOCKS:
                for policy in policies:
                    for impl in ("batched", "per_request"):
                        kw = dict(batched=impl == "batched", staggered=pattern == "staggered")
                        time_step(sched, policy, requests, blocks, rng, **kw)  # warm-up
                        runs = [time_step(sched, policy, requests, blocks, rng, **kw)
                                for _ in range(repeats)]
                        ms = statistics.median(r[0] for r in runs) * 1e3
                        rows.append({"pattern": pattern, "impl": impl, "requests": requests,
                                     "blocks": blocks, "policy": policy, "ms": ms,
                                     "ms_per_request": ms / requests,
                                     "select_ms": statistics.median(r[1] for r in runs) * 1e3,
                                     "plan_ms": statistics.median(r[2] for r in runs) * 1e3,
                                     "repeats": repeats})
                        print(f"  {pattern:9s} {impl:11s} {requests:4d} x {blocks:5d} "
                              f"{policy:12s} {ms:10.3f} ms", flush=True)
    for requests in REQUESTS:  # pool pressure (one policy: the scores are random anyway)
        for blocks in BLOCKS:
            for impl in ("partition", "full_sort", "repeat"):
                kw = dict(full_sort=impl == "full_sort", repeat=impl == "repeat")
                time_pressure(sched, policies[0], requests, blocks, rng, **kw)  # warm-up
                ms = statistics.median(time_pressure(sched, policies[0], requests, blocks, rng,
                                                     **kw) for _ in range(repeats)) * 1e3
                rows.append({"pattern": "pressure", "impl": impl, "requests": requests,
                             "blocks": blocks, "policy": policies[0], "ms": ms,
                             "ms_per_request": ms / requests, "repeats": repeats})
                print(f"  pressure  {impl:11s} {requests:4d} x {blocks:5d} {ms:10.3f} ms",
                      flush=True)

    def worst(pattern, impl):
        out = {}
        for r in rows:
            if r["pattern"] == pattern and r["impl"] == impl:
                key = (r["requests"], r["blocks"])
                if key not in out or r["ms"] > out[key]["ms"]:
                    out[key] = r
        return [{"requests": k[0], "blocks": k[1], "ms": v["ms"], "policy": v["policy"]}
                for k, v in out.items()]

    summaries = {f"{p}_{i}": worst(p, i) for p in ("all", "staggered")
                 for i in ("batched", "per_request")}
    summaries.update({f"pressure_{i}": worst("pressure", i)
                      for i in ("partition", "full_sort", "repeat")})
    for pattern, title, a, b in (
            ("all", "every request deciding", "batched", "per_request"),
            ("staggered", f"steady state, 1/{INTERVAL} of them deciding", "batched",
             "per_request"),
            ("pressure", "one pool-pressure call", "partition", "full_sort"),
            ("pressure", "a second pool-pressure call in a row", "repeat", "full_sort")):
        cell = {(r["requests"], r["blocks"]): r["ms"] for r in summaries[f"{pattern}_{a}"]}
        before = {(r["requests"], r["blocks"]): r["ms"] for r in summaries[f"{pattern}_{b}"]}
        print(f"\nOne scheduling step, {title} (ms, slowest policy; {a} / {b})")
        print(common.markdown_table(
            ["requests \\ blocks per request", *map(str, BLOCKS)],
            [[str(n)] + [f"{cell[(n, b)]:.2f} / {before[(n, b)]:.2f}" for b in BLOCKS]
             for n in REQUESTS]))
    common.write_json("scheduler.json", {
        "command": common.command(), "profile": args.profile, "budget": BUDGET,
        "block_size": BLOCK_SIZE, "interval": INTERVAL, "growth_blocks": GROWTH,
        "versions": common.versions(), "machine": common.machine(),
        "setup_s": setup_s, "total_s": time.perf_counter() - started,
        "rows": rows, "summary": summaries["all_batched"], "summaries": summaries,
    })
    print(f"\ntotal {time.perf_counter() - started:.0f} s; wrote results/scheduler.json")


if __name__ == "__main__":
    main()
