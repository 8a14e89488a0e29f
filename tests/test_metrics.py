"""Eviction metrics: scheduler snapshots summed by the collector into Prometheus text."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from vllm_kvevict.metrics import METRICS_DIR_ENV, EvictionCollector, EvictionMetrics


def _scrape(directory) -> dict:
    registry = CollectorRegistry()
    registry.register(EvictionCollector(str(directory)))
    samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_snapshots_of_two_engines_are_summed_per_policy(tmp_path, monkeypatch):
    monkeypatch.setenv(METRICS_DIR_ENV, str(tmp_path))
    for pid, released in ((101, 3), (102, 4)):
        metrics = EvictionMetrics(block_bytes=1000)
        snap = metrics.policy("hae")
        snap.released_blocks += released
        snap.bytes_freed += released * 1000
        snap.observe_decision(0.002)
        metrics.policy("snapkv").observe_decision(0.5)
        monkeypatch.setattr("os.getpid", lambda pid=pid: pid)
        metrics.publish()
        assert not metrics.dirty
    samples = _scrape(tmp_path)
    hae = (("policy", "hae"),)
    assert samples[("vllm_kvevict_released_blocks_total", hae)] == 7
    assert samples[("vllm_kvevict_bytes_freed_total", hae)] == 7000
    assert samples[("vllm_kvevict_decisions_total", hae)] == 2
    # cumulative histogram buckets: 2 ms falls in le=0.003 and above, not in le=0.001
    assert samples[("vllm_kvevict_decision_seconds_bucket", (("le", "0.001"), ("policy", "hae")))] == 0
    assert samples[("vllm_kvevict_decision_seconds_bucket", (("le", "0.003"), ("policy", "hae")))] == 2
    assert samples[("vllm_kvevict_decision_seconds_bucket", (("le", "+Inf"), ("policy", "snapkv")))] == 2
    assert samples[("vllm_kvevict_released_blocks_total", (("policy", "snapkv"),))] == 0


def test_evicted_tokens_carry_a_modality_label(tmp_path, monkeypatch):
    monkeypatch.setenv(METRICS_DIR_ENV, str(tmp_path))
    metrics = EvictionMetrics(block_bytes=1)
    c = metrics.policy("hae")
    c.visual_evicted_tokens, c.text_evicted_tokens = 96, 32
    metrics.publish()
    samples = _scrape(tmp_path)
    name = "vllm_kvevict_evicted_tokens_total"
    assert samples[(name, (("modality", "visual"), ("policy", "hae")))] == 96
    assert samples[(name, (("modality", "text"), ("policy", "hae")))] == 32


def test_nothing_is_written_without_changes_or_a_directory(tmp_path, monkeypatch):
    monkeypatch.delenv(METRICS_DIR_ENV, raising=False)
    metrics = EvictionMetrics()
    metrics.policy("hae").decisions += 1
    metrics.publish()  # no directory: a no-op, not an error
    monkeypatch.setenv(METRICS_DIR_ENV, str(tmp_path))
    metrics.dirty = False
    metrics.publish()
    assert list(tmp_path.iterdir()) == []
    assert _scrape(tmp_path)[("vllm_kvevict_preemptions_avoided_total", ())] == 0
