"""The worker's per-layer statistics (through ``kernels.dispatch``; the torch path on CPU) equal
the dense statistics of ``vllm_kvevict.stats`` on the request's resident tokens."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from vllm_kvevict.kernels.paged import cpu_kv_view

from vllm_kvevict import stats as S
from vllm_kvevict.adapter.worker import ScoredRequest, WorkerEviction
from vllm_kvevict.policies.base import STATISTICS

HKV, D, WINDOW = 2, 16, 8
POSITIONS = [0, 1, 3, 4, 5]  # block 2 evicted: positions have a gap
PARKED = [False, False, True, False, False]
BLOCK_IDS = [7, 2, 9, 4, 11]


def _scored_layer(bs, group, phase, transposed, packed=False, seed=0):
    """A CPU cache holding one request's resident blocks, the step's query/key, and a worker."""
    gen = torch.Generator().manual_seed(seed)
    hq = HKV * group
    n_last = bs // 2 + 1 if phase == "decode" else bs - 1
    tokens_per_block = [bs] * (len(POSITIONS) - 1) + [n_last]
    raw = torch.full((12, HKV, bs, 2 * D), float("nan"))  # unread slots poison the result
    tiles = cpu_kv_view(raw)
    keys, values, positions = [], [], []
    for p, bid, n in zip(POSITIONS, BLOCK_IDS, tokens_per_block):
        for o in range(n):
            k, v = torch.randn(HKV, D, generator=gen), torch.randn(HKV, D, generator=gen)
            if transposed:
                tiles[bid, :, :bs].reshape(HKV, D, bs)[:, :, o] = k
            else:
                tiles[bid, :, o] = k
            tiles[bid, :, bs + o] = v
            keys.append(k)
            values.append(v)
            positions.append(p * bs + o)
    n_query = 1 if phase == "decode" else bs + n_last  # a prefill chunk spanning two blocks
    q_start, t = 2, len(keys)
    query = torch.randn(q_start + n_query + 1, hq, D, generator=gen)
    key = torch.randn(q_start + n_query + 1, HKV, D, generator=gen)
    key[q_start: q_start + n_query] = torch.stack(keys[t - n_query:])
    weight = torch.randn(24, hq * D, generator=gen)
    o_proj = SimpleNamespace(weight=weight)
    if packed:  # vLLM's CPU backend packs the weight for oneDNN and leaves an empty `weight`
        o_proj = SimpleNamespace(
            weight=torch.empty(0), input_size_per_partition=hq * D, params_dtype=torch.float32,
            quant_method=SimpleNamespace(apply=lambda layer, x: x @ weight.t()),
        )
    worker = WorkerEviction.__new__(WorkerEviction)
    worker.key_layout, worker.grams = None, {}
    worker.readers = {"model.layers.0.self_attn.attn": "cpu"}
    worker.runner = SimpleNamespace(get_model=lambda: SimpleNamespace(get_submodule=lambda _: o_proj))
    sr = ScoredRequest(
        req_id="r", task=SimpleNamespace(phase=phase),
        policy=SimpleNamespace(needs=STATISTICS, window=WINDOW),
        q_start=q_start, q_end=q_start + n_query, block_ids=torch.tensor(BLOCK_IDS),
        positions=torch.tensor(POSITIONS), parked=torch.tensor(PARKED),
        tokens_per_block=tokens_per_block, query_positions=torch.tensor(positions[t - n_query:]),
        layers={},
    )
    worker.scored = [sr]
    layer = SimpleNamespace(impl=SimpleNamespace(num_heads=hq, scale=D**-0.5))
    worker._measure_layer(0, "model.layers.0.self_attn.attn", layer, query.view(len(query), -1),
                          key.view(len(key), -1), raw)
    dense = SimpleNamespace(keys=torch.stack(keys), values=torch.stack(values),
                            positions=torch.tensor(positions), query=query, o_proj=weight)
    return sr, dense


@pytest.mark.parametrize("transposed", [False, True], ids=["cpu", "cpu_t"])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("bs", [4, 16])
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_worker_statistics_equal_dense_stats(phase, bs, group, transposed):
    sr, dense = _scored_layer(bs, group, phase, transposed)
    got = {k: v[0] for k, v in sr.layers.items()}
    scale = D**-0.5
    close = lambda a, b: torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)  # noqa: E731
    newest = dense.query[sr.q_end - 1]
    close(got["decode_attn"], S.decode_attention(newest, dense.keys, scale))
    close(got["query"], newest * scale)
    close(got["value_proj_norm"], S.value_proj_norm(dense.values, S.wo_gram(dense.o_proj, HKV * group)))
    kmin, kmax = S.key_bounds(dense.keys, bs)
    assert torch.equal(got["key_min"], kmin) and torch.equal(got["key_max"], kmax)
    if phase == "decode":
        assert "window_attn" not in got
        return
    w = min(WINDOW, sr.q_end - sr.q_start)  # a short last chunk is a short window
    q_window = dense.query[sr.q_end - w: sr.q_end]
    close(got["window_attn"], S.window_attention(q_window, dense.keys, scale))
    # causal by original position: query i sees exactly the keys at positions <= its own
    query_pos = sr.query_positions[-w:]
    visible = dense.positions[None, :] <= query_pos[:, None]  # [W, T]
    assert bool((got["window_attn"] > 0).eq(visible).all())


def test_value_norms_from_a_packed_o_proj_weight():
    """The CPU backend drops ``o_proj.weight`` after packing it: W_O is read back through the
    layer's own GEMM, giving the same norms as the plain weight."""
    plain, _ = _scored_layer(16, 3, "decode", False)
    packed, _ = _scored_layer(16, 3, "decode", False, packed=True)
    assert bool(plain.layers["value_proj_norm"][0].gt(0).all())
    assert torch.equal(packed.layers["value_proj_norm"][0], plain.layers["value_proj_norm"][0])
