"""HAE on crafted attention maps: both thresholds, head averaging, first layer, text-protected
blocks, the prefill release, visual-first recycle bin, decayed decode score, text-only."""

from __future__ import annotations

import pytest
import torch
from hae_cases import BS, HIGH, LOW, OPTS, VISUAL, T, W, crafted, stats_for  # noqa: F401
from policy_stats import decode_probs, make_stats

from vllm_kvevict.policies import get_policy
from vllm_kvevict.policies.base import RequestStatistics

#: tiny tensors: intra-op threads only add contention (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

def pruned_blocks(opts, window_attn, visual=VISUAL) -> list[int]:
    policy = get_policy("hae", {**OPTS, **opts})
    state = {}
    scores = policy.block_scores(stats_for(window_attn, visual), state)
    zero = (scores == 0).nonzero().squeeze(1).tolist()
    assert zero == state.get("pruned", torch.empty(0)).tolist()
    return zero


def test_low_visual_block_pruned_text_protects_mixed_block():
    # block 3 holds prunable visual tokens 12..14 but also text token 15: it stays
    assert pruned_blocks({}, crafted()) == [1]


def test_individual_threshold_saves_a_token_one_query_needs():
    # token 5: 0.06 from a single query (head mean), small globally (g = 0.06 < 0.094)
    row = [0.12, 0.0, 0.0, 0.0]
    assert pruned_blocks({}, crafted(token5=(row, [0.0] * 4))) == []
    # ... but with θ_i raised above 0.06 it is prunable again
    assert pruned_blocks({"individual_threshold": 0.07}, crafted(token5=(row, [0.0] * 4))) == [1]


def test_global_threshold_saves_a_token_all_queries_use_a_little():
    # token 5: 0.03 from every query: m = 0.03 < θ_i, but g = 0.12 > θ_g·Σg
    assert pruned_blocks({}, crafted(token5=([0.03] * 4, [0.03] * 4))) == []
    assert pruned_blocks({"global_threshold": 0.07}, crafted(token5=([0.03] * 4, [0.03] * 4))) == [1]


def test_heads_are_averaged_not_maxed():
    # head 0 gives 0.08 (> θ_i), head 1 gives 0: the head average 0.04 is below θ_i
    assert pruned_blocks({}, crafted(token5=([0.08, 0, 0, 0], [0.0] * 4))) == [1]


def test_first_layer_decides_unless_all_layers():
    attn = crafted(layer1_block1=0.2)  # layer 1 attends block 1 heavily
    assert pruned_blocks({"layers": "first"}, attn) == [1]
    assert pruned_blocks({"layers": "all"}, attn) == []


def test_only_text_queries_judge():
    visual = VISUAL.clone()
    visual[T - 1] = True  # the last window query is visual: its attention does not count
    assert pruned_blocks({}, crafted(token5=([0, 0, 0, 0.5], [0, 0, 0, 0.5])), visual) == [1]
    assert pruned_blocks({}, crafted(token5=([0.5, 0, 0, 0], [0.5, 0, 0, 0])), visual) == []
    visual[T - W:] = True  # no text query at all: nothing is pruned
    assert pruned_blocks({}, crafted(), visual) == []


@pytest.mark.parametrize("visual", [None, torch.zeros(T, dtype=torch.bool)])
def test_text_only_requests_score_by_attention_without_pruning(visual):
    policy = get_policy("hae", OPTS)
    state = {}
    scores = policy.block_scores(stats_for(crafted(), visual), state)
    assert "pruned" not in state and (scores > 0).all()
    expect = crafted().sum(2).mean((0, 1)).reshape(-1, BS).sum(-1)
    assert torch.allclose(scores, expect / expect.sum())


def test_prefill_decision_releases_pruned_blocks_within_budget():
    policy = get_policy("hae", OPTS)
    assert policy.schedule.select_after_prefill
    scores = policy.block_scores(stats_for(crafted()), {})
    protected = torch.tensor([True, False, False, False, False, True])
    d = policy.select(scores, block_index=torch.arange(6), keep_blocks=6, protected=protected,
                      bin_blocks=2)
    assert d.keep.tolist() == [0, 2, 3, 4, 5]
    assert d.park.tolist() == [] and d.release.tolist() == [1]


