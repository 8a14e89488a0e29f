"""Policies compute on the device of their input statistics.

On a GPU the worker hands ``block_scores`` statistics that live on the KV cache's device and
copies only the final scores to the host. A tensor a policy creates without ``device=`` lands on
the *default* device instead (the CPU), which on a GPU raises a device mismatch or silently
moves the work to the host. Without a GPU the same mistake is caught by making the default
device ``meta``: every policy is run once normally and once under ``torch.set_default_device
("meta")`` with the same CPU statistics and a fresh state. An allocation that ignores the input
device then lands on ``meta`` and either raises (meta mixed with cpu) or leaks a meta tensor into
the result or the state; the second run must succeed and match the first bit for bit.
"""

from __future__ import annotations

import contextlib
import traceback
from typing import Any

import hae_cases as hae_t
import hybridkv_cases as hkv_t
import pytest
import torch
from policy_stats import make_stats
from torch.overrides import TorchFunctionMode

from vllm_kvevict.policies import available_policies, get_policy
from vllm_kvevict.policies.base import RequestStatistics

#: tiny tensors: intra-op threads only add contention (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

POLICIES = [p for p in available_policies() if p != "none"]
STATEFUL = {"h2o", "hae", "hybridkv", "snapkv", "laprox"}  # keep tensors in ``state``
#: block_scores requires its statistic (the engine always measures decode attention)
MUST_MEASURE = {"attention"}

#: (policy, options): defaults for every policy, plus options that take other code paths
CASES = [(name, {}) for name in POLICIES] + [
    ("snapkv", {"decode_refresh": 0.5, "unscored": "mean", "head_reduce": "max"}),
    ("laprox", {"decode_refresh": 0.3, "block_reduce": "sum", "group_reduce": "max"}),
    ("h2o", {"head_reduce": "max"}),
    ("hae", {"layers": "all", "decay": 1.0}),
    ("hybridkv", {"budget": "uniform", "classify_by": "text_mass"}),
    ("hybridkv", {"classify_by": "concentration", "static_visual_keep": 0.0}),
    ("streamingllm", {"sink_blocks": 2}),
]


def _case_id(case) -> str:
    name, options = case
    return name + "".join(f"-{k}={v}" for k, v in options.items())


@contextlib.contextmanager
def default_device(device: str):
    before = torch.get_default_device()
    torch.set_default_device(device)
    try:
        yield
    finally:
        torch.set_default_device(before)


def test_default_device_is_restored():
    with default_device("meta"):
        assert torch.zeros(1).device.type == "meta"
    assert torch.zeros(1).device.type == "cpu"


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (NaN == NaN, -0.0 != 0.0): equality of these is bit-for-bit."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def _same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert b.device.type == "cpu", f"{what}: on {b.device}, not on the input's device (cpu)"
    assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{what}: {b.dtype}{list(b.shape)}"
    assert torch.equal(_bits(a), _bits(b)), f"{what}: values differ\n{a}\n{b}"


