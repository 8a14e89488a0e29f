"""benchmarks/bench_natural.py helpers: the answer span, depths, per-request configs."""

from __future__ import annotations

import bench_natural  # noqa: E402
import pytest
import tasks  # noqa: E402


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_answer_span_holds_exactly_the_code(depth):
    s = tasks.make_sample("natural", 1536, depth, 0)
    a0, a1 = bench_natural.answer_span(s)
    assert tasks.tokenizer().decode(s.token_ids[a0:a1]).strip() == s.answer


def test_depths_spread_and_configs():
    d = bench_natural.depths(12)
    assert d[0] == 0.1 and d[-1] == 0.9 and len(set(d)) == 12
    variants = {"snapkv-max": ("snapkv", {"head_reduce": "max"})}
    old = bench_natural.kv_config("snapkv-max", 0.1, "old", {}, variants)
    assert old == {"policy": "snapkv", "budget": 0.1, "sink_tokens": 4, "recent_tokens": 64,
                   "options": {"head_reduce": "max"}}
    assert bench_natural.kv_config("h2o", 0.05, "new", {}, variants) == {"policy": "h2o", "budget": 0.05}
