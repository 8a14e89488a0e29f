"""Prefill eviction: a prompt several times larger than the whole KV pool, evicted between its
chunks, on an engine that stock vLLM would refuse to start (64 blocks of 32 tokens for a
max_model_len of 7,000). One engine for the module; prompt chunks of 120 tokens, so every
chunk ends inside a block (the half-written block the next chunk continues)."""

from __future__ import annotations

import pytest
from engine_helpers import (
    BLOCK_SIZE,
    HFReference,
    eviction_report,
    excluded_from_log,
    finished_log,
    logprob_deltas,
    make_llm,
    passkey_prompt,
    sampling,
    scheduler,
    shutdown,
)

pytestmark = pytest.mark.engine

POOL_BLOCKS = 64  # 63 usable (vLLM keeps a null block): 2,016 tokens
MAX_LEN = 7000
CHUNK = 120
SERVER = {"policy": "laprox", "budget": 0.25, "prefill_eviction": True}


class _NewestOut:
    """Test policy: scores blocks by age, the newest lowest; with no sink or recent window only
    the guard on blocks not yet full keeps a chunk's half-written last block."""

    name = "test-newest-out"

    @classmethod
    def make(cls):
        from vllm_kvevict.policies.attention import AttentionMassPolicy

        class NewestOut(AttentionMassPolicy):
            name = cls.name

            def block_scores(self, stats, state):
                return 1.0 / (1.0 + stats.block_index.float())

        return NewestOut


@pytest.fixture(scope="module")
def llm():
    from vllm_kvevict.policies.base import REGISTRY, register_policy

    register_policy(_NewestOut.make())
    engine = make_llm({"kv_eviction": SERVER}, num_gpu_blocks_override=POOL_BLOCKS,
                      max_model_len=MAX_LEN, max_num_batched_tokens=CHUNK)
    yield engine
    shutdown(engine)
    REGISTRY.classes.pop(_NewestOut.name)


@pytest.fixture(scope="module")
def reference():
    return HFReference()


def _pool(llm):
    return scheduler(llm).kv_cache_manager.block_pool


def _tokens(llm, prompt: str) -> int:
    return len(llm.get_tokenizer()(prompt).input_ids)


def _peak_tracker(llm):
    """Record the most blocks any request held at once (after every allocation)."""
    sched = scheduler(llm)
    peak = {"blocks": 0}
    original = sched.kv_cache_manager.allocate_slots

    def allocate_slots(request, *a, **k):
        out = original(request, *a, **k)
        held = len(sched.ledger.resident_array(request.request_id))
        peak["blocks"] = max(peak["blocks"], held)
        return out

    sched.kv_cache_manager.allocate_slots = allocate_slots
    return peak, lambda: setattr(sched.kv_cache_manager, "allocate_slots", original)


@pytest.mark.parametrize("budget", [0.25, 0.1])
def test_a_prompt_three_times_the_pool_is_answered(llm, budget):
    pool = _pool(llm)
    llm.reset_prefix_cache()
    start_free = pool.get_num_free_blocks()
    prompt = passkey_prompt("71432", repeats=134)
    n = _tokens(llm, prompt)
    assert n >= 3 * start_free * BLOCK_SIZE, (n, start_free)
    peak, restore = _peak_tracker(llm)
    try:
        out = llm.generate([prompt], sampling({"budget": budget}, max_tokens=6), use_tqdm=False)[0]
    finally:
        restore()
    assert "71432" in out.outputs[0].text
    report = eviction_report(out)
    assert report["attended_tokens"] <= budget * report["total_tokens"] + 2 * BLOCK_SIZE
    from vllm_kvevict.config import EvictionConfig

    bound = EvictionConfig(**{**SERVER, "budget": budget}).peak_blocks(n + 6, CHUNK, BLOCK_SIZE)
    assert peak["blocks"] <= bound, (peak, bound)
    assert pool.get_num_free_blocks() == start_free  # everything back


