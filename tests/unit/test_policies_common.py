"""The helpers in ``vllm_kvevict.policies.common`` and the policy registry."""

from __future__ import annotations

import pytest
import torch
from policy_stats import make_stats

from vllm_kvevict.policies.common import (
    accumulate_blocks,
    carry_scores,
    fill_unscored,
    head_mix,
    load_blocks,
    save_blocks,
    window_blocks,
)
from vllm_kvevict.policies.selection import select_blocks, select_tiered

#: tiny tensors: intra-op threads only add contention (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def test_window_blocks():
    # 10 tokens in blocks of 4: the last 3 tokens (7, 8, 9) live in blocks 1 and 2
    assert window_blocks(10, 3, 4, 3).tolist() == [False, True, True]
    assert window_blocks(10, 2, 4, 3).tolist() == [False, False, True]
    assert window_blocks(3, 8, 4, 1).tolist() == [True]


def test_head_mix_brute_force():
    x = torch.rand(2, 3, 5)
    for how in ("mean", "max"):
        out = head_mix(x, how)
        rows = [x[li, h] / x[li, h].sum() for li in range(2) for h in range(3)]
        expect = torch.stack(rows).mean(0) if how == "mean" else torch.stack(rows).amax(0)
        assert torch.allclose(out, expect)


def test_block_store_grows_and_reports_unknown():
    state = {}
    save_blocks(state, "k", torch.tensor([0, 2]), torch.tensor([[1.0, 2.0]]))
    save_blocks(state, "k", torch.tensor([5]), torch.tensor([[3.0]]))
    out = load_blocks(state, "k", torch.tensor([2, 5, 9, 1]))
    assert out[0, :2].tolist() == [2.0, 3.0]
    assert out[0, 2:].isnan().all()
    assert load_blocks(state, "missing", torch.tensor([0])) is None


def test_accumulate_blocks_decays_and_starts_new_blocks_at_zero():
    state = {}
    assert accumulate_blocks(state, "a", torch.tensor([0, 1]), None) is None
    first = accumulate_blocks(state, "a", torch.tensor([0, 1]), torch.tensor([1.0, 2.0]), decay=0.5)
    assert first.tolist() == [1.0, 2.0]
    # block 0 released, block 3 new: it starts from 0
    later = accumulate_blocks(state, "a", torch.tensor([1, 3]), torch.tensor([1.0, 4.0]), decay=0.5)
    assert later.tolist() == [2.0, 4.0]
    stored = accumulate_blocks(state, "a", torch.tensor([1, 2, 3]), None)  # no step: as stored
    assert stored[0] == 2.0 and stored[1].isnan() and stored[2] == 4.0


def test_fill_unscored():
    x = torch.tensor([1.0, float("nan"), 3.0])
    assert fill_unscored(x, "max").tolist() == [1.0, 3.0, 3.0]
    assert fill_unscored(x, "mean").tolist() == [1.0, 2.0, 3.0]


def test_carry_scores_prefill_then_decode():
    state = {}
    idx = torch.tensor([0, 1, 2])
    first = carry_scores(state, "s", idx, prefill=torch.tensor([1.0, 2.0, 1.0]), decode=None,
                         refresh=0.0, unscored="max")
    assert torch.allclose(first, torch.tensor([0.25, 0.5, 0.25]))
    # block 1 released, block 3 new: stored scores reused, new block gets the max
    later = carry_scores(state, "s", torch.tensor([0, 2, 3]), prefill=None,
                         decode=torch.tensor([9.0, 0.0, 1.0]), refresh=0.0, unscored="max")
    assert torch.allclose(later, torch.tensor([0.25, 0.25, 0.25]) / 0.75)
    # refresh: old blocks move towards the decode score, the new block takes it
    fresh = torch.tensor([0.0, 1.0, 1.0])
    blended = carry_scores(state, "s", torch.tensor([0, 2, 3]), prefill=None, decode=fresh,
                           refresh=0.5, unscored="max")
    assert torch.allclose(blended, torch.tensor([0.25, 0.5, 0.5]) / 1.25)
    # never scored at prefill: decode score alone, else recency
    assert torch.allclose(
        carry_scores({}, "s", idx, prefill=None, decode=torch.tensor([1.0, 0.0, 1.0]),
                     refresh=0.0, unscored="max"),
        torch.tensor([0.5, 0.0, 0.5]),
    )
    assert carry_scores({}, "s", idx, prefill=None, decode=None, refresh=0.0,
                        unscored="max").argmax() == 2