def test_decode_select_parks_and_releases_visual_before_text():
    policy = get_policy("hae", OPTS)
    scores = torch.tensor([0.1, 0.4, 0.3, 0.05, 0.1, 0.05])
    visual_blocks = torch.tensor([False, True, True, False, False, False])
    protected = torch.tensor([True, False, False, False, False, True])
    kw = dict(block_index=torch.arange(6), protected=protected, visual_blocks=visual_blocks)
    d = policy.select(scores, keep_blocks=4, bin_blocks=1, **kw)
    assert d.keep.tolist() == [0, 3, 4, 5]  # text kept although visual scored higher
    assert d.park.tolist() == [1] and d.release.tolist() == [2]  # best visual to the bin
    plain = get_policy("hae", {**OPTS, "visual_first": False})
    d = plain.select(scores, keep_blocks=4, bin_blocks=1, **kw)
    assert d.keep.tolist() == [0, 1, 2, 5] and d.park.tolist() == [4]


def test_mixed_blocks_leave_after_all_image_blocks_and_before_text():
    """A block holding a note and image tokens (shares between 0 and 1) ranks between the
    all-image blocks and the text-only ones: it outlives every all-image block, whatever their
    scores, and a text block outlives it."""
    policy = get_policy("hae", OPTS)
    scores = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.02, 0.1])
    share = torch.tensor([0.0, 1.0, 0.4, 1.0, 0.0, 0.0])  # blocks 1, 3 all-image, 2 mixed
    protected = torch.tensor([True, False, False, False, False, True])
    kw = dict(block_index=torch.arange(6), protected=protected, visual_blocks=share)
    d = policy.select(scores, keep_blocks=4, bin_blocks=1, **kw)
    assert d.keep.tolist() == [0, 2, 4, 5]  # the mixed block over both image blocks
    assert d.park.tolist() == [1] and d.release.tolist() == [3]
    d = policy.select(scores, keep_blocks=3, bin_blocks=1, **kw)
    assert d.keep.tolist() == [0, 4, 5] and d.park.tolist() == [2]  # text over mixed


@pytest.mark.parametrize("head_reduce", ["mean", "max"])
@pytest.mark.parametrize("decay", [0.0, 0.5, 1.0])
def test_decode_score_is_decayed_attention_and_pruned_stay_zero(decay, head_reduce):
    policy = get_policy("hae", {**OPTS, "decay": decay, "head_reduce": head_reduce})
    state = {}
    prefill = crafted()
    policy.block_scores(stats_for(prefill), state)
    steps = []
    for seed in (1, 2):
        st, raw = make_stats(layers=2, hq=2, hkv=1, tokens=T, block_size=BS, phase="decode",
                             needs=policy.needs, seed=seed)
        st.visual = VISUAL
        steps.append(torch.stack([decode_probs(raw, li) for li in range(2)]))  # [L, H, T]
        scores = policy.block_scores(st, state)
    def merge(a):  # [L, H, T] -> per-(layer, head) block sums -> merged over (layer, head)
        b = a.reshape(*a.shape[:2], -1, BS).sum(-1)
        return b.mean((0, 1)) if head_reduce == "mean" else b.amax((0, 1))

    blocks = [merge(a) for a in [prefill.sum(2), *steps]]
    expect = decay ** 2 * blocks[0] + decay * blocks[1] + blocks[2]
    expect[1] = 0.0
    expect = (expect / expect.sum()).clamp_min(1e-12)
    expect[1] = 0.0
    assert torch.allclose(scores, expect, atol=1e-7)


def test_one_retrieving_head_outranks_many_local_ones():
    """Measured on ordinary text (benchmarks/results/natural.md): most (layer, head) rows of the
    window attend to the sink and the window's neighbours; the mean merge let them outvote the
    few heads that retrieve the answer (1/12 retrieved at 10 %), the max merge does not (9/12)."""
    from vllm_kvevict.policies import get_policy

    layers, hq, w, bs, nb = 2, 4, 4, 4, 6
    t = nb * bs
    attn = torch.zeros(layers, hq, w, t)
    attn[..., 0] = 0.5  # the sink
    attn[..., 3 * bs + 1] = 0.5  # a neighbourhood the local heads attend to (block 3)
    attn[1, 2, :, 2 * bs + 1] = 0.9  # one head retrieves block 2
    attn[1, 2, :, 0] = attn[1, 2, :, 3 * bs + 1] = 0.05
    stats = RequestStatistics(block_size=bs, block_index=torch.arange(nb), num_tokens=t,
                         num_kv_heads=2, parked=torch.zeros(nb, dtype=torch.bool),
                         phase="prefill", window_attn=attn)
    scores = {how: get_policy("hae", {"head_reduce": how}).block_scores(stats, {})
              for how in ("mean", "max")}
    assert get_policy("hae", {}).config.head_reduce == "max"
    middle = slice(1, nb - 2)  # neither the sink block nor the window's
    assert int(scores["max"][middle].argmax()) + 1 == 2
    assert int(scores["mean"][middle].argmax()) + 1 != 2
