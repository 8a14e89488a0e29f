"""The engine mechanism on a real vLLM engine and the real SmolLM2 model.

One engine serves the whole module (≈30–50 s to start on 2 cores). The default config evicts
(policy ``attention``, 25 % budget); requests override it through ``extra_args``.
"""

from __future__ import annotations

import pytest
from engine_helpers import (
    BLOCK_SIZE,
    HFReference,
    engine_core,
    excluded_from_log,
    finished_log,
    logprob_deltas,
    make_llm,
    passkey_prompt,
    sampling,
    scheduler,
    shutdown,
    stock_run,
    token_logprobs,
    top_logprobs,
)

from vllm_kvevict.policies import available_policies

pytestmark = pytest.mark.engine

EVICTING = {"policy": "attention", "budget": 0.25, "interval": 4}
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def llm():
    engine = make_llm({"kv_eviction": EVICTING})
    yield engine
    shutdown(engine)


@pytest.fixture(scope="module")
def reference():
    return HFReference()


@pytest.fixture(scope="module")
def reference64():
    return HFReference("float64")


def eviction_log(llm, request_id):
    log = finished_log(llm, request_id)
    assert log, f"no eviction recorded for request {request_id}"
    return log


def params(kv=None, max_tokens=MAX_TOKENS, logprobs=0):
    return sampling(kv, max_tokens, logprobs)


def test_zero_eviction_is_identical_to_stock_vllm(llm):
    """Without eviction the engine is stock vLLM, bit for bit, on a mixed batch: a multi-block
    prompt (1285 tokens, 41 blocks), a 325-token prompt whose first two blocks it shares (an
    in-step prefix-cache hit) and a 5-token prompt, prefilled in one step, then decoded
    together. Two requests are tracked at budget 1.0 (the scheduler attaches a plan every
    step, nothing is evicted or scored), one opts out with policy ``none``. Every returned
    logprob (top 5 and the sampled token's) must equal stock vLLM's exactly: a step that
    batched, chunked or ordered tokens differently would change their float sums by ~1e-5."""
    prompts = [
        passkey_prompt("71432", repeats=26),
        passkey_prompt("58213", repeats=6, depth=0.3),
        "The capital of France is",
    ]
    top = 5
    sched = scheduler(llm)
    steps = []
    original = sched.schedule

    def spy(*a, **k):
        output = original(*a, **k)
        if output.num_scheduled_tokens:
            steps.append(sorted(output.num_scheduled_tokens.values(), reverse=True))
        return output

    # a prefix-cache hit left by an earlier test of this module would change the prefill
    llm.reset_prefix_cache()
    sched.schedule = spy
    try:
        outs = llm.generate(prompts, [params({"budget": 1.0}, logprobs=top),
                                      params({"budget": 1.0}, logprobs=top),
                                      params({"policy": "none"}, logprobs=top)])
    finally:
        del sched.schedule
    assert [len(o.prompt_token_ids) for o in outs] == [1285, 325, 5]
    assert steps[0] == [1285, 325 - 2 * BLOCK_SIZE, 5]  # one prefill step, 2 blocks hit
    assert steps[1:] == [[1, 1, 1]] * (MAX_TOKENS - 1)
    logged = scheduler(llm).kv_book.finished_logs
    assert not any(k.startswith(f"{o.request_id}-") or k == o.request_id for o in outs for k in logged)
    expected = stock_run({"prompts": prompts, "max_tokens": MAX_TOKENS, "logprobs": top})
    assert [o.num_cached_tokens for o in outs] == [0, 2 * BLOCK_SIZE, 0]
    assert [r["num_cached_tokens"] for r in expected] == [0, 2 * BLOCK_SIZE, 0]
    for out, ref in zip(outs, expected):
        completion = out.outputs[0]
        assert list(completion.token_ids) == ref["token_ids"]
        assert token_logprobs(completion) == ref["logprobs"]  # bit-identical
        got = [{str(t): lp for t, lp in pos.items()} for pos in top_logprobs(completion)]
        assert got == ref["top"]  # every top-5 logprob, bit-identical


