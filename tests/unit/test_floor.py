"""The floor (``floor_tokens``) and the operator's ``client_options``, without an engine.

The floor: a request keeps ``max(budget, floor)`` tokens, and a request of at most
``floor_tokens`` tokens is never scored or evicted — not by a policy that selects within its
budget (HAE's visual pruning after prefill), not by one scored at every step (H2O), not under
pool pressure. The end-to-end check (the demo's chat answered at a 25 % server budget) is
``test_serve.py::test_a_short_chat_under_the_floor_is_answered_with_nothing_evicted``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import bench_scheduler  # noqa: E402
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_kvevict.config import DEFAULT_FLOOR_TOKENS, EvictionConfig, parse_config

BS = bench_scheduler.BLOCK_SIZE


@settings(max_examples=200, deadline=None)
@given(seq_len=st.integers(1, 20_000), budget=st.floats(0.01, 1.0),
       floor=st.integers(0, 4096), tokens=st.one_of(st.none(), st.integers(1, 4096)))
def test_a_request_keeps_the_larger_of_its_budget_and_the_floor(seq_len, budget, floor, tokens):
    fields = {"policy": "snapkv", "floor_tokens": floor}
    fields.update({"budget_tokens": tokens} if tokens else {"budget": budget})
    config = parse_config(fields)
    by_budget = tokens if tokens else math.ceil(budget * seq_len)
    assert config.keep_tokens(seq_len) == max(by_budget, floor)
    if seq_len <= floor:  # under the floor: every block is within the budget
        assert config.keep_blocks(seq_len, BS) >= math.ceil(seq_len / BS)
        assert config.below_floor(seq_len)


def test_the_default_floor_spares_a_chat_and_leaves_long_prompts_to_the_budget():
    config = parse_config({"policy": "hae", "budget": 0.25})
    assert config.floor_tokens == DEFAULT_FLOOR_TOKENS
    assert config.keep_blocks(49, BS) == 8 >= math.ceil(49 / BS)  # the demo's chat: all kept
    assert config.keep_tokens(4 * DEFAULT_FLOOR_TOKENS) == DEFAULT_FLOOR_TOKENS  # 25 % of 1,024
    assert config.keep_tokens(8000) == 2000  # long prompts: the fraction alone


def _scheduler_with(policy: str, tokens: int, floor: int, pool_pressure: bool = False):
    """A real ``EvictingScheduler`` (vLLM's KV manager and block pool) holding one running
    request of ``tokens`` computed tokens under ``policy`` at 25 %."""
    from vllm_kvevict.adapter.request_state import RequestEviction
    from vllm_kvevict.policies import get_policy

    sched = bench_scheduler.build_scheduler(64, 40)
    sched.kv_default = EvictionConfig(policy=policy, budget=0.25, pool_pressure=pool_pressure)
    config = EvictionConfig(policy=policy, budget=0.25, floor_tokens=floor)
    state = RequestEviction(config=config, policy=get_policy(policy))
    sched.ledger.manager.allocate_new_blocks("r", tokens, tokens)
    sched.kv_requests["r"] = state
    blocks = math.ceil(tokens / BS)
    state.set_scores(range(blocks), np.linspace(1, 0, blocks))
    request = SimpleNamespace(request_id="r", num_computed_tokens=tokens, num_in_flight_tokens=0,
                              num_prompt_tokens=tokens, num_tokens=tokens, mm_features=None,
                              sampling_params=None)
    sched.running.append(request)
    return sched, state, request


@pytest.mark.parametrize("policy", ["hae", "h2o", "snapkv"])
def test_a_request_under_the_floor_is_never_scored(policy):
    """Right after a 49-token prefill HAE would select (visual pruning) and H2O and SnapKV
    score; under the floor nothing is asked of the workers. The control (floor 0) is."""
    for floor, scored in ((DEFAULT_FLOOR_TOKENS, False), (0, True)):
        sched, state, request = _scheduler_with(policy, 49, floor)
        task = sched.kv_planner.score_task(request, state, num_tokens=49)
        assert (task is not None) == scored, (policy, floor)


def test_pool_pressure_passes_over_a_request_under_the_floor():
    for floor, evictable in ((DEFAULT_FLOOR_TOKENS, False), (0, True)):
        sched, state, request = _scheduler_with("snapkv", 6 * BS, floor, pool_pressure=True)
        found = sched.kv_pressure.candidates(request, state)
        assert (found is not None) == evictable, floor


# -- the operator's client_options ------------------------------------------------------------
SERVER = {"policy": "snapkv", "budget": 0.25}


@pytest.mark.parametrize("client_options, overrides, message", [
    ("none", {"budget": 0.5}, "kv_eviction.budget: this server does not let clients set it; "
     "no kv_eviction options are settable"),
    ([], {"policy": "h2o"}, "kv_eviction.policy: this server does not let clients set it"),
    ("budget", {"recycle_bin_blocks": 4096}, "kv_eviction.recycle_bin_blocks: this server does "
     "not let clients set it; settable: ['budget']"),
    ({"budget": {"min": 0.1}}, {"budget": 0.05}, "kv_eviction.budget: this server allows "
     "clients >= 0.1 (got 0.05)"),
    ({"budget": {"max": 0.5}}, {"budget": 1.0}, "kv_eviction.budget: this server allows "
     "clients <= 0.5 (got 1.0)"),
    ({"policy": {"choices": ["snapkv", "hae"]}}, {"policy": "hybridkv"},
     "kv_eviction.policy: this server lets clients choose only ['snapkv', 'hae']"),
    ('{"recycle_bin_blocks": {"max": 8}}', {"recycle_bin_blocks": 64},
     "kv_eviction.recycle_bin_blocks: this server allows clients <= 8 (got 64)"),
    ({"budget_tokens": {"min": 256}}, {"budget_tokens": "many"},
     "kv_eviction.budget_tokens: must be a number"),
])
def test_what_the_operator_did_not_allow_is_refused_by_name(client_options, overrides, message):
    server = parse_config({**SERVER, "client_options": client_options})
    with pytest.raises(ValueError) as err:
        server.with_overrides(overrides)
    assert message in str(err.value)


def test_what_the_operator_allows_still_applies():
    server = parse_config({**SERVER, "client_options": "budget,policy"})
    assert server.with_overrides({"budget": 0.5, "policy": "hae"}).policy == "hae"
    bounded = parse_config({**SERVER, "client_options": {"budget": {"min": 0.1, "max": 0.5}}})
    assert bounded.with_overrides({"budget": 0.1}).budget == 0.1
    assert parse_config({**SERVER, "client_options": "all"}).client_options is None
    # the bounds come on top of the field's own validation
    with pytest.raises(ValueError, match="kv_eviction.budget: must be > 0 and <= 1"):
        parse_config({**SERVER, "client_options": "budget"}).with_overrides({"budget": 0.0})


@pytest.mark.parametrize("client_options, message", [
    ({"colour": {}}, "'colour' is not a per-request field"),
    ({"policy": {"min": 1}}, "policy: min/max bound only"),
    ({"budget": {"choices": ["a"]}}, "budget: a choices bound is for policy only"),
    ({"policy": {"choices": ["lru"]}}, "policy: unknown policy 'lru'"),
    ({"budget": {"least": 0.1}}, "kv_eviction.client_options.budget.least"),
    ("{not json", "kv_eviction.client_options: not valid JSON"),
    (42, "expected 'all', 'none', a list of fields or a JSON object"),
])
def test_a_bad_client_options_setting_is_refused_at_startup(client_options, message):
    with pytest.raises(ValueError) as err:
        parse_config({**SERVER, "client_options": client_options})
    assert message in str(err.value)


def test_the_flags_reach_the_config():
    import argparse

    from vllm_kvevict.adapter.cli_args import add_flags, merge_into_additional_config

    parser = argparse.ArgumentParser()
    add_flags(parser)
    args = parser.parse_args(["--kv-eviction", "hae", "--kv-eviction-floor-tokens", "128",
                              "--kv-eviction-client-options", '{"budget": {"min": 0.1}}'])
    merge_into_additional_config(args)
    config = parse_config(args.additional_config["kv_eviction"])
    assert config.floor_tokens == 128 and config.client_options["budget"].min == 0.1


def test_a_request_may_not_raise_the_floor_past_a_prefill_eviction_servers_peak():
    from vllm_kvevict.adapter import check_request_peak

    vllm_config = SimpleNamespace(model_config=SimpleNamespace(max_model_len=7000),
                                  scheduler_config=SimpleNamespace(max_num_batched_tokens=128),
                                  cache_config=SimpleNamespace(block_size=BS))
    default = parse_config({"policy": "snapkv", "budget": 0.1, "prefill_eviction": True})
    with pytest.raises(ValueError, match="kv_eviction.floor_tokens"):
        check_request_peak(vllm_config, default, default.with_overrides({"floor_tokens": 6000}))
    check_request_peak(vllm_config, default, default.with_overrides({"floor_tokens": 64}))
