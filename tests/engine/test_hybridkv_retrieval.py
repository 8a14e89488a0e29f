"""HybridKV's dynamic heads retrieve: a block they do not read at one decode step stays parked
(restorable) and comes back when they read it again; only what falls out of the store is
released. One engine for the module."""

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
    shutdown,
)

pytestmark = pytest.mark.engine

FLIP = "test-hybridkv-flip"
KEY = "52817"


def _flip_policy():
    """HybridKV whose scores put the answer's blocks (``answer``: block positions) just below
    the attended budget (``keep`` blocks) at the first decode scoring and first at the second:
    the answer loses one decode step's ranking and wins the next."""
    import torch
    from pydantic import Field

    from vllm_kvevict.policies.hybridkv import HybridKVPolicy

    class Flip(HybridKVPolicy):
        name = FLIP

        class Config(HybridKVPolicy.Config):
            answer: list[int] = Field(default_factory=list)
            keep: int = 1  # the attended budget in blocks at that step

        def block_scores(self, stats, state):
            scores = super().block_scores(stats, state)
            if stats.phase != "decode":
                return scores
            state["decode_calls"] = state.get("decode_calls", 0) + 1
            answer = torch.isin(stats.block_index, torch.tensor(self.config.answer,
                                                                device=scores.device))
            if state["decode_calls"] == 1:  # just below the budget: first into a store
                others = scores[~answer].sort(descending=True).values
                below = others[min(self.config.keep, others.numel()) - 1] * 0.999
                return torch.where(answer, below, scores)
            return torch.where(answer, scores.max() * 2, scores)

    return Flip


@pytest.fixture(scope="module")
def llm():
    from vllm_kvevict.policies.base import REGISTRY, register_policy

    register_policy(_flip_policy())
    engine = make_llm({"kv_eviction": {"policy": "hybridkv", "budget": 0.25}})
    yield engine
    shutdown(engine)
    REGISTRY.classes.pop(FLIP)


@pytest.fixture(scope="module")
def reference():
    return HFReference()


def _prompt_ids(llm) -> tuple[list[int], list[int]]:
    """A pass-key prompt of whole blocks (filler after the first token), so that the first
    generated token opens a new block while the 25 % budget stays the same number of blocks:
    the first decode decision is over budget with or without a store; and the positions of
    the blocks holding the key."""
    tok = llm.get_tokenizer()
    ids = tok(passkey_prompt(KEY, repeats=12, depth=0.5)).input_ids
    pad = (-len(ids)) % BLOCK_SIZE
    if (len(ids) + pad) // BLOCK_SIZE % 4 == 0:  # else 25 % of one more token is one more block
        pad += BLOCK_SIZE
    filler = tok(" The grass is green." * 20, add_special_tokens=False).input_ids[:pad]
    ids = ids[:1] + filler + ids[1:]
    key = tok(f" {KEY}", add_special_tokens=False).input_ids
    starts = [i for i in range(len(ids)) if ids[i:i + len(key)] == key]
    return ids, sorted({p // BLOCK_SIZE for s in starts for p in range(s, s + len(key))})


@pytest.mark.parametrize("store", [1.0, 0.0])
def test_a_block_that_loses_one_step_and_wins_the_next_comes_back(llm, reference, store):
    """With the store (default) the answer's blocks are parked at the first decode decision
    and restored at the next: the log shows them out of attention for one step only, and the
    output equals a reference that masks exactly that. Without it (``store: 0``, release
    semantics) they are released and never attended again."""
    from vllm.inputs import TokensPrompt

    llm.reset_prefix_cache()
    ids, answer = _prompt_ids(llm)
    assert answer and len(ids) % BLOCK_SIZE == 0 and len(ids) // BLOCK_SIZE % 4
    from vllm_kvevict.config import EvictionConfig

    keep = EvictionConfig(policy="hybridkv", budget=0.25, floor_tokens=0).keep_blocks(len(ids) + 1, BLOCK_SIZE)
    kv = {"policy": FLIP, "budget": 0.25,
          "options": {"answer": answer, "store": store, "keep": keep}}
    out = llm.generate([TokensPrompt(prompt_token_ids=ids)],
                       sampling(kv, max_tokens=12, logprobs=0), use_tqdm=False)[0]
    log = finished_log(llm, out.request_id)
    prompt_len = len(out.prompt_token_ids)
    out_of_attention = [c for c, excluded in log if set(answer) & excluded]
    report = eviction_report(out)
    if store:
        # out for exactly one decode step: excluded from one token on, back at the next
        assert out_of_attention, log
        back = [c for c, excluded in log if c > out_of_attention[0] and not set(answer) & excluded]
        assert back and back[0] == out_of_attention[0] + 1, log
        assert all(c >= prompt_len for c in out_of_attention)
        assert report["parked_tokens"] > 0 or report["evicted_tokens"] < report["total_tokens"]
    else:
        assert out_of_attention and not [c for c, excluded in log
                                         if c > out_of_attention[0] and not set(answer) & excluded]
    completion = out.outputs[0]
    ids = list(out.prompt_token_ids) + list(completion.token_ids)
    ref = reference.logprobs(ids, excluded_from_log(log))
    assert max(logprob_deltas(ref, prompt_len - 1, completion)) <= 5e-5