def test_nothing_to_evict_means_nothing_scored(llm):
    """At budget 1.0 no step asks the workers for statistics (the over-budget check counts
    whole blocks, as the decision does: a partly filled last block is not over budget)."""
    sched = scheduler(llm)
    asked = []
    original = sched.kv_planner.score_task

    def spy(request, state, num_tokens, *rest):
        task = original(request, state, num_tokens, *rest)
        if task is not None:
            asked.append((request.request_id, task.phase))
        return task

    sched.kv_planner.score_task = spy
    try:
        outs = llm.generate([passkey_prompt("71432")], params({"budget": 1.0}, max_tokens=40))
    finally:
        del sched.kv_planner.score_task
    assert len(outs[0].prompt_token_ids) % 32 != 0  # a partly filled last block all along
    assert asked == []


def _max_delta(ref, start, completion) -> float:
    return max(logprob_deltas(ref, start, completion))


def test_evicted_output_matches_masked_reference(llm, reference, reference64):
    """Eviction changes nothing but which keys are attended: against a float64 reference that
    masks the evicted positions (original RoPE positions kept), the plugin's error is that of
    float32 vLLM itself on the same prompt without eviction."""
    prompt = passkey_prompt()
    out = llm.generate([prompt], params())[0]
    completion = out.outputs[0]
    log = eviction_log(llm, out.request_id)
    evicted_blocks = set().union(*(blocks for _, blocks in log))
    assert evicted_blocks, "nothing was evicted: the test would prove nothing"
    ids = list(out.prompt_token_ids) + list(completion.token_ids)
    start = len(out.prompt_token_ids) - 1
    masked = excluded_from_log(log)
    ref = reference.logprobs(ids, masked)
    delta32 = _max_delta(ref, start, completion)
    delta64 = _max_delta(reference64.logprobs(ids, masked), start, completion)
    delta_full = _max_delta(reference.logprobs(ids, lambda p: set()), start, completion)
    # the noise floor: float32 vLLM without eviction vs the float64 reference, same prompt
    plain = llm.generate([prompt], params({"budget": 1.0}))[0].outputs[0]
    plain_ids = list(out.prompt_token_ids) + list(plain.token_ids)
    floor64 = _max_delta(reference64.logprobs(plain_ids, lambda p: set()), start, plain)
    print(f"max |Δlogprob| vs masked reference: float32 {delta32:.2e}, float64 {delta64:.2e}; "
          f"no-eviction floor vs float64 {floor64:.2e}; vs unmasked (full) {delta_full:.2e}")
    greedy = [int(ref[start + i].argmax()) for i in range(len(completion.token_ids))]
    assert greedy == list(completion.token_ids)
    assert delta64 <= 1.5 * floor64  # eviction adds no error beyond float32 vLLM's own
    assert delta32 <= 5e-5
    # the reference really differs from full attention: the mask is what makes it match
    assert delta_full > 100 * delta32
    assert "71432" in completion.text  # the needle block survived a 25 % budget


def _run_steps(llm, request_id, prompt, sampling, until=None, max_steps=200):
    engine = llm.llm_engine
    engine.add_request(request_id, prompt, sampling)
    for _ in range(max_steps):
        engine.step()
        if until is not None and until():
            return True
        if not engine.has_unfinished_requests():
            return False
    return False


def _internal_id(sched, request_id):
    ids = [k for k in sched.requests if k == request_id or k.startswith(f"{request_id}-")]
    return ids[0] if ids else None


def _evicted(sched, request_id) -> bool:
    rid = _internal_id(sched, request_id)
    return rid is not None and rid in sched.ledger.requests and bool(sched.ledger.requests[rid].released)


def _held_blocks(sched) -> set[int]:
    null = sched.ledger.null_block
    manager = sched.ledger.manager
    return {b.block_id for blocks in manager.req_to_blocks.values() for b in blocks if b is not null}


def test_free_blocks_rise_by_evicted_blocks(llm):
    sched = scheduler(llm)
    pool = sched.kv_cache_manager.block_pool
    engine = llm.llm_engine
    engine.add_request("free-count", passkey_prompt("11111"), params(max_tokens=12))
    before_free = None
    while engine.has_unfinished_requests():
        held_before = len(_held_blocks(sched))
        free_before = pool.get_num_free_blocks()
        released_before = sched.kv_counters.released
        engine.step()
        released = sched.kv_counters.released - released_before
        if released:
            held_after = len(_held_blocks(sched))
            allocated = held_after - (held_before - released)
            assert pool.get_num_free_blocks() == free_before + released - allocated
            before_free = free_before
    assert before_free is not None, "no eviction happened"


