"""LaProx: token scores from raw q/k/v/W_O by brute force; the model-wide ranking lifted to blocks."""

from __future__ import annotations

import math

import pytest
import torch
from policy_stats import decode_probs, make_stats

from vllm_kvevict.policies import get_policy

#: tiny tensors: intra-op threads only add contention (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

GQA = [(2, 2), (6, 2)]


def brute_token_scores(raw, st, pool: int, group_reduce: str) -> list[list[list[float]]]:
    """s[l][kv][j]: ‖A_W[:, j]‖₂ (pooled) · ‖v_j W_O^h‖₂ merged over the group, layer-normalised.

    ‖v W_O^h‖ is computed by pushing v through o_proj with the other heads zeroed."""
    n_layers, hq, w, t = st.window_attn.shape
    hkv = st.num_kv_heads
    g, d, r = hq // hkv, raw["values"][0].shape[-1], pool // 2
    out = []
    for li in range(n_layers):
        a = st.window_attn[li]
        col = [[math.sqrt(sum(a[h, i, j].item() ** 2 for i in range(w))) for j in range(t)]
               for h in range(hq)]
        pooled = [[sum(col[h][m] for m in range(j - r, j + r + 1) if 0 <= m < t) / pool
                   for j in range(t)] for h in range(hq)]
        per_head = []
        for h in range(hq):
            row = []
            for j in range(t):
                x = torch.zeros(hq * d)
                x[h * d:(h + 1) * d] = raw["values"][li][j, h // g]
                row.append(pooled[h][j] * (raw["o_proj"][li] @ x).norm().item())
            per_head.append(row)
        merge = {"sum": sum, "mean": lambda xs: sum(xs) / len(xs), "max": max}[group_reduce]
        layer = [[merge([per_head[h][j] for h in range(kv * g, kv * g + g)]) for j in range(t)]
                 for kv in range(hkv)]
        total = sum(sum(row) for row in layer)
        out.append([[v / total for v in row] for row in layer])
    return out


@pytest.mark.parametrize("hq,hkv", GQA)
@pytest.mark.parametrize("group_reduce", ["sum", "mean", "max"])
@pytest.mark.parametrize("block_reduce", ["max", "sum"])
def test_laprox_block_scores_brute_force(hq, hkv, group_reduce, block_reduce):
    opts = {"window": 4, "pool_kernel": 3, "group_reduce": group_reduce,
            "block_reduce": block_reduce, "protect_window": False}
    policy = get_policy("laprox", opts)
    st, raw = make_stats(hq=hq, hkv=hkv, tokens=18, block_size=4, window=4, needs=policy.needs)
    scores = policy.block_scores(st, {})
    s = brute_token_scores(raw, st, 3, group_reduce)
    red = max if block_reduce == "max" else sum
    block = [red(s[li][kv][j] for li in range(2) for kv in range(hkv) for j in range(t0, min(t0 + 4, 18)))
             for t0 in range(0, 18, 4)]
    expect = torch.tensor(block, dtype=torch.float64)
    assert torch.allclose(scores.double(), expect / expect.sum(), atol=1e-6)


@pytest.mark.parametrize("keep", [1, 2, 4])
def test_laprox_selection_is_the_global_ranking(keep):
    """Keeping the top-K blocks by ``max`` equals walking the model-wide ranking of
    (layer, KV head, token) entries and keeping each block at its first hit."""
    policy = get_policy("laprox", {"window": 4, "pool_kernel": 1, "protect_window": False})
    st, raw = make_stats(hq=6, hkv=2, tokens=22, block_size=4, window=4, needs=policy.needs, seed=7)
    scores = policy.block_scores(st, {})
    s = brute_token_scores(raw, st, 1, "sum")
    entries = sorted(((s[li][kv][j], j // 4) for li in range(2) for kv in range(2) for j in range(22)),
                     reverse=True)
    walked = []
    for _, b in entries:
        if b not in walked:
            walked.append(b)
        if len(walked) == keep:
            break
    none = torch.zeros(st.num_blocks, dtype=torch.bool)
    d = policy.select(scores, block_index=st.block_index, keep_blocks=keep, protected=none,
                      bin_blocks=0)
    assert d.keep.tolist() == sorted(walked)


def test_laprox_window_protected_and_reused_at_decode():
    policy = get_policy("laprox", {"window": 6})
    state = {}
    st, _ = make_stats(tokens=20, block_size=4, window=6, needs=policy.needs)
    first = policy.block_scores(st, state)
    assert first[3] == first[4] == first.max()  # tokens 14..19 live in blocks 3 and 4
    dec, _ = make_stats(tokens=24, block_size=4, window=6, phase="decode", seed=2,
                        needs=policy.needs, block_index=torch.tensor([0, 1, 3, 4, 5, 6]))
    later = policy.block_scores(dec, state)
    expect = torch.cat([first[[0, 1, 3, 4]], first.max().repeat(2)])
    assert torch.allclose(later, expect / expect.sum())


@pytest.mark.parametrize("block_reduce", ["max", "sum"])
def test_laprox_decode_without_prefill_uses_decode_attention(block_reduce):
    """At decode the attention pass gives block masses only: the score is each block's share
    of the newest query's attention per KV head (layers and the group's heads summed), over
    all of them, then the best KV head (``max``) or their sum. No value factor at decode."""
    policy = get_policy("laprox", {"pool_kernel": 1, "block_reduce": block_reduce})
    st, raw = make_stats(tokens=12, block_size=4, phase="decode", needs=policy.needs)
    assert st.value_proj_norm is None  # a prefill statistic
    scores = policy.block_scores(st, {})
    probs = [decode_probs(raw, li) for li in range(2)]  # [Hq=6, T]
    mass = [[sum(probs[li][h, b: b + 4].sum().item() for li in range(2)
                 for h in range(kv * 3, kv * 3 + 3)) for b in range(0, 12, 4)] for kv in range(2)]
    total = sum(map(sum, mass))
    share = torch.tensor(mass) / total
    expect = share.amax(0) if block_reduce == "max" else share.sum(0)
    assert torch.allclose(scores, expect / expect.sum(), atol=1e-6)
