"""HybridKV: head classification on crafted static/dynamic patterns, budget weights, text-prior
needs and Quest retrieval against brute force, and the release/park split."""

from __future__ import annotations

import math

import pytest
import torch
from hybridkv_cases import (  # noqa: F401
    BS,
    TEXT_CAND,
    VIS,
    VISUAL,
    T,
    W,
    crafted_stats,
    dynamic_row,
    local_row,
    static_row,
)
from policy_stats import decode_probs, make_stats

from vllm_kvevict.policies import get_policy

#: tiny tensors: intra-op threads only add contention (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

def classify(opts, st):
    policy = get_policy("hybridkv", {"window": W, **opts})
    state = {}
    scores = policy.block_scores(st, state)
    return state["static"].tolist(), scores, state


def test_text_mass_classification():
    st = crafted_stats([[static_row(), dynamic_row()], [dynamic_row(), static_row()]])
    assert classify({}, st)[0] == [[True, False], [False, True]]
    # counting the sink as text would call the image-looking head static
    assert classify({"sink_tokens": 0}, st)[0] == [[True, True], [True, True]]
    # attention to the observation window itself is locality, not text-centricity
    st_local = crafted_stats([[static_row(), local_row()]])
    assert classify({}, st_local)[0] == [[True, False]]
    # threshold is the knob: text share of the static head is 0.64 / 0.748 ≈ 0.86
    assert classify({"text_mass_threshold": 0.9}, st)[0] == [[False, False], [False, False]]


def test_text_only_uses_concentration():
    concentrated = torch.full((T,), 0.02)
    concentrated[9] = 0.5
    concentrated[0] += 1 - concentrated.sum()
    diffuse = torch.zeros(T)
    diffuse[4:20] = 1 / 16
    st = crafted_stats([[concentrated, diffuse]], visual=None)
    assert classify({}, st)[0] == [[True, False]]
    # forcing text_mass on a text-only request: everything is text, every head static
    assert classify({"classify_by": "text_mass"}, st)[0] == [[True, True]]
    # top-10% of 16 candidates = 2 tokens holding 0.52 / 0.8 = 0.65 of the mass
    assert classify({"concentration_threshold": 0.7}, st)[0] == [[False, False]]


@pytest.mark.parametrize("budget", ["entropy", "uniform"])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (6, 2)])
def test_budget_weights_brute_force(budget, hq, hkv):
    policy = get_policy("hybridkv", {"window": 5, "budget": budget, "budget_floor": 0.3})
    st, _ = make_stats(layers=3, hq=hq, hkv=hkv, tokens=21, window=5, needs=policy.needs)
    state = {}
    policy.block_scores(st, state)
    n_layers, g = 3, hq // hkv
    if budget == "uniform":
        expect = torch.full((n_layers, hkv), 1 / (n_layers * hkv))
    else:
        ent = torch.zeros(n_layers, hkv)
        for li in range(n_layers):
            for kv in range(hkv):
                a = st.window_attn[li, kv * g:(kv + 1) * g].mean((0, 1))  # text queries = all
                ent[li, kv] = -sum(p * math.log(p) for p in a.tolist() if p > 0) / math.log(21)
        layer = 0.7 * ent.mean(1) / ent.mean(1).sum() + 0.3 / n_layers
        head = 0.7 * ent / ent.sum(1, keepdim=True) + 0.3 / hkv
        expect = layer[:, None] * head
    assert torch.allclose(state["weights"], expect, atol=1e-6)
    assert state["weights"].sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("head_reduce", ["mean", "max"])
def test_prefill_scores_text_prior_brute_force(head_reduce):
    st = crafted_stats([[static_row(), dynamic_row()], [dynamic_row(), static_row()]])
    _, scores, state = classify({"static_visual_keep": 0.25, "budget": "uniform",
                                 "head_reduce": head_reduce, "protect_window": False}, st)
    # static heads keep text + the top 2 of 8 visual tokens (14, 15: distinct values)
    keep = ~VISUAL
    keep[[14, 15]] = True
    static_need = (static_row() * keep).reshape(-1, BS).sum(-1)
    dynamic_need = dynamic_row().reshape(-1, BS).sum(-1)
    static_need, dynamic_need = static_need / static_need.sum(), dynamic_need / dynamic_need.sum()
    # uniform weights: the mixture is the sum of the needs, max their elementwise max
    expect = (static_need + dynamic_need if head_reduce == "mean"
              else torch.maximum(static_need, dynamic_need))
    assert torch.allclose(scores, expect / expect.sum(), atol=1e-6)


def test_max_merge_lets_one_retrieving_head_outrank_many_local_ones():
    """Nine heads attend locally (blocks 3-5, decaying), one retrieves block 2: the mixture
    ranks block 2 below every local block, max ranks it first."""
    local = torch.tensor([0.0] * 12 + [0.15 / 4] * 4 + [0.3 / 4] * 4 + [0.55 / 4] * 4)
    retrieving = torch.tensor([0.0] * 8 + [0.25] * 4 + [0.0] * 12)
    rows = [[local] * 9 + [retrieving]]
    ranks = {}
    for how in ("mean", "max"):
        _, scores, _ = classify({"budget": "uniform", "head_reduce": how}, crafted_stats(rows, visual=None))
        ranks[how] = torch.argsort(scores, descending=True, stable=True).tolist().index(2)
    assert ranks == {"max": 0, "mean": 3}


