"""Scheduler cost: the time one scheduling step spends deciding evictions, by requests x blocks.

No engine and no model: the plugin's real ``EvictingScheduler`` is built over a real vLLM
``KVCacheManager`` / ``BlockPool`` (as tests/test_ledger.py builds them; only vLLM's own
``Scheduler.__init__`` is replaced by a stub that installs that manager). For R running
requests of B full blocks each (32-token blocks), every request holds fresh per-block scores
(seeded random), and one call of the scheduler's ``_apply_decisions`` is timed: for each
request, the protected mask, ``policy.select`` at a 25 % budget, and the ``BlockLedger``
bookkeeping (release to the pool, log). That is the worst step: all R requests decide at once
(in an engine they decide every ``interval`` steps, staggered). The workers' block scoring
happens during the forward pass and is not part of it. Setup (allocation) is not timed.

    python benchmarks/bench_scheduler.py --profile quick     # ~1 min
    python benchmarks/bench_scheduler.py --profile full

Writes ``results/scheduler.json``; ``ms`` is the median step time over repeats, per policy;
``select_ms`` the part spent in ``policy.select``.
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

REQUESTS = (1, 16, 256)
BLOCKS = (64, 512, 4096)
BLOCK_SIZE = 32
BUDGET = 0.25
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


def time_step(sched, policy_name: str, requests: int, blocks: int, rng: random.Random) -> tuple[float, float]:
    """(seconds of one _apply_decisions over all requests, seconds inside policy.select)."""
    from vllm_kvevict.adapter.scheduler import RequestEviction
    from vllm_kvevict.config import EvictionConfig
    from vllm_kvevict.policies import get_policy

    manager = sched.ledger.manager
    config = EvictionConfig(policy=policy_name, budget=BUDGET)
    tokens = blocks * BLOCK_SIZE
    select_s = [0.0]
    for i in range(requests):
        rid = f"r{i}"
        manager.allocate_new_blocks(rid, tokens, tokens)
        policy = get_policy(policy_name)
        original = policy.select

        def timed(*a, _orig=original, **k):
            t0 = time.perf_counter()
            try:
                return _orig(*a, **k)
            finally:
                select_s[0] += time.perf_counter() - t0

        policy.select = timed
        state = RequestEviction(config=config, policy=policy)
        state.scores = {p: rng.random() for p in range(blocks)}
        state.fresh = True
        sched.kv_requests[rid] = state
        sched.running.append(SimpleNamespace(request_id=rid, num_computed_tokens=tokens,
                                             num_in_flight_tokens=0, mm_features=None))
    started = time.perf_counter()
    sched._apply_decisions()
    elapsed = time.perf_counter() - started
    expected_release = blocks - max(-(-int(BUDGET * tokens) // BLOCK_SIZE), 4)
    released = sum(len(sched.ledger.requests[f"r{i}"].released) for i in range(requests)
                   if f"r{i}" in sched.ledger.requests)
    for i in range(requests):
        manager.free(f"r{i}")
        sched.ledger.forget(f"r{i}")
    sched.kv_requests.clear()
    sched.running.clear()
    sched.kv_log.clear()
    if blocks > 8 and released < requests * expected_release * 0.9:
        raise RuntimeError(f"{policy_name}: only {released} blocks released; the decision did "
                           "not run as intended")
    return elapsed, select_s[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--policies", default=",".join(common.POLICIES))
    args = parser.parse_args()
    common.engine_env()
    import torch

    torch.set_num_threads(1)  # the scheduler runs in one thread of the engine core
    repeats = PROFILES[args.profile]["repeats"]
    policies = [p for p in args.policies.split(",") if p]
    started = time.perf_counter()
    sched = build_scheduler(max(REQUESTS) * max(BLOCKS) + 1, max(BLOCKS))
    setup_s = time.perf_counter() - started
    rng = random.Random(common.SEED)
    rows = []
    for requests in REQUESTS:
        for blocks in BLOCKS:
            for policy in policies:
                time_step(sched, policy, requests, blocks, rng)  # warm-up
                runs = [time_step(sched, policy, requests, blocks, rng) for _ in range(repeats)]
                ms = statistics.median(r[0] for r in runs) * 1e3
                rows.append({"requests": requests, "blocks": blocks, "policy": policy,
                             "ms": ms, "ms_per_request": ms / requests,
                             "select_ms": statistics.median(r[1] for r in runs) * 1e3,
                             "repeats": repeats})
                print(f"  {requests:4d} requests x {blocks:5d} blocks  {policy:12s} "
                      f"{ms:10.3f} ms", flush=True)
    worst = {}
    for r in rows:
        key = (r["requests"], r["blocks"])
        if key not in worst or r["ms"] > worst[key]["ms"]:
            worst[key] = r
    summary = [{"requests": k[0], "blocks": k[1], "ms": v["ms"], "policy": v["policy"]}
               for k, v in worst.items()]
    print("\nOne scheduling step, every request deciding (ms, slowest policy; per request)")
    print(common.markdown_table(
        ["requests \\ blocks per request", *map(str, BLOCKS)],
        [[str(n)] + [f"{worst[(n, b)]['ms']:.2f} ({worst[(n, b)]['ms'] / n:.3f})" for b in BLOCKS]
         for n in REQUESTS]))
    common.write_json("scheduler.json", {
        "command": common.command(), "profile": args.profile, "budget": BUDGET,
        "block_size": BLOCK_SIZE, "versions": common.versions(), "machine": common.machine(),
        "setup_s": setup_s, "total_s": time.perf_counter() - started,
        "rows": rows, "summary": summary,
    })
    print(f"\ntotal {time.perf_counter() - started:.0f} s; wrote results/scheduler.json")


if __name__ == "__main__":
    main()