def _snapshot(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def _run(name: str, options: dict, steps: list[RequestStatistics]):
    policy = get_policy(name, options)
    state: dict[str, Any] = {}
    out = []
    for st in steps:
        scores = policy.block_scores(st, state)
        out.append((scores, _snapshot(state)))
    return out


def check_device_follows_input(name: str, options: dict, steps: list[RequestStatistics]) -> None:
    """Same steps, fresh state: once normally, once with ``meta`` as the default device."""
    for st in steps:  # the proof only means something if the inputs are on the cpu
        assert all(v.device.type == "cpu" for v in vars(st).values() if isinstance(v, torch.Tensor))
    expect = _run(name, options, steps)
    with default_device("meta"):
        got = _run(name, options, steps)
    for i, ((s0, state0), (s1, state1)) in enumerate(zip(expect, got)):
        _same(s0, s1, f"step {i} ({steps[i].phase}) scores")
        assert state0.keys() == state1.keys(), f"step {i}: state keys"
        for key in state0:
            assert isinstance(state1[key], torch.Tensor), f"step {i}: state[{key!r}]"
            _same(state0[key], state1[key], f"step {i} state[{key!r}]")


# -- scenarios -------------------------------------------------------------------------------
def text_steps(needs, unmeasured: bool = True) -> list[RequestStatistics]:
    """Prefill, then decode steps: a new block, released blocks + parked ones + new positions,
    and (``unmeasured``) a step on which nothing was measured."""
    common = dict(layers=2, hq=6, hkv=2, block_size=4, window=5, needs=needs)
    prefill, _ = make_stats(tokens=21, phase="prefill", seed=0, **common)
    grown, _ = make_stats(tokens=23, phase="decode", seed=1, **common)
    released, _ = make_stats(tokens=23, phase="decode", seed=2,
                             block_index=torch.tensor([0, 2, 3, 5, 6, 7]), **common)
    released.parked = torch.tensor([False, True, False, False, True, False])
    dropped, _ = make_stats(tokens=24, phase="decode", seed=3, **{**common, "needs": frozenset()},
                               block_index=torch.tensor([0, 2, 3, 5, 6, 7]))
    dropped.parked = released.parked.clone()
    return [prefill, grown, released] + ([dropped] if unmeasured else [])


def decode_only_steps(needs) -> list[RequestStatistics]:
    """A request whose prefill was never scored (it fitted the budget): decode steps only."""
    common = dict(layers=2, hq=6, hkv=2, block_size=4, needs=needs, phase="decode")
    first, _ = make_stats(tokens=24, seed=5, **common)
    first.parked = torch.tensor([False, False, True, False, False, False])
    second, _ = make_stats(tokens=26, seed=6, block_index=torch.tensor([0, 1, 3, 4, 5, 6, 7]),
                           **common)
    second.parked = torch.tensor([True, False, False, False, True, False, False])
    return [first, second]


def unmeasured_steps() -> list[RequestStatistics]:
    """Nothing measured at all (statistics unavailable): the positional fallbacks."""
    a, _ = make_stats(tokens=17, phase="decode", needs=frozenset())
    b, _ = make_stats(tokens=19, phase="decode", needs=frozenset(),
                      block_index=torch.tensor([0, 1, 2, 5, 6]))
    b.parked = torch.tensor([False, True, False, False, False])
    return [a, b]


def random_visual_steps(needs) -> list[RequestStatistics]:
    """A multimodal request from random q/k/v: visual tokens in the middle, text window."""
    visual = torch.zeros(26, dtype=torch.bool)
    visual[4:15] = True
    common = dict(layers=2, hq=4, hkv=2, block_size=4, window=5, needs=needs)
    prefill, _ = make_stats(tokens=21, phase="prefill", visual=visual[:21], **common)
    decode, _ = make_stats(tokens=26, phase="decode", visual=visual, seed=1, **common)
    decode.parked = torch.tensor([False, True, True, False, False, False, False])
    return [prefill, decode]


def hae_visual_steps(needs) -> list[RequestStatistics]:
    """HAE's crafted map (test_policies_hae): block 1 is pruned at prefill. Then decode steps,
    one with only the pruned block resident (the "nothing would be left" guard)."""
    t, bs = hae_t.T, hae_t.BS
    steps = [hae_t.stats_for(hae_t.crafted())]
    for seed in (1, 2):
        st, _ = make_stats(layers=2, hq=2, hkv=1, tokens=t, block_size=bs, phase="decode",
                           needs=needs, seed=seed)
        st.visual = hae_t.VISUAL
        st.parked = torch.tensor([False, False, True, False, False, False])
        steps.append(st)
    only_pruned, _ = make_stats(layers=2, hq=2, hkv=1, tokens=bs, block_size=bs, phase="decode",
                                needs=needs, block_index=torch.tensor([1]), seed=3)
    only_pruned.visual = hae_t.VISUAL[4:8]
    steps.append(only_pruned)
    return steps


def hybridkv_visual_steps(needs, rows) -> list[RequestStatistics]:
    """HybridKV's crafted heads (test_policies_hybridkv), then decode steps with retrieval,
    a new block and released/parked blocks."""
    t, bs = hkv_t.T, hkv_t.BS
    prefill = hkv_t.crafted_stats(rows)
    h = len(rows[0])
    common = dict(layers=len(rows), hq=h, hkv=h, block_size=bs, phase="decode", needs=needs)
    grown, _ = make_stats(tokens=t + 2, seed=1, **common)
    grown.visual = torch.cat([hkv_t.VISUAL, torch.zeros(2, dtype=torch.bool)])
    released, _ = make_stats(tokens=t + 2, seed=2, block_index=torch.tensor([0, 1, 3, 4, 5, 6, 7]),
                             **common)
    released.visual = grown.visual
    released.parked = torch.tensor([False, False, True, False, True, False, False])
    return [prefill, grown, released]


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_prefill_then_decode_follow_input_device(case):
    name, options = case
    steps = text_steps(get_policy(name, options).needs, unmeasured=name not in MUST_MEASURE)
    check_device_follows_input(name, options, steps)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_decode_without_prefill_follows_input_device(case):
    name, options = case
    check_device_follows_input(name, options, decode_only_steps(get_policy(name, options).needs))


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_unmeasured_follows_input_device(case):
    name, options = case
    if name in MUST_MEASURE:
        pytest.skip(f"{name} requires its statistic")
    check_device_follows_input(name, options, unmeasured_steps())


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("hae", "hybridkv")], ids=_case_id)
def test_visual_request_follows_input_device(case):
    name, options = case
    check_device_follows_input(name, options, random_visual_steps(get_policy(name, options).needs))


@pytest.mark.parametrize("options", [{}, {"layers": "all", "decay": 0.0}])
def test_hae_pruning_follows_input_device(options):
    options = {**hae_t.OPTS, **options}
    steps = hae_visual_steps(get_policy("hae", options).needs)
    expect = _run("hae", options, steps)
    assert expect[0][1]["pruned"].tolist() == [1]  # the scenario does prune
    assert expect[-2][0][1].item() == 0.0 and expect[-1][0].item() > 0  # guard: not all pruned
    check_device_follows_input("hae", options, steps)