def test_select_tiered_releases_zero_and_orders_tiers():
    idx = torch.tensor([0, 1, 2, 3, 4, 5])
    scores = torch.tensor([0.3, 0.0, 0.2, 0.1, 0.4, 0.0])
    protected = torch.tensor([True, False, False, False, False, True])
    d = select_tiered(scores, block_index=idx, keep_blocks=5, protected=protected, bin_blocks=3)
    assert d.keep.tolist() == [0, 2, 3, 4, 5]  # zero-scored protected 5 kept, 1 released
    assert d.park.tolist() == [] and d.release.tolist() == [1]
    tier = torch.tensor([1, 1, 0, 1, 0, 1])  # blocks 2 and 4 are the lower tier
    d = select_tiered(scores, block_index=idx, keep_blocks=3, protected=protected,
                      bin_blocks=1, tier=tier)
    assert d.keep.tolist() == [0, 3, 5]  # 3 outranks the better-scored lower-tier 4
    assert d.park.tolist() == [4] and d.release.tolist() == [1, 2]
    # without zeros and tiers it is exactly select_blocks
    s = torch.rand(6) + 0.1
    a = select_tiered(s, block_index=idx, keep_blocks=2, protected=protected, bin_blocks=2)
    b = select_blocks(s, block_index=idx, keep_blocks=2, protected=protected, bin_blocks=2)
    assert all(torch.equal(x, y) for x, y in zip((a.keep, a.park, a.release),
                                                 (b.keep, b.park, b.release)))


def test_make_stats_shapes():
    st, _ = make_stats(tokens=10, block_size=4)
    assert st.window_attn.shape == (2, 6, 5, 10)
    assert st.decode_mass.shape == st.decode_peak.shape == (2, 3)
    # attended blocks of each KV head: Σ over layers and its 3 query heads of rows summing to 1
    assert torch.allclose(st.decode_mass.sum(1), torch.full((2,), 6.0))
    assert torch.allclose(st.decode_share.sum(1), torch.ones(2))
    st, _ = make_stats(tokens=10, block_size=4, needs={"value_proj_norm"}, phase="decode")
    assert st.window_attn is None and st.decode_mass is None and st.value_proj_norm is None


def test_every_policy_module_is_found_and_registers_its_method():
    """A policy is its file: every module of ``vllm_kvevict.policies`` but the shared ones
    registers at least one method, found without a list to keep."""
    import pkgutil

    import vllm_kvevict.policies as policies
    from vllm_kvevict.policies.base import REGISTRY

    modules = {m.name for m in pkgutil.iter_modules(policies.__path__)} - policies.SHARED_MODULES
    registered = {cls.__module__.rsplit(".", 1)[-1] for cls in REGISTRY.classes.values()}
    assert modules <= registered, modules - registered
    assert set(policies.available_policies()) >= {"none", "snapkv", "laprox", "hae", "hybridkv"}


def test_a_scorer_policy_writes_its_token_scores_and_the_base_does_the_rest():
    """A ``ScorerPolicy`` that only says "every token scores 1": the base turns that into block
    scores (a block's tokens summed, the partial last block less), merges heads, ranks the
    observation window's blocks first and normalises - and remembers the prefill ranking at
    decode (new blocks get the ``unscored`` fill)."""
    from typing import Literal

    from vllm_kvevict.policies.scorer import ScorerConfig, ScorerPolicy

    class Flat(ScorerPolicy):  # not registered: a test's own method
        name = "flat"

        class Config(ScorerConfig):
            head_reduce: Literal["mean", "max"] = "mean"

        def token_scores(self, stats):
            return torch.ones(stats.num_layers, stats.num_kv_heads, stats.num_tokens)

    st, _ = make_stats(tokens=22, block_size=4, window=3)  # 6 blocks, the last holds 2 tokens
    policy, state = Flat(Flat.Config(window=3, protect_window=False)), {}
    scores = policy.block_scores(st, state)
    expected = torch.tensor([4.0, 4, 4, 4, 4, 2])
    assert torch.allclose(scores, expected / expected.sum())
    protected = Flat(Flat.Config(window=3)).block_scores(st, {})  # tokens 19..21: blocks 4, 5
    expected[5] = 4.0
    assert torch.allclose(protected, expected / expected.sum())
    decode, _ = make_stats(tokens=26, block_size=4, phase="decode")
    later = policy.block_scores(decode, state)  # block 6 is new: the max of the stored ones
    stored = torch.tensor([4.0, 4, 4, 4, 4, 2, 4])
    assert torch.allclose(later, stored / stored.sum())


def test_the_readme_walks_through_snapkv_as_it_is():
    """README's *Writing a policy* shows ``policies/snapkv.py``'s class whole: the example
    cannot drift from the code."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    section = readme[readme.index("## Writing a policy"):]
    start = section.index("```python\n") + len("```python\n")
    example = section[start:section.index("\n```", start)]
    source = (root / "vllm_kvevict" / "policies" / "snapkv.py").read_text()
    assert source[source.index("@register_policy"):].rstrip() == example.rstrip()