def test_all_static_releases_unneeded_visual_blocks_dynamic_parks_them():
    policy = get_policy("hybridkv", {"window": W, "static_visual_keep": 0.0})
    protected = torch.tensor([True, False, False, False, False, True])
    st = crafted_stats([[static_row(), static_row()]])
    scores = policy.block_scores(st, {})
    assert scores[[2, 3]].tolist() == [0.0, 0.0] and (scores[[0, 1, 4, 5]] > 0).all()
    d = policy.select(scores, block_index=torch.arange(6), keep_blocks=6, protected=protected,
                      bin_blocks=4)
    assert d.keep.tolist() == [0, 1, 4, 5] and d.park.tolist() == [] and d.release.tolist() == [2, 3]
    st = crafted_stats([[static_row(), dynamic_row()]])
    scores = policy.block_scores(st, {})
    assert (scores > 0).all()  # the dynamic head may retrieve any block later
    d = policy.select(scores, block_index=torch.arange(6), keep_blocks=3, protected=protected,
                      bin_blocks=2)
    assert len(d.keep) == 3 and len(d.park) == 2 and len(d.release) == 1


@pytest.mark.parametrize("hq,hkv", [(2, 2), (6, 2)])
@pytest.mark.parametrize("head_reduce", ["mean", "max"])
def test_decode_retrieval_brute_force(hq, hkv, head_reduce):
    frac = 0.5
    policy = get_policy("hybridkv", {"window": 4, "retrieval_fraction": frac,
                                     "head_reduce": head_reduce})
    state = {}
    policy.block_scores(make_stats(hq=hq, hkv=hkv, tokens=20, window=4, needs=policy.needs)[0], state)
    state["static"] = torch.tensor([[True, False], [False, True]])
    stored = state["need"].clone()  # [L, Hkv, 5] prefill needs
    st, raw = make_stats(hq=hq, hkv=hkv, tokens=23, phase="decode", seed=4, needs=policy.needs)
    scores = policy.block_scores(st, state)
    nb, g = 6, hq // hkv
    k = math.ceil(frac * nb)
    probs = [decode_probs(raw, li) for li in range(2)]  # [Hq, T] per layer
    # a dynamic KV head ranks blocks by the most attention any of its query heads paid them in
    # any layer, keeps its top k and renormalises (the same retrieval in every layer)
    peak = [[max(probs[li][h, b * 4: b * 4 + 4].sum().item() for li in range(2)
                 for h in range(kv * g, kv * g + g)) for b in range(nb)] for kv in range(hkv)]
    need = torch.zeros(2, hkv, nb)
    for li in range(2):
        for kv in range(hkv):
            if state["static"][li, kv]:
                row = stored[li, kv].tolist()
                row.append(sum(row) / len(row))  # new block 5: mean need (all positive here)
                need[li, kv] = torch.tensor(row) / sum(row)
                continue
            top = sorted(range(nb), key=lambda b: -peak[kv][b])[:k]
            z = sum(peak[kv][b] for b in top)
            for b in top:
                need[li, kv, b] = peak[kv][b] / z
    weighted = state["weights"][..., None] * need
    expect = weighted.sum((0, 1)) if head_reduce == "mean" else weighted.amax((0, 1))
    expect = (expect / expect.sum()).clamp_min(1e-12)
    assert torch.allclose(scores, expect, atol=1e-6)


def test_decode_without_prefill_is_pure_retrieval():
    policy = get_policy("hybridkv", {"retrieval_fraction": 0.34})
    st, _ = make_stats(tokens=24, phase="decode", needs=policy.needs)
    state = {}
    scores = policy.block_scores(st, state)
    assert not state["static"].any()
    assert (scores > 0).all() and scores.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_budget_union_ranks_blocks_by_when_they_enter_some_heads_own_budget():
    """For every per-head budget scale ``k`` (head ``h`` keeps its ``floor(w_h·L·H·k)`` best
    blocks), the blocks scoring at least ``1/k`` are exactly the union of the heads' sets; a
    head that does not need a block never adds it."""
    from vllm_kvevict.policies.hybridkv import budget_union

    gen = torch.Generator().manual_seed(3)
    need = torch.rand(2, 3, 10, generator=gen)
    need[0, 1, 4] = 0.0
    weights = torch.rand(2, 3, generator=gen)
    weights /= weights.sum()
    scores = budget_union(need, weights)
    rank = need.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
    for k in (0.3, 0.5, 1, 1.5, 2, 3, 5):
        per_head = (rank + 1 <= weights[..., None] * 6 * k) & (need > 0)
        union = per_head.any(dim=(0, 1))
        assert torch.equal(scores >= 1 / k, union), k


def test_the_observation_windows_blocks_are_needed_most_by_every_head():
    """``protect_window`` (default): the question's blocks get every head's highest need at
    prefill, and keep it at later steps (stored with the needs)."""
    policy = get_policy("hybridkv", {"window": 5})
    st, _ = make_stats(layers=2, hq=2, hkv=1, tokens=21, window=5, needs=policy.needs)
    state = {}
    scores = policy.block_scores(st, state)
    win = torch.arange(scores.numel()) >= (21 - 5) // st.block_size
    assert bool((scores[win] == scores.max()).all())