@pytest.mark.parametrize("rows", ["mixed", "all_static"])
@pytest.mark.parametrize("options", [{}, {"budget": "uniform", "static_visual_keep": 0.0}])
def test_hybridkv_classification_follows_input_device(rows, options):
    s, d = hkv_t.static_row(), hkv_t.dynamic_row()
    rows = [[s, d], [d, s]] if rows == "mixed" else [[s, s], [s, s]]
    options = {"window": hkv_t.W, **options}
    steps = hybridkv_visual_steps(get_policy("hybridkv", options).needs, rows)
    check_device_follows_input("hybridkv", options, steps)


@pytest.mark.parametrize("name", POLICIES)
def test_second_call_reuses_state_on_input_device(name):
    """The state a first call left (on the input's device) serves the next call as is."""
    policy = get_policy(name)
    steps = text_steps(policy.needs)
    state: dict[str, Any] = {}
    policy.block_scores(steps[0], state)
    if name in STATEFUL:
        assert state, f"{name} keeps no state"
    expect = policy.block_scores(steps[1], _snapshot(state))
    with default_device("meta"):
        got = policy.block_scores(steps[1], _snapshot(state))
    _same(expect, got, "second call")


@pytest.mark.parametrize("name", POLICIES)
def test_select_follows_input_device(name):
    """``select`` runs on the scheduler's tensors; it must not create any on another device."""
    policy = get_policy(name, hae_t.OPTS if name == "hae" else {})
    steps = hae_visual_steps(policy.needs) if name == "hae" else text_steps(policy.needs)
    state: dict[str, Any] = {}
    scores = policy.block_scores(steps[0], state)
    if name == "hae":
        assert (scores == 0).any()  # exercises the release of zero-scored blocks
    nb = scores.numel()
    kw = dict(block_index=steps[0].block_index, keep_blocks=nb // 2,
              protected=torch.arange(nb) == 0, bin_blocks=2,
              visual_blocks=torch.arange(nb) % 2 == 1)
    expect = policy.select(scores, **kw)
    with default_device("meta"):
        got = policy.select(scores, **kw)
    for part in ("keep", "park", "release"):
        _same(getattr(expect, part), getattr(got, part), part)


# -- host reads ------------------------------------------------------------------------------
class HostReads(TorchFunctionMode):
    """Records the Python-level reads of tensor data that are host syncs on a GPU: bool/int/
    float conversions, item/tolist, nonzero and boolean-mask indexing (data-dependent sizes)."""

    READS = frozenset({
        torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
        torch.Tensor.__index__, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.nonzero,
        torch.nonzero, torch.Tensor.cpu, torch.Tensor.numpy, torch.masked_select,
        torch.Tensor.masked_select, torch.unique,
    })

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        index = args[1] if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) else None
        index = index if isinstance(index, tuple) else (index,)
        if func in self.READS or any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                     for i in index):
            frames = [f for f in traceback.extract_stack()[:-1] if "vllm_kvevict" in f.filename]
            if frames:
                self.reads.append(f"{func.__name__} {frames[-1].name}")
        return func(*args, **(kwargs or {}))


def test_host_reads_detector_sees_a_read():
    with HostReads() as mode:
        bool(torch.ones(3).sum() > 0)
    assert mode.reads == []  # only reads made by the package count
    from vllm_kvevict.policies.common import save_blocks
    with HostReads() as mode:
        save_blocks({}, "k", torch.arange(3), torch.ones(3))
    assert mode.reads == ["__int__ save_blocks"]


#: the policies that store at every decode scoring: the store is sized to the largest
#: resident position, a host read unless the worker passes it (``position_limit``)
STORES_AT_DECODE = {"h2o", "hae"}


def _read_cases():
    for name in POLICIES:
        yield pytest.param(name, {}, "text", id=name)
    yield pytest.param("hae", hae_t.OPTS, "visual", id="hae-pruned")
    yield pytest.param("hybridkv", {"window": hkv_t.W}, "visual", id="hybridkv-visual")


@pytest.mark.parametrize("name,options,kind", list(_read_cases()))
def test_decode_scoring_reads_back_nothing_but_the_store_size(name, options, kind):
    policy = get_policy(name, options)
    if kind == "text":
        steps = text_steps(policy.needs, unmeasured=name not in MUST_MEASURE)
    elif name == "hae":
        steps = hae_visual_steps(policy.needs)
    else:
        s, d = hkv_t.static_row(), hkv_t.dynamic_row()
        steps = hybridkv_visual_steps(policy.needs, [[s, d], [d, s]])
    state: dict[str, Any] = {}
    policy.block_scores(steps[0], state)  # prefill: once per request, may read back
    for st in steps[1:]:
        # the worker knows the largest resident position on the host and says so
        st.position_limit = int(st.block_index.max()) + 1
        with HostReads() as mode:
            policy.block_scores(st, state)
        assert mode.reads == [], f"{name} at decode reads back {mode.reads}"
        if name in STORES_AT_DECODE and st.decode_mass is not None:  # the control: without
            st.position_limit = None  # the host limit, the store's size is read back
            with HostReads() as mode:
                policy.block_scores(st, dict(state))
            assert mode.reads == ["__int__ save_blocks"], "the detector missed the store's read"