@pytest.mark.parametrize("query", ["chunk", "probe", "keywords"])
def test_each_chunk_attends_exactly_without_what_was_evicted_before_it(llm, reference, query):
    """vLLM's logprobs equal a transformers reference whose queries of each chunk are masked
    from exactly the blocks excluded when that chunk ran (the scheduler's log), whatever
    scored the middle chunks (``prefill_query``)."""
    llm.reset_prefix_cache()
    prompt = passkey_prompt("24680", repeats=48)  # ~2.3k tokens: more than the pool
    out = llm.generate([prompt], sampling({"prefill_query": query}, max_tokens=12, logprobs=0),
                       use_tqdm=False)[0]
    log = finished_log(llm, out.request_id)
    prompt_len = len(out.prompt_token_ids)
    assert prompt_len > (POOL_BLOCKS - 1) * BLOCK_SIZE
    during_prefill = [c for c, excluded in log if excluded and c < prompt_len]
    assert len(during_prefill) >= 3, log  # evicted between several chunks, not only at the end
    # between chunks the request is brought back to its prompt's budget, not to the (smaller)
    # budget of the tokens computed so far: a middle chunk cannot see the question, so it
    # keeps all it may until the prompt's end
    from vllm_kvevict.config import EvictionConfig

    prompt_budget = EvictionConfig(**SERVER).keep_blocks(prompt_len, BLOCK_SIZE)
    for committed, excluded in log:
        if excluded and committed < prompt_len:
            assert -(-committed // BLOCK_SIZE) - len(excluded) >= prompt_budget, (committed, log)
    completion = out.outputs[0]
    ids = list(out.prompt_token_ids) + list(completion.token_ids)
    start = prompt_len - 1
    masked = max(logprob_deltas(reference.logprobs(ids, excluded_from_log(log)), start, completion))
    # the same log applied only from the end of the prompt (as if nothing left during prefill)
    late = [(max(c, prompt_len - 1), excluded) for c, excluded in log]
    unmasked = max(logprob_deltas(reference.logprobs(ids, excluded_from_log(late)), start,
                                  completion))
    print(f"prefill eviction: max |dlogprob| vs per-chunk masked reference {masked:.2e}; "
          f"masked only after the prompt {unmasked:.2e}")
    assert masked <= 5e-5
    assert unmasked > 100 * masked


def test_a_half_written_block_at_a_chunk_boundary_is_never_evicted(llm, reference):
    """Chunks of 120 tokens end inside a block; with no sink or recent window and a policy that
    scores the newest block lowest, only the guards keep it (the protected mask: not yet
    full / recent from the committed token; the ledger refuses to release a block that is not
    full). Every decision's excluded blocks were full when it ran, and the output stays
    exact."""
    llm.reset_prefix_cache()
    options = {"policy": _NewestOut.name, "sink_tokens": 0, "recent_tokens": 0}
    out = llm.generate([passkey_prompt("13579", repeats=48)], sampling(options, max_tokens=8),
                       use_tqdm=False)[0]
    log = finished_log(llm, out.request_id)
    boundaries = [c for c, excluded in log if excluded and c % BLOCK_SIZE]
    assert boundaries, "no decision at a chunk boundary inside a block"
    for committed, excluded in log:
        assert all((b + 1) * BLOCK_SIZE <= committed for b in excluded), (committed, sorted(excluded))
    completion = out.outputs[0]
    ids = list(out.prompt_token_ids) + list(completion.token_ids)
    deltas = logprob_deltas(reference.logprobs(ids, excluded_from_log(log)),
                            len(out.prompt_token_ids) - 1, completion)
    assert max(deltas) <= 5e-5


def test_blocks_computed_after_a_prefill_eviction_are_not_published(llm, reference):
    """Prefix caching stays on: the same prompt again may reuse only blocks computed before the
    first eviction (later ones were computed with part of the prompt excluded), and the
    second request is exact against its own masks (a poisoned block would break that)."""
    llm.reset_prefix_cache()
    prompt = passkey_prompt("97531", repeats=48)
    first = llm.generate([prompt], sampling(max_tokens=4), use_tqdm=False)[0]
    log = finished_log(llm, first.request_id)
    first_eviction = min(c for c, excluded in log if excluded)
    second = llm.generate([prompt], sampling(max_tokens=8), use_tqdm=False)[0]
    assert 0 < second.num_cached_tokens <= first_eviction
    completion = second.outputs[0]
    ids = list(second.prompt_token_ids) + list(completion.token_ids)
    ref = reference.logprobs(ids, excluded_from_log(finished_log(llm, second.request_id)))
    assert max(logprob_deltas(ref, len(second.prompt_token_ids) - 1, completion)) <= 5e-5


def test_two_long_prompts_at_once_both_finish(llm):
    """Each needs more than the pool without eviction; admission waits for room for the second
    one's peak instead of over-admitting, and both are answered."""
    llm.reset_prefix_cache()
    pool = _pool(llm)
    start_free = pool.get_num_free_blocks()
    prompts = [passkey_prompt("11111", repeats=100), passkey_prompt("22222", repeats=100)]
    outs = llm.generate(prompts, sampling({"budget": 0.1}, max_tokens=6), use_tqdm=False)
    assert "11111" in outs[0].outputs[0].text and "22222" in outs[1].outputs[0].text
    assert pool.get_num_free_blocks() == start_free


def test_an_abort_between_prefill_chunks_returns_every_block(llm):
    """A request aborted after it has evicted between chunks (released blocks, a half-done
    prompt) gives every block back, and the next request is served."""
    from vllm.inputs import TokensPrompt

    llm.reset_prefix_cache()
    pool, sched, engine = _pool(llm), scheduler(llm), llm.llm_engine
    start_free = pool.get_num_free_blocks()
    ids = llm.get_tokenizer()(passkey_prompt("86420", repeats=100)).input_ids
    engine.add_request("abort-me", TokensPrompt(prompt_token_ids=ids), sampling(max_tokens=4))
    for _ in range(200):
        engine.step()
        log = sched.kv_book.logs.get("abort-me") or next(
            (v for k, v in sched.kv_book.logs.items() if k.startswith("abort-me")), [])
        if any(excluded and c < len(ids) // 2 for c, excluded in log):
            break
    else:
        pytest.fail("no eviction in the first half of the prompt")
    assert sched.requests, "the request finished before the abort"
    engine.abort_request(list(sched.requests), internal=True)
    while engine.has_unfinished_requests():
        engine.step()
    assert pool.get_num_free_blocks() == start_free
    assert not sched.ledger.requests and not sched.kv_requests
    out = llm.generate([passkey_prompt("86420", repeats=48)], sampling(max_tokens=6),
                       use_tqdm=False)[0]
    assert "86420" in out.outputs[0].text


def test_a_request_that_would_need_more_than_the_pool_is_refused_at_the_front_end(llm):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="kv_eviction.prefill_eviction"):
        llm.generate(["The sky is"], sampling({"prefill_eviction": False}, max_tokens=2),
                     use_tqdm=False)
    out = llm.generate(["The sky is"], sampling(max_tokens=2), use_tqdm=False)[0]
    assert out.outputs[0].token_ids  # still serving



def test_the_question_probe_scores_the_middle_chunks_and_leaves_nothing_behind(llm, monkeypatch):
    """With ``prefill_query="probe"`` a hidden probe request (the first block and the prompt's
    tail) runs once; its layer-0 queries, turned to the tail's positions, equal the real
    question's layer-0 queries computed in the last chunk (layer 0 sees only the token and its
    position: a wrong shift fails here); the middle chunks are scored with them; the client
    sees only its own request; every block and the workers' probe queries are gone after."""
    import torch

    from vllm_kvevict.adapter import worker as worker_mod
    from vllm_kvevict.adapter.statistics import PROBE_WINDOW

    llm.reset_prefix_cache()
    pool, sched = _pool(llm), scheduler(llm)
    start_free = pool.get_num_free_blocks()
    probes, finals, hooked = {}, {}, []
    keep, measure = (worker_mod.WorkerEviction._keep_probe_queries,
                     worker_mod.WorkerEviction._measure_layer)

    def keep_spy(self, index, layer, query):
        keep(self, index, layer, query)
        probes["worker"] = self
        for task, _ in self.step_probes:
            probes[index] = self.probe_queries[task.parent][index].clone()  # [Hq, W, D]

    def measure_spy(self, index, name, layer, query, key, kv_cache):
        for sr in self.scored:
            hooked.append(sr.hooked)
            if sr.task.phase == "prefill" and not sr.task.probe:  # the last chunk: the question
                q = query.view(query.shape[0], layer.impl.num_heads, -1)
                finals[index] = q[max(sr.q_start, sr.q_end - 32):sr.q_end].transpose(0, 1).clone()
        return measure(self, index, name, layer, query, key, kv_cache)

    monkeypatch.setattr(worker_mod.WorkerEviction, "_keep_probe_queries", keep_spy)
    monkeypatch.setattr(worker_mod.WorkerEviction, "_measure_layer", measure_spy)
    outs = llm.generate([passkey_prompt("36912", repeats=48)],
                        sampling({"prefill_query": "probe"}, max_tokens=6), use_tqdm=False)
    assert len(outs) == 1 and "36912" in outs[0].outputs[0].text
    worker = probes.pop("worker")
    assert sorted(probes) == sorted(finals) and len(probes) > 1  # every layer, once
    n = finals[0].shape[1]  # the last chunk's queries (it may be shorter than the tail)
    assert n >= 1
    torch.testing.assert_close(probes[0][:, -n:].float(), finals[0].float(), atol=1e-3, rtol=1e-3)
    # deeper layers differ (the probe's tail did not read the document) but stay close
    cos = torch.nn.functional.cosine_similarity(probes[1][:, -n:].flatten(), finals[1].flatten(),
                                                dim=0)
    assert 0.9 < float(cos) < 1.0
    assert any(PROBE_WINDOW in h for h in hooked)  # the middle chunks were scored with it
    for _ in range(3):  # the probe finished in its own step: nothing is left to run
        if not sched.requests:
            break
        llm.llm_engine.step()
    assert not sched.requests
    assert not sched.kv_probes.by_probe and not sched.kv_probes.of_parent
    assert pool.get_num_free_blocks() == start_free
    assert not worker.probe_queries  # dropped when the prompt was computed


def test_a_parent_aborted_before_its_probe_ran_takes_the_probe_with_it(llm):
    from vllm.inputs import TokensPrompt

    llm.reset_prefix_cache()
    pool, sched, engine = _pool(llm), scheduler(llm), llm.llm_engine
    start_free = pool.get_num_free_blocks()
    ids = llm.get_tokenizer()(passkey_prompt("55555", repeats=48)).input_ids
    engine.add_request("abort-early", TokensPrompt(prompt_token_ids=ids),
                       sampling({"prefill_query": "probe"}, max_tokens=4))
    assert len(sched.requests) == 2 and sched.kv_probes.by_probe  # the request and its probe
    engine.abort_request([r for r in sched.requests if not sched.kv_probes.is_probe(r)],
                         internal=True)
    for _ in range(3):
        engine.step()
        if not sched.requests:
            break
    assert not sched.requests and not sched.kv_probes.by_probe
    assert pool.get_num_free_blocks() == start_free
