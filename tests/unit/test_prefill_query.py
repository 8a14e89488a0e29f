"""What scores a prompt's middle chunks with prefill eviction (``prefill_query``), without an
engine: the keyword overlap with the tail, the question probe's rotation and its bookkeeping in
the scheduler. The engine tests are in ``test_prefill_eviction.py``."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vllm_kvevict.adapter.keywords import block_keywords, with_keywords
from vllm_kvevict.adapter.probe import (
    PROBE_SUFFIX,
    QuestionProbes,
    rotation_composes,
    turn_queries,
)
from vllm_kvevict.config import parse_config


# -- keywords --------------------------------------------------------------------------------------
def _prompt(blocks: list[list[int]], tail: list[int]) -> list[int]:
    return [t for b in blocks for t in b] + tail


def test_the_block_that_holds_the_tails_rare_tokens_scores_and_the_next_one_follows():
    filler = [[1, 2, 3, 4] for _ in range(15)]
    blocks = filler[:6] + [[1, 77, 78, 2]] + filler[6:]  # block 6 names what the tail asks
    scores = block_keywords(_prompt(blocks, [1, 2, 77, 78]), 4, tail=4)
    assert scores.shape == (16,)
    assert int(scores.argmax()) == 6
    assert scores[7] == pytest.approx(0.5 * scores[6])  # the fact goes on past its name
    assert not scores[:6].any() and not scores[8:].any()  # common tokens (1, 2) weigh nothing


def test_a_tail_token_many_blocks_hold_is_not_a_keyword_and_none_means_no_signal():
    blocks = [[5, 6, 7, 8] for _ in range(16)]
    assert block_keywords(_prompt(blocks, [5, 6, 9, 9]), 4, tail=4) is None  # in every block
    assert block_keywords([1, 2, 3], 4, tail=2) is None  # no middle at all
    # a token in two of 16 blocks (an eighth) still counts, with a lower weight than one in one
    blocks[3], blocks[9], blocks[12] = [5, 40, 41, 8], [5, 40, 7, 8], [5, 6, 41, 8]
    scores = block_keywords(_prompt(blocks, [40, 41]), 4, tail=2)
    assert scores[3] > scores[9] > 0 and scores[3] > scores[12] > 0


def test_keywords_add_their_share_to_the_attention_share():
    positions = np.array([0, 2, 3, 5])
    keywords = np.array([0, 0, 0, 3.0, 0, 0], dtype=np.float32)
    att = np.array([4.0, 3.0, 1.0, 2.0], dtype=np.float32)
    out = with_keywords(att, positions, keywords)
    np.testing.assert_allclose(out, [0.4, 0.3, 1.1, 0.2], rtol=1e-6)
    assert int(out.argmax()) == 2  # named by the tail: above the chunk's own favourite
    # positions past the keywords' end (generated, or the tail itself) get none
    np.testing.assert_allclose(with_keywords(att, np.array([6, 7, 8, 9]), keywords), att / 10)


# -- the question probe: RoPE turned by position ---------------------------------------------------
def _rope(**params):
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    with set_current_vllm_config(VllmConfig()):
        return get_rope(64, 4096, is_neox_style=True,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, **params},
                        dtype=torch.float32)


def test_turning_a_query_by_a_shift_places_it_at_the_shifted_position():
    rope = _rope()
    assert rotation_composes(rope, 64, 4, "cpu")
    raw = torch.randn(5, 4, 64)
    at = torch.arange(5)
    computed = rope.forward_native(at, raw.reshape(5, -1).clone())[0].view(5, 4, 64)
    direct = rope.forward_native(at + 1000, raw.reshape(5, -1).clone())[0].view(5, 4, 64)
    torch.testing.assert_close(turn_queries(rope, computed, 1000), direct, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(turn_queries(rope, computed, 999), direct, atol=1e-2)


def test_rotations_that_do_not_compose_are_refused():
    yarn = _rope(rope_type="yarn", factor=4.0, original_max_position_embeddings=1024)
    assert not rotation_composes(yarn, 64, 4, "cpu")  # its cache scales magnitudes too
    assert not rotation_composes(None, 64, 4, "cpu")
    mrope = SimpleNamespace(forward_native=_rope().forward_native, mrope_section=[16, 8, 8])
    assert not rotation_composes(mrope, 64, 4, "cpu")


# -- the question probe: the scheduler's bookkeeping ---------------------------------------------
def _request(req_id: str, n: int, mm: bool = False):
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    return Request(request_id=req_id, prompt_token_ids=list(range(n)),
                   sampling_params=SamplingParams(max_tokens=4), pooling_params=None,
                   mm_features=[object()] if mm else None)


def test_a_probe_is_the_first_block_and_the_tail_with_its_own_salt():
    probes = QuestionProbes(block_size=16)
    parent = _request("r1", 500)
    probe = probes.make(parent, window=32)
    assert probe.request_id == "r1" + PROBE_SUFFIX
    assert probe.prompt_token_ids == list(range(16)) + list(range(468, 500))
    assert probe.cache_salt and probe.cache_salt != parent.cache_salt
    assert probe.sampling_params.max_tokens == 1
    task = probes.task(SimpleNamespace(request_id=probe.request_id, num_computed_tokens=48), 48)
    assert (task.parent, task.window, task.shift) == ("r1", 32, 500 - 32 - 16)
    # no middle to score, or a multimodal prompt: no probe
    assert probes.make(_request("r2", 60), window=32) is None
    assert probes.make(_request("r3", 500, mm=True), window=32) is None


def test_a_probe_whose_tail_was_split_over_steps_has_no_task():
    probes = QuestionProbes(block_size=16)
    probe = probes.make(_request("r1", 500), window=32)
    assert probes.task(SimpleNamespace(request_id=probe.request_id, num_computed_tokens=20), 20) is None
    assert probes.task(SimpleNamespace(request_id=probe.request_id, num_computed_tokens=48), 8) is None


def test_probe_outputs_are_hidden_and_finished_probes_forgotten():
    probes = QuestionProbes(block_size=16)
    probe = probes.make(_request("r1", 500), window=32)
    out = lambda rid, done: SimpleNamespace(request_id=rid, finish_reason="length" if done else None)  # noqa: E731
    eco = SimpleNamespace(outputs=[out(probe.request_id, True), out("r9", False)],
                          finished_requests={probe.request_id, "r8"})
    probes.hide({0: eco})
    assert [o.request_id for o in eco.outputs] == ["r9"]
    assert eco.finished_requests == {"r8"}
    assert not probes.is_probe(probe.request_id) and probes.parent_gone("r1") is None


def test_a_parent_that_ends_before_its_probe_ran_hands_the_probe_back_for_abort():
    probes = QuestionProbes(block_size=16)
    probe = probes.make(_request("r1", 500), window=32)
    assert probes.parent_gone("r1") == probe.request_id
    probes.forget(probe.request_id)
    assert not probes.is_probe(probe.request_id)


# -- configuration ---------------------------------------------------------------------------------
def test_prefill_query_is_validated_naming_the_field_and_settable_per_request():
    with pytest.raises(ValueError, match="kv_eviction.prefill_query"):
        parse_config({"policy": "snapkv", "prefill_query": "question"})
    server = parse_config({"policy": "snapkv", "prefill_eviction": True})
    assert server.with_overrides({"prefill_query": "probe"}).prefill_query == "probe"


def test_the_prefill_query_flag_reaches_the_config():
    import argparse

    from vllm_kvevict.adapter.cli_args import add_flags, merge_into_additional_config

    parser = argparse.ArgumentParser()
    add_flags(parser)
    args = parser.parse_args(["--kv-eviction", "snapkv", "--kv-eviction-prefill",
                              "--kv-eviction-prefill-query", "keywords"])
    merge_into_additional_config(args)
    assert args.additional_config["kv_eviction"]["prefill_query"] == "keywords"
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-eviction-prefill-query", "nope"])