def test_prefix_cache_never_serves_blocks_computed_after_eviction(llm):
    from vllm.inputs import TokensPrompt

    first = llm.generate([passkey_prompt("24680")], params(max_tokens=64))[0]
    boundary = eviction_log(llm, first.request_id)[0][0]  # tokens computed before eviction
    # a later request whose prompt extends the first one's sequence, with full attention
    ids = list(first.prompt_token_ids) + list(first.outputs[0].token_ids)
    second = llm.generate([TokensPrompt(prompt_token_ids=ids)], params({"budget": 1.0}, 4))[0]
    assert second.num_cached_tokens <= boundary // BLOCK_SIZE * BLOCK_SIZE
    assert second.num_cached_tokens > 0  # the clean prefix still hits


def test_poison_guard_is_what_prevents_the_hit(llm):
    """Control: with the guard disabled the same scenario does serve poisoned blocks."""
    from vllm.inputs import TokensPrompt

    sched = scheduler(llm)
    ledger = sched.ledger
    original = ledger.cacheable_tokens
    ledger.cacheable_tokens = lambda req_id, n: n
    try:
        first = llm.generate([passkey_prompt("97531")], params(max_tokens=64))[0]
        boundary = eviction_log(llm, first.request_id)[0][0]
        ids = list(first.prompt_token_ids) + list(first.outputs[0].token_ids)
        second = llm.generate([TokensPrompt(prompt_token_ids=ids)], params({"budget": 1.0}, 4))[0]
    finally:
        ledger.cacheable_tokens = original
    assert second.num_cached_tokens > boundary // BLOCK_SIZE * BLOCK_SIZE


def test_abort_and_preemption_of_evicted_requests_leak_nothing(llm):
    sched = scheduler(llm)
    pool = sched.kv_cache_manager.block_pool
    llm.reset_prefix_cache()
    initial = pool.get_num_free_blocks()
    engine = llm.llm_engine

    # abort after eviction
    evicted = _run_steps(llm, "to-abort", passkey_prompt("13579"), params(max_tokens=200),
                         until=lambda: _evicted(sched, "to-abort"))
    assert evicted
    rid = _internal_id(sched, "to-abort")
    engine.abort_request(["to-abort"])
    while engine.has_unfinished_requests():
        engine.step()
    assert rid not in sched.ledger.requests
    assert pool.get_num_free_blocks() == initial

    # preemption after eviction: recompute with full attention, then finish normally
    evicted = _run_steps(llm, "to-preempt", passkey_prompt("24680"), params(max_tokens=40),
                         until=lambda: _evicted(sched, "to-preempt"))
    assert evicted
    rid = _internal_id(sched, "to-preempt")
    assert engine_core(llm).scheduler.reset_prefix_cache(reset_running_requests=True)
    assert rid not in sched.ledger.requests  # eviction state cleared with the blocks
    assert sched.requests[rid].num_preemptions == 1
    while engine.has_unfinished_requests():
        engine.step()
    assert pool.get_num_free_blocks() == initial


#: every registered method but the positional baseline it is compared with (a new policy is
#: checked here without being listed)
POLICIES = [p for p in available_policies() if p not in ("none", "streamingllm")]


def _passkey_accuracy(llm, policy, budget, keys):
    prompts = [passkey_prompt(k, repeats=12, depth=0.5) for k in keys]
    outs = llm.generate(prompts, params({"policy": policy, "budget": budget}, max_tokens=8))
    return sum(k in o.outputs[0].text for k, o in zip(keys, outs)) / len(keys)


@pytest.fixture(scope="module")
def streaming_accuracy(llm):
    return _passkey_accuracy(llm, "streamingllm", 0.25, ["68219", "40573"])


@pytest.mark.parametrize("policy", POLICIES)
def test_each_policy_retrieves_a_mid_context_passkey_where_streamingllm_cannot(
    llm, policy, streaming_accuracy
):
    released_before = scheduler(llm).kv_counters.released
    accuracy = _passkey_accuracy(llm, policy, 0.25, ["68219", "40573"])
    assert scheduler(llm).kv_counters.released > released_before, "nothing was evicted"
    # every scoring task of the real engine was measured by the attention hooks
    assert scheduler(llm).kv_counters.scoring_skipped == 0
    assert streaming_accuracy == 0.0
    assert accuracy == 1.0


