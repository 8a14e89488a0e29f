"""StreamingLLM, SnapKV and H2O scores against brute-force definitions (loops, no helpers)."""

from __future__ import annotations

import pytest
import torch
from policy_stats import decode_probs, make_stats

from vllm_kvevict.policies import get_policy

#: tiny tensors: intra-op threads only add contention (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

GQA = [(2, 2), (6, 2)]


def _normalize(xs: list[float]) -> torch.Tensor:
    t = torch.tensor(xs, dtype=torch.float64)
    return t / t.sum()


def _pool(xs: list[float], k: int) -> list[float]:
    r = k // 2
    return [sum(xs[m] for m in range(j - r, j + r + 1) if 0 <= m < len(xs)) / k
            for j in range(len(xs))]


def _blocks(xs: list[float], bs: int) -> list[float]:
    return [sum(xs[b:b + bs]) for b in range(0, len(xs), bs)]


def _per_head_blocks(st, per_query_head, pool: int) -> list[list[list[float]]]:
    """[L][Hkv][nb] block sums of pooled, group-averaged token scores."""
    hq, hkv = per_query_head.shape[1], st.num_kv_heads
    g = hq // hkv
    out = []
    for li in range(per_query_head.shape[0]):
        layer = []
        for kv in range(hkv):
            pooled = [_pool(per_query_head[li, h].tolist(), pool) for h in range(kv * g, kv * g + g)]
            tok = [sum(p[j] for p in pooled) / g for j in range(st.num_tokens)]
            layer.append(_blocks(tok, st.block_size))
        out.append(layer)
    return out


def _mix(per_head: list[list[list[float]]], how: str) -> list[float]:
    rows = [_normalize(r) for layer in per_head for r in layer]
    stacked = torch.stack(rows)
    return (stacked.mean(0) if how == "mean" else stacked.amax(0)).tolist()


def test_streamingllm_keeps_sinks_and_most_recent():
    policy = get_policy("streamingllm", {"sink_blocks": 2})
    st, _ = make_stats(tokens=40, block_size=4, needs=set())
    st.block_index = torch.tensor([0, 1, 3, 4, 5, 6, 7, 8, 9, 10])  # block 2 already gone
    scores = policy.block_scores(st, {})
    assert scores.sum().item() == pytest.approx(1.0)
    none = torch.zeros(10, dtype=torch.bool)
    d = policy.select(scores, block_index=st.block_index, keep_blocks=5, protected=none, bin_blocks=1)
    assert d.keep.tolist() == [0, 1, 8, 9, 10]
    assert d.park.tolist() == [7]
    assert d.release.tolist() == [3, 4, 5, 6]


@pytest.mark.parametrize("hq,hkv", GQA)
@pytest.mark.parametrize("head_reduce", ["mean", "max"])
@pytest.mark.parametrize("protect", [True, False])
def test_snapkv_prefill_brute_force(hq, hkv, head_reduce, protect):
    w, k = 5, 3
    policy = get_policy("snapkv", {"window": w, "pool_kernel": k, "head_reduce": head_reduce,
                                   "protect_window": protect})
    st, _ = make_stats(hq=hq, hkv=hkv, tokens=21, block_size=4, window=w, needs=policy.needs)
    scores = policy.block_scores(st, {})
    summed = st.window_attn.sum(2)  # Σ over window queries
    block = _mix(_per_head_blocks(st, summed, k), head_reduce)
    if protect:  # tokens 16..20 are the window: blocks 4 and 5
        block[4] = block[5] = max(block)
    assert torch.allclose(scores.double(), _normalize(block), atol=1e-6)


def test_snapkv_decode_reuses_prefill_and_fills_new_blocks():
    policy = get_policy("snapkv", {"window": 4, "pool_kernel": 1})
    state = {}
    pre, _ = make_stats(tokens=16, block_size=4, window=4, needs=policy.needs)
    first = policy.block_scores(pre, state)
    # block 1 was released; blocks 4, 5 were generated since
    dec, raw = make_stats(tokens=20, block_size=4, window=4, phase="decode", seed=3,
                          needs=policy.needs, block_index=torch.tensor([0, 2, 3, 4, 5]))
    later = policy.block_scores(dec, state)
    known = first[[0, 2, 3]].double()
    top = known.max()
    assert torch.allclose(later.double(), _normalize([*known.tolist(), top, top]), atol=1e-6)
    # refresh: known blocks blend towards the decode score, new ones take it
    refresh = get_policy("snapkv", {"window": 4, "pool_kernel": 1, "decode_refresh": 0.25})
    state2 = {}
    refresh.block_scores(pre, state2)
    got = refresh.block_scores(dec, state2).double()
    # decode: block sums of the newest query's group-mean attention, per KV head, layers
    # averaged (what the attention pass measures: no per-layer rows, no pooling)
    probs = torch.stack([decode_probs(raw, li) for li in range(2)])
    per_layer = _per_head_blocks(dec, probs, 1)
    averaged = [[sum(col) / 2 for col in zip(*(layer[kv] for layer in per_layer))]
                for kv in range(dec.num_kv_heads)]
    fresh = _normalize(_mix([averaged], refresh.config.head_reduce))
    base = _normalize(known.tolist())
    expect = torch.cat([0.75 * base + 0.25 * fresh[:3], fresh[3:]])
    assert torch.allclose(got, expect / expect.sum(), atol=1e-6)


@pytest.mark.parametrize("hq,hkv", GQA)
@pytest.mark.parametrize("head_reduce", ["mean", "max"])
def test_h2o_accumulates_prefill_and_decode(hq, hkv, head_reduce):
    policy = get_policy("h2o", {"window": 5, "head_reduce": head_reduce})
    state = {}
    steps = [make_stats(hq=hq, hkv=hkv, tokens=17, window=5, needs=policy.needs)]
    for i, t in enumerate((18, 19)):
        steps.append(make_stats(hq=hq, hkv=hkv, tokens=t, window=5, phase="decode",
                                seed=10 + i, needs=policy.needs))
    for st, _ in steps:
        scores = policy.block_scores(st, state)
    # brute force: Σ over steps of group-mean attention received, per (KV head, block), the
    # layers averaged
    nb, g = 5, hq // hkv
    acc = [[0.0] * nb for _ in range(hkv)]
    for st, raw in steps:
        if st.phase == "prefill":
            recv = st.window_attn.sum(2)
        else:
            recv = torch.stack([decode_probs(raw, li) for li in range(2)])
        for li in range(2):
            for kv in range(hkv):
                for j in range(st.num_tokens):
                    acc[kv][j // 4] += sum(recv[li, h, j].item() for h in range(kv * g, kv * g + g)) / g / 2
    assert torch.allclose(scores.double(), _normalize(_mix([acc], head_reduce)), atol=1e-6)


def test_h2o_state_survives_released_blocks():
    policy = get_policy("h2o", {"window": 4})
    state = {}
    policy.block_scores(make_stats(tokens=16, window=4, needs=policy.needs)[0], state)
    before = state["h2o"].clone()
    dec, _ = make_stats(tokens=12, window=4, phase="decode", seed=5, needs=policy.needs,
                        block_index=torch.tensor([0, 2, 3]))
    policy.block_scores(dec, state)
    assert torch.equal(state["h2o"][..., 1], before[..., 1])  # released block untouched
    assert (state["h2o"][..., [0, 2, 3]] > before[..., [0, 2, 3]]).all()
