"""Hazard 4: the CPU backend may store keys transposed per block; reading must detect it."""

from __future__ import annotations

import pytest
import torch

from vllm_kvevict.adapter.worker import KeyLayoutError, ScoredRequest, WorkerEviction

BS, HKV, D = 4, 2, 8


def _request(block_ids, tokens):
    return ScoredRequest(
        req_id="r", task=None, policy=None, q_start=0, q_end=1,
        block_ids=torch.tensor(block_ids), positions=torch.arange(len(block_ids)),
        parked=torch.zeros(len(block_ids), dtype=torch.bool), tokens_per_block=tokens,
        query_positions=torch.tensor([0]), layers={},
    )


def _cache(keys_by_block: dict[int, torch.Tensor], transposed: bool) -> torch.Tensor:
    cache = torch.zeros(6, HKV, BS, D)
    for bid, k in keys_by_block.items():  # k: [BS, HKV, D]
        per_head = k.transpose(0, 1)  # [HKV, BS, D]
        if transposed:
            per_head = per_head.transpose(1, 2).reshape(HKV, BS, D)  # memory holds [D, BS]
        cache[bid] = per_head
    return cache


@pytest.mark.parametrize("transposed", [False, True])
def test_layout_detected_and_gather_exact(transposed):
    torch.manual_seed(0)
    keys = {3: torch.randn(BS, HKV, D), 5: torch.randn(BS, HKV, D)}
    cache = _cache(keys, transposed)
    sr = _request([3, 5], [BS, 3])
    worker = WorkerEviction.__new__(WorkerEviction)
    newest = keys[5][2]  # the last real token of the last block
    layout = worker._detect_layout(cache, sr, newest)
    assert layout == ("transposed" if transposed else "plain")
    dense = worker._gather(cache, sr, layout)
    assert torch.equal(dense, torch.cat([keys[3], keys[5][:3]]))
    # reading with the other layout silently gives different keys: detection is what prevents it
    other = "plain" if transposed else "transposed"
    assert not torch.equal(worker._gather(cache, sr, other), dense)


def test_unknown_layout_refuses_instead_of_scoring_garbage():
    cache = torch.randn(6, HKV, BS, D)
    sr = _request([1], [2])
    worker = WorkerEviction.__new__(WorkerEviction)
    with pytest.raises(KeyLayoutError):
        worker._detect_layout(cache, sr, torch.randn(HKV, D))
