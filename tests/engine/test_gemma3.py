"""A hybrid KV cache on a real trained model: Gemma-3-270M (15 sliding-window layers of 512
tokens, 3 full-attention layers) in vLLM's hybrid KV-cache manager.

vLLM gives it six KV-cache groups: five of sliding-window layers, one of the three
full-attention layers. The plugin evicts in the full-attention group only; the sliding-window
groups keep vLLM's blocks, rows, slot mappings and lengths. One engine serves the module.
"""

from __future__ import annotations

import pytest
from engine_helpers import (
    BLOCK_SIZE,
    HFGemma3Reference,
    engine_core,
    excluded_from_log,
    finished_log,
    logprob_deltas,
    make_llm,
    passkey_prompt,
    scheduler,
    shutdown,
    stock_run,
    token_logprobs,
    top_logprobs,
)
from engine_helpers import sampling as params

pytestmark = pytest.mark.engine

EVICTING = {"policy": "attention", "budget": 0.25, "interval": 4}


def _folder() -> str:
    from vllm_kvevict.models import model_path

    return str(model_path("gemma3"))


@pytest.fixture(scope="module")
def llm():
    engine = make_llm({"kv_eviction": EVICTING}, model=_folder())
    yield engine
    shutdown(engine)


@pytest.fixture(scope="module")
def reference():
    return HFGemma3Reference()


def _runner(llm):
    return engine_core(llm).model_executor.driver_worker.worker.model_runner


def _max_delta(ref, start, completion) -> float:
    return max(logprob_deltas(ref, start, completion))


def test_only_the_full_attention_group_is_evicted_and_scored(llm):
    """The scheduler's ledger and the worker's hooks sit on the one full-attention group."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    sched = scheduler(llm)
    groups = sched.kv_cache_config.kv_cache_groups
    kinds = [type(g.kv_cache_spec) for g in groups]
    assert kinds.count(FullAttentionSpec) == 1 and kinds.count(SlidingWindowSpec) == len(groups) - 1
    full = kinds.index(FullAttentionSpec)
    assert sched.kv_gid == full and sched.kv_hybrid
    assert sched.ledger.manager is sched.kv_cache_manager.coordinator.single_type_managers[full]
    ev = _runner(llm).__dict__["_kvevict"]
    assert ev.gid == full and ev.layer_names == sorted(
        groups[full].layer_names, key=lambda n: int(n.split(".")[2]))
    assert len(ev.layer_names) == 3


def test_zero_eviction_is_identical_to_stock_vllm(llm):
    """Budget 1.0 (a plan every step, nothing evicted) and policy ``none``: every logprob
    equals stock vLLM's on the same batch (a 1.1k-token prompt, past the 512-token window, and
    a short one)."""
    prompts = [passkey_prompt("71432", repeats=22), "The capital of France is"]
    llm.reset_prefix_cache()
    outs = llm.generate(prompts, [params({"budget": 1.0}, logprobs=5), params({"policy": "none"}, logprobs=5)])
    assert len(outs[0].prompt_token_ids) > 2 * 512
    expected = stock_run({"prompts": prompts, "max_tokens": 16, "logprobs": 5,
                          "engine": {"model": _folder()}})
    for out, ref in zip(outs, expected):
        completion = out.outputs[0]
        assert list(out.prompt_token_ids) == ref["prompt_token_ids"]
        assert list(completion.token_ids) == ref["token_ids"]
        assert token_logprobs(completion) == ref["logprobs"]
        got = [{str(t): lp for t, lp in pos.items()} for pos in top_logprobs(completion)]
        assert got == ref["top"]


def test_evicted_output_matches_reference_masked_in_full_layers_only(llm, reference):
    """At a 25 % budget the full-attention layers lose most of the prompt, the sliding-window
    layers keep their window: vLLM's logprobs match a reference that masks the evicted
    positions in the full-attention layers only. Masking them in every layer, or in none, is
    far off: the test tells where the plugin evicted."""
    out = llm.generate([passkey_prompt("71432", repeats=22)], params())[0]
    completion = out.outputs[0]
    log = finished_log(llm, out.request_id)
    evicted = set().union(*(blocks for _, blocks in log))
    prompt_blocks = len(out.prompt_token_ids) // BLOCK_SIZE
    assert len(evicted) >= prompt_blocks // 2, "too little was evicted to prove anything"
    ids = list(out.prompt_token_ids) + list(completion.token_ids)
    start = len(out.prompt_token_ids) - 1
    masked = excluded_from_log(log)
    delta = _max_delta(reference.logprobs(ids, masked), start, completion)
    reference.masked_sliding = True
    try:
        delta_everywhere = _max_delta(reference.logprobs(ids, masked), start, completion)
    finally:
        reference.masked_sliding = False
    delta_none = _max_delta(reference.logprobs(ids, lambda p: set()), start, completion)
    print(f"gemma3 max |Δlogprob|: full layers masked {delta:.2e}; every layer masked "
          f"{delta_everywhere:.2e}; nothing masked {delta_none:.2e}")
    assert delta <= 5e-4
    assert delta_everywhere > 20 * delta and delta_none > 20 * delta


def test_sliding_window_groups_keep_their_blocks(llm):
    """While a request is evicted in the full group, every sliding-window group's block list
    is vLLM's own: real blocks exactly over the window, null blocks only before it."""
    from vllm import SamplingParams

    sched = scheduler(llm)
    engine = llm.llm_engine
    engine.add_request("sw", passkey_prompt("58213", repeats=22),
                       SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    seen = []
    while engine.has_unfinished_requests():
        engine.step()
        rid = next((k for k in sched.requests if k.startswith("sw")), None)
        if rid is None or rid not in sched.ledger.requests or not sched.ledger.requests[rid].released:
            continue
        request = sched.requests[rid]
        null = sched.ledger.null_block
        managers = sched.kv_cache_manager.coordinator.single_type_managers
        for gid, manager in enumerate(managers):
            blocks = manager.req_to_blocks[rid]
            if gid == sched.kv_gid:
                assert any(b is null for b in blocks)  # evicted here
                continue
            window = manager.kv_cache_spec.sliding_window
            first_needed = max(request.num_computed_tokens - window + 1, 0) // BLOCK_SIZE
            assert all(b is not null for b in blocks[first_needed:])
            seen.append(gid)
    assert len(set(seen)) == len(sched.kv_cache_config.kv_cache_groups) - 1


@pytest.mark.parametrize("policy", ["laprox", "snapkv"])
def test_a_passkey_survives_eviction_in_the_full_layers(llm, policy):
    """The trained model still retrieves a mid-context pass key with 75 % of its full-attention
    KV evicted (the key sits outside the 512-token window of the sliding-window layers, so
    only the full-attention layers can see it)."""
    prompt = passkey_prompt("58213", repeats=22, depth=0.3)
    out = llm.generate([prompt], params({"policy": policy, "budget": 0.25}))[0]
    report = out.kv_transfer_params["kv_eviction"]
    prompt_len = len(out.prompt_token_ids)
    key_at = len(llm.get_tokenizer()(prompt.split("58213")[0]).input_ids)
    assert prompt_len - key_at > 512
    assert report["evicted_tokens"] >= prompt_len // 2
    assert "58213" in out.outputs[0].text
