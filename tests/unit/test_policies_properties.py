"""Properties every policy must hold (hypothesis), and option validation through ``get_policy``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from policy_stats import make_stats

from vllm_kvevict.policies import available_policies, get_policy, get_policy_class
from vllm_kvevict.policies.base import STATISTICS
from vllm_kvevict.policies.selection import Decision

#: tiny tensors: intra-op threads only add contention (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

POLICIES = [p for p in available_policies() if p != "none"]


def check_decision(d: Decision, block_index, keep_blocks, protected) -> None:
    parts = [d.keep.tolist(), d.park.tolist(), d.release.tolist()]
    everything = sorted(x for part in parts for x in part)
    assert everything == sorted(block_index.tolist()), "not a partition of the resident blocks"
    assert set(block_index[protected].tolist()) <= set(parts[0]), "a protected block was dropped"
    assert len(parts[0]) <= max(keep_blocks, int(protected.sum())), "over budget"


@st.composite
def scenario(draw):
    hq, hkv = draw(st.sampled_from([(2, 2), (6, 2), (3, 1)]))
    block_size = draw(st.sampled_from([1, 2, 4, 5]))
    tokens = draw(st.integers(1, 24))
    nb = -(-tokens // block_size)
    positions = sorted(draw(st.lists(st.integers(0, 2 * nb), min_size=nb, max_size=nb, unique=True)))
    visual = draw(st.one_of(st.none(), st.lists(st.booleans(), min_size=tokens + 3,
                                                max_size=tokens + 3)))
    return {
        "layers": draw(st.integers(1, 2)), "hq": hq, "hkv": hkv, "block_size": block_size,
        "tokens": tokens, "block_index": torch.tensor(positions),
        "window": draw(st.integers(1, 6)),
        "visual": None if visual is None else torch.tensor(visual),
        "decode_steps": draw(st.integers(0, 2)),
        "grow": draw(st.integers(0, 3)),
        "seed": draw(st.integers(0, 2**16)),
    }


@pytest.mark.parametrize("name", POLICIES)
@settings(max_examples=60, deadline=None)
@given(sc=scenario(), data=st.data())
def test_policy_scores_and_decisions(name, sc, data):
    policy = get_policy(name)
    common = dict(layers=sc["layers"], hq=sc["hq"], hkv=sc["hkv"], block_size=sc["block_size"],
                  window=sc["window"], needs=policy.needs)
    state: dict = {}
    steps = [("prefill", sc["tokens"], sc["block_index"])]
    tokens, index = sc["tokens"], sc["block_index"]
    for _ in range(sc["decode_steps"]):  # tokens appended: may open a new positional block
        tokens = min(tokens + sc["grow"], sc["tokens"] + 3)
        nb = -(-tokens // sc["block_size"])
        extra = nb - index.numel()
        index = torch.cat([index, index[-1] + 1 + torch.arange(extra)]) if extra else index
        steps.append(("decode", tokens, index))
    for i, (phase, t, idx) in enumerate(steps):
        visual = None if sc["visual"] is None else sc["visual"][:t]
        stats, _ = make_stats(tokens=t, phase=phase, visual=visual, block_index=idx,
                              seed=sc["seed"] + i, **common)
        scores = policy.block_scores(stats, state)
        assert scores.shape == (idx.numel(),)
        assert torch.isfinite(scores).all() and (scores >= 0).all()
        assert scores.sum().item() == pytest.approx(1.0, abs=1e-4)
    nb = index.numel()
    keep_blocks = data.draw(st.integers(0, nb + 1))
    protected = torch.tensor(data.draw(st.lists(st.booleans(), min_size=nb, max_size=nb)),
                             dtype=torch.bool)
    bin_blocks = data.draw(st.integers(0, nb))
    visual_blocks = data.draw(st.one_of(
        st.none(), st.lists(st.booleans(), min_size=nb, max_size=nb).map(torch.tensor)))
    d = policy.select(scores, block_index=index, keep_blocks=keep_blocks, protected=protected,
                      bin_blocks=bin_blocks, visual_blocks=visual_blocks)
    check_decision(d, index, keep_blocks, protected)
    assert len(d.park) <= bin_blocks


@pytest.mark.parametrize("name", POLICIES)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_select_on_arbitrary_scores(name, data):
    """Ties, zeros, everything protected, zero budget: the Decision is still valid."""
    nb = data.draw(st.integers(1, 12))
    scores = torch.tensor(data.draw(st.lists(st.sampled_from([0.0, 0.1, 0.5, 1.0]),
                                             min_size=nb, max_size=nb)))
    index = torch.tensor(sorted(data.draw(st.lists(st.integers(0, 40), min_size=nb,
                                                   max_size=nb, unique=True))))
    protected = torch.tensor(data.draw(st.lists(st.booleans(), min_size=nb, max_size=nb)),
                             dtype=torch.bool)
    keep_blocks = data.draw(st.integers(0, nb + 2))
    visual = data.draw(st.one_of(st.none(), st.lists(st.booleans(), min_size=nb,
                                                     max_size=nb).map(torch.tensor)))
    d = get_policy(name).select(scores, block_index=index, keep_blocks=keep_blocks,
                                protected=protected, bin_blocks=data.draw(st.integers(0, nb)),
                                visual_blocks=visual)
    check_decision(d, index, keep_blocks, protected)


@pytest.mark.parametrize("name", POLICIES)
def test_declared_needs_and_window(name):
    policy = get_policy(name)
    assert policy.needs <= STATISTICS
    window = getattr(policy.config, "window", None)
    if window is not None:
        assert policy.schedule.window == window
        assert get_policy(name, {"window": 7}).schedule.window == 7
        assert get_policy_class(name).schedule.window == window  # class default = default option


BAD_OPTIONS = [
    ("streamingllm", {"sink_blocks": -1}, "sink_blocks"),
    ("snapkv", {"pool_kernel": 4}, "pool_kernel"),
    ("snapkv", {"window": 0}, "window"),
    ("snapkv", {"head_reduce": "median"}, "head_reduce"),
    ("snapkv", {"decode_refresh": 1.5}, "decode_refresh"),
    ("h2o", {"head_reduce": "sum"}, "head_reduce"),
    ("h2o", {"window": -3}, "window"),
    ("laprox", {"block_reduce": "mean"}, "block_reduce"),
    ("laprox", {"group_reduce": "min"}, "group_reduce"),
    ("laprox", {"pool_kernel": 0}, "pool_kernel"),
    ("laprox", {"unscored": "zero"}, "unscored"),
    ("hae", {"global_threshold": -0.1}, "global_threshold"),
    ("hae", {"individual_threshold": 2}, "individual_threshold"),
    ("hae", {"layers": "last"}, "layers"),
    ("hae", {"decay": 1.2}, "decay"),
    ("hybridkv", {"classify_by": "entropy"}, "classify_by"),
    ("hybridkv", {"retrieval_fraction": 0.0}, "retrieval_fraction"),
    ("hybridkv", {"static_visual_keep": 1.5}, "static_visual_keep"),
    ("hybridkv", {"budget": "pyramid"}, "budget"),
    ("hybridkv", {"concentration_top": 0}, "concentration_top"),
    ("hybridkv", {"not_an_option": 1}, "not_an_option"),
]


@pytest.mark.parametrize("name,options,field", BAD_OPTIONS)
def test_bad_options_raise_value_error_naming_the_field(name, options, field):
    with pytest.raises(ValueError, match=rf"\({name}\)\.{field}:"):
        get_policy(name, options)
