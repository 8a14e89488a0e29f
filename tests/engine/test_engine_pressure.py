"""Pool-pressure mode on a real engine with a deliberately tiny KV pool.

Four requests need more blocks than the pool has. Stock vLLM preempts (and recomputes); with
``pool_pressure`` the scheduler first releases the globally least important blocks of the
running requests. Same engine for both, toggling the server default.
"""

from __future__ import annotations

import pytest
from engine_helpers import make_llm, passkey_prompt, recorded_preemptions, scheduler, shutdown

pytestmark = pytest.mark.engine

POOL_BLOCKS = 48
CONFIG = {"policy": "attention", "budget": 1.0, "interval": 4, "pool_pressure": True}


@pytest.fixture(scope="module")
def llm():
    engine = make_llm({"kv_eviction": CONFIG}, num_gpu_blocks_override=POOL_BLOCKS, max_model_len=1024,
                      enable_prefix_caching=False)
    yield engine
    shutdown(engine)


def _run(llm, pool_pressure: bool):
    from vllm import SamplingParams

    sched = scheduler(llm)
    sched.kv_default = sched.kv_default.model_copy(update={"pool_pressure": pool_pressure})
    pool = sched.kv_cache_manager.block_pool
    initial = pool.get_num_free_blocks()
    before = sched.kv_counters.pool_pressure_released
    prompts = [passkey_prompt(str(40000 + i), repeats=6, depth=0.3) for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=96, ignore_eos=True)
    with recorded_preemptions(sched) as preempted:
        outs = llm.generate(prompts, params)
    assert all(len(o.outputs[0].token_ids) == 96 for o in outs)
    assert pool.get_num_free_blocks() == initial  # nothing leaked
    assert not sched.kv_requests and not sched.ledger.requests
    return preempted, sched.kv_counters.pool_pressure_released - before


def test_the_workload_makes_stock_scheduling_preempt(llm):
    """Control: without pool-pressure mode the same workload preempts (so the next test
    would fail without the feature)."""
    preempted, released = _run(llm, pool_pressure=False)
    assert preempted and released == 0


def test_pool_pressure_evicts_instead_of_preempting(llm):
    sched = scheduler(llm)
    avoided = sched.kv_counters.preemptions_avoided
    preempted, released = _run(llm, pool_pressure=True)
    assert not preempted
    assert released > 0 and sched.kv_counters.preemptions_avoided > avoided