class _ParkThenRestore:
    """Test policy: the first decision parks half of the evictable blocks, the next one
    restores them all; afterwards everything stays. Exercises the recycle bin end to end."""

    name = "test-park-then-restore"

    @classmethod
    def make(cls):
        from vllm_kvevict.policies.attention import AttentionMassPolicy
        from vllm_kvevict.policies.selection import Decision

        class ParkThenRestore(AttentionMassPolicy):
            name = cls.name

            def __init__(self, config=None):
                super().__init__(config)
                self.calls = 0

            def select(self, scores, *, block_index, keep_blocks, protected, bin_blocks,
                       visual_blocks=None):
                import torch

                self.calls += 1
                park = block_index[~protected][::2] if self.calls == 1 else block_index[:0]
                keep = block_index[~torch.isin(block_index, park)]
                return Decision(keep=keep, park=park, release=block_index[:0])

        return ParkThenRestore


@pytest.fixture
def park_then_restore_policy():
    from vllm_kvevict.policies.base import REGISTRY, register_policy

    register_policy(_ParkThenRestore.make())
    yield _ParkThenRestore.name
    REGISTRY.classes.pop(_ParkThenRestore.name)


def test_parked_blocks_leave_attention_and_come_back_exactly(llm, reference, park_then_restore_policy):
    sched = scheduler(llm)
    pool = sched.kv_cache_manager.block_pool
    llm.reset_prefix_cache()
    initial = pool.get_num_free_blocks()
    counters = sched.kv_counters
    parked, restored, released = counters.parked, counters.restored, counters.released
    out = llm.generate([passkey_prompt("86420")], params({"policy": park_then_restore_policy}, 40))[0]
    assert counters.parked > parked and counters.restored == restored + (counters.parked - parked)
    assert counters.released == released  # parking holds memory; nothing was freed
    log = eviction_log(llm, out.request_id)
    assert len(log) == 2 and log[0][1] and not log[1][1]  # parked set, then empty again
    completion = out.outputs[0]
    ids = list(out.prompt_token_ids) + list(completion.token_ids)
    start = len(out.prompt_token_ids) - 1
    ref = reference.logprobs(ids, excluded_from_log(log))
    full = reference.logprobs(ids, lambda p: set())
    delta, delta_full = _max_delta(ref, start, completion), _max_delta(full, start, completion)
    print(f"park/restore: max |Δlogprob| vs time-masked reference {delta:.2e}; vs full {delta_full:.2e}")
    assert delta <= 5e-5 and delta_full > 100 * delta
    assert pool.get_num_free_blocks() == initial  # parked blocks went back at finish


def test_each_request_reports_its_eviction_and_metrics_reach_the_registry(llm):
    from prometheus_client import REGISTRY, generate_latest

    evicting, full = llm.generate(
        [passkey_prompt("31337"), passkey_prompt("31338")],
        [params(max_tokens=8), params({"budget": 1.0}, max_tokens=8)],
    )
    report = evicting.kv_transfer_params["kv_eviction"]
    n = len(evicting.prompt_token_ids) + 8 - 1  # the last sampled token has no KV yet
    assert report["policy"] == "attention" and report["total_tokens"] == n
    assert report["evicted_tokens"] > 0
    assert report["attended_tokens"] == n - report["evicted_tokens"] - report["parked_tokens"]
    assert full.kv_transfer_params["kv_eviction"]["evicted_tokens"] == 0
    text = generate_latest(REGISTRY).decode()
    released = {ln.split('"')[1]: float(ln.split()[-1]) for ln in text.splitlines()
                if ln.startswith("vllm_kvevict_released_blocks_total{")}
    assert released["attention"] > 0
    assert sum(released.values()) == scheduler(llm).kv_counters.released  # every policy's share


@pytest.mark.parametrize("bad, field", [
    ({"budget": 3}, "kv_eviction.budget"),
    ({"policy": "fifo"}, "kv_eviction.policy"),
    ({"recent_tokens": -1}, "kv_eviction.recent_tokens"),
])
def test_bad_request_options_are_refused_and_the_engine_keeps_serving(llm, bad, field):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match=field):
        llm.generate([passkey_prompt()], params(bad, max_tokens=2))
    assert llm.generate(["The sky is"], params(max_tokens=2))[0].outputs[0].token_ids
