"""Sink/recent protection scales with the budget: scored blocks always get room."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_kvevict.adapter.admission import cap_prefix_hit, install_guards
from vllm_kvevict.adapter.budget import request_budget
from vllm_kvevict.config import EvictionConfig, parse_config


def _protected(config: EvictionConfig, committed: int, bs: int):
    """The protection of a decoding request (prompt done) with every block scored."""
    positions = np.arange(math.ceil((committed + 1) / bs))  # + the next token's block
    return request_budget(config, committed, committed, bs).protected(positions), positions


@settings(max_examples=300, deadline=None)
@given(committed=st.integers(1, 16384), bs=st.sampled_from([16, 32, 64]),
       budget=st.floats(0.001, 1.0), sink=st.integers(0, 256), recent=st.integers(0, 512),
       explicit=st.booleans())
def test_every_budget_of_two_blocks_keeps_a_scored_block(committed, bs, budget, sink, recent,
                                                          explicit):
    fields = {"policy": "snapkv", "budget": budget}
    if explicit:  # the user's own protection wins, whatever it costs
        fields.update(sink_tokens=sink, recent_tokens=recent)
    config = parse_config(fields)
    keep = config.keep_blocks(committed, bs)
    protected, positions = _protected(config, committed, bs)
    if explicit:
        sink_blocks = math.ceil(sink / bs)
        recent_start = max(committed - recent, 0) // bs
        assert protected.tolist() == [p < sink_blocks or p >= recent_start or p >= committed // bs
                                      for p in positions]
    elif keep >= 2:
        assert int(protected.sum()) <= keep - 1, "no room left for a scored block"
        assert int(protected.sum()) <= 1 + int(0.5 * (keep - 1)) + 1  # at most ~half + in-flight


def test_defaults_are_unchanged_where_the_budget_has_room():
    """4 sink + 64 recent tokens (1 + 2 full blocks of 32) once 7 blocks are kept."""
    for committed in (1000, 1024, 4000):
        config = parse_config({"policy": "snapkv", "budget_tokens": 7 * 32})
        shrunk, _ = _protected(config, committed, 32)
        full = parse_config({"policy": "snapkv", "budget_tokens": 7 * 32, "sink_tokens": 4,
                             "recent_tokens": 64})
        assert shrunk.tolist() == _protected(full, committed, 32)[0].tolist()


def test_tight_budget_shrinks_recent_first_then_the_sink():
    # 1k tokens at 10 %: 4 blocks -> sink + in-flight block protected, 2 scored
    config = parse_config({"policy": "snapkv", "budget": 0.1, "floor_tokens": 0})
    protected, positions = _protected(config, 1000, 32)
    assert [p for p, x in zip(positions, protected.tolist()) if x] == [0, 31]
    assert config.protection(4, 32) == (1, 0) and config.protection(2, 32) == (0, 0)


def test_per_request_overrides_keep_explicit_fields_explicit():
    server = parse_config({"policy": "snapkv", "budget": 0.1, "recent_tokens": 64})
    request = server.with_overrides({"budget": 0.05})
    assert "recent_tokens" in request.model_fields_set
    assert "sink_tokens" not in request.model_fields_set
    assert request.protection(4, 32) == (1, None)


def _cap(policy, budget, prompt, hit_blocks, bs=32, groups=1):
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks

    from vllm_kvevict.adapter.request_state import RequestEviction
    from vllm_kvevict.policies import get_policy

    config = parse_config({"policy": policy, "budget": budget})
    empty = KVCacheBlocks(tuple(() for _ in range(groups)))
    state = RequestEviction(config=config, policy=get_policy(policy, {}))
    request = SimpleNamespace(request_id="r", num_prompt_tokens=prompt)
    blocks = KVCacheBlocks(tuple(list(range(hit_blocks)) for _ in range(groups)))
    capped, n, boundary = cap_prefix_hit(request, (blocks, hit_blocks * bs, 0), state=state,
                                         block_size=bs, hybrid=groups > 1, empty=empty)
    assert all(len(group) * bs == n for group in capped.blocks) and boundary == 0
    return n


def test_prefix_hit_leaves_a_windowed_policy_its_whole_window():
    # 1000-token prompt, 31 full blocks cached: vLLM would compute only 8 tokens (1000 % 32)
    n = _cap("snapkv", 0.1, 1000, 31)
    assert 1000 - n >= 32 and n == 30 * 32
    assert _cap("snapkv", 0.1, 1024, 31) == 31 * 32  # already 32 queries: hit untouched
    assert _cap("snapkv", 1.0, 1000, 31) == 31 * 32  # never scored: hit untouched
    assert _cap("streamingllm", 0.1, 1000, 31) == 31 * 32  # no window
    assert _cap("hae", 1.0, 1000, 31) == 30 * 32  # selects after prefill even within budget


def test_a_hybrid_model_gets_no_hit_where_the_hit_would_be_capped():
    """A shorter hit is not valid for sliding-window groups (their cached rows hold only the
    window before the hit's end): where the window would need capping, no hit at all."""
    assert _cap("snapkv", 0.1, 1000, 31, groups=6) == 0
    assert _cap("snapkv", 0.1, 1024, 31, groups=6) == 31 * 32  # nothing to cap: hit kept
    assert _cap("streamingllm", 0.1, 1000, 31, groups=6) == 31 * 32


def test_the_prefix_hit_wrapper_takes_vllm_033s_max_cache_hit_length():
    """vLLM 0.33's scheduler calls ``get_computed_blocks(request, max_cache_hit_length)``
    (0.32: ``(request)``). The plugin's instance wrapper forwards the bound to vLLM's method
    and still caps the hit for a windowed policy (a one-argument wrapper: TypeError)."""
    import bench_scheduler
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks

    from vllm_kvevict.adapter.request_state import RequestEviction
    from vllm_kvevict.policies import get_policy

    sched = bench_scheduler.build_scheduler(64, 40)
    seen = []

    def get_computed_blocks_033(request, max_cache_hit_length=None):  # 0.33's signature
        seen.append(max_cache_hit_length)
        return KVCacheBlocks((list(range(31)),)), 31 * 32, 0

    sched.kv_cache_manager.get_computed_blocks = get_computed_blocks_033
    install_guards(sched)  # wraps the 0.33-style method as at engine start
    config = parse_config({"policy": "snapkv", "budget": 0.1})
    sched.kv_requests["r"] = RequestEviction(config=config, policy=get_policy("snapkv", {}))
    request = SimpleNamespace(request_id="r", num_prompt_tokens=1000)
    blocks, n, boundary = sched.kv_cache_manager.get_computed_blocks(request, 999)
    assert seen == [999] and n == 30 * 32 and len(blocks.blocks[0]) == 30 and boundary == 0
    assert sched.kv_cache_manager.get_computed_blocks(request)[1] == 30 * 32  # 0.32's call
