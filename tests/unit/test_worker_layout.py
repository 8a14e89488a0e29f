"""vLLM's CPU backend may store keys transposed per block (AVX2 hosts): the worker detects the
layout from a key it has just written, and refuses to score when neither layout matches."""

from __future__ import annotations

import pytest
import torch

from vllm_kvevict.adapter.layer_hooks import KeyLayoutError
from vllm_kvevict.adapter.scoring_batch import ScoredRequest
from vllm_kvevict.adapter.worker import WorkerEviction

BS, HKV, D = 4, 2, 8


def _request(block_ids, tokens):
    return ScoredRequest(
        req_id="r", task=None, policy=None, q_start=0, q_end=1,
        block_ids=torch.tensor(block_ids), positions=torch.arange(len(block_ids)),
        parked=torch.zeros(len(block_ids), dtype=torch.bool), tokens_per_block=tokens,
        query_positions=torch.tensor([0]), layers={},
    )


def _cache(keys_by_block: dict[int, torch.Tensor], transposed: bool) -> torch.Tensor:
    """vLLM's CPU allocation [num_blocks, Hkv, bs, 2*D]: per (block, head) the key tile (stored
    as [D, bs] when ``transposed``) followed by the value tile."""
    cache = torch.zeros(6, HKV, BS, 2 * D)
    tiles = cache.view(6, HKV, 2 * BS, D)
    for bid, k in keys_by_block.items():  # k: [BS, HKV, D]
        per_head = k.transpose(0, 1)  # [HKV, BS, D]
        if transposed:
            per_head = per_head.transpose(1, 2).reshape(HKV, BS, D)  # memory holds [D, BS]
        tiles[bid, :, :BS] = per_head
        tiles[bid, :, BS:] = -per_head  # values: anything but the keys
    return cache


def _worker(sr: ScoredRequest) -> WorkerEviction:
    worker = WorkerEviction(runner=None)
    worker.scored = [sr]
    return worker


@pytest.mark.parametrize("transposed", [False, True])
def test_layout_detected_and_gather_exact(transposed):
    torch.manual_seed(0)
    keys = {3: torch.randn(BS, HKV, D), 5: torch.randn(BS, HKV, D)}
    cache = _cache(keys, transposed)
    sr = _request([3, 5], [BS, 3])
    worker = _worker(sr)
    newest = keys[5][2]  # the last real token of the last block: what the forward just wrote
    kv = worker._paged_kv(cache, newest[None], "cpu", D)
    assert worker.key_layout == ("cpu_t" if transposed else "cpu")
    dense, _ = kv.gather(sr.block_ids, sr.num_tokens)
    assert torch.equal(dense, torch.cat([keys[3], keys[5][:3]]))
    # reading with the other layout silently gives different keys: detection is what prevents it
    other = _worker(sr)
    other.key_layout = "cpu" if transposed else "cpu_t"
    assert not torch.equal(other._paged_kv(cache, newest[None], "cpu", D).gather(sr.block_ids, 7)[0], dense)


def test_unknown_layout_refuses_instead_of_scoring_garbage():
    cache = torch.randn(6, HKV, BS, 2 * D)
    worker = _worker(_request([1], [2]))
    with pytest.raises(KeyLayoutError, match="matches neither"):
        worker._paged_kv(cache, torch.randn(1, HKV, D), "cpu", D)
    assert worker.key_layout is None


def test_unsupported_cache_shape_is_refused():
    worker = _worker(_request([1], [2]))
    with pytest.raises(KeyLayoutError, match="unsupported KV cache shape"):
        worker._paged_kv(torch.zeros(6, HKV * BS * 2 * D), torch.randn(1, HKV, D), "cpu", D)
