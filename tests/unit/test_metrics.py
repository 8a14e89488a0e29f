"""Eviction metrics: scheduler snapshots summed by the collector into Prometheus text."""

from __future__ import annotations

import time

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


def test_snapshots_are_rate_limited_and_the_last_change_is_written_later(tmp_path, monkeypatch):
    """With an interval, a change right after a write is not written at once (a busy engine
    would write at every step) but by the timer thread once the interval has passed."""
    monkeypatch.setenv(METRICS_DIR_ENV, str(tmp_path))
    metrics = EvictionMetrics(interval_s=0.3)
    metrics.policy("hae").decisions += 1
    metrics.publish()
    assert _scrape(tmp_path)[("vllm_kvevict_decisions_total", (("policy", "hae"),))] == 1
    metrics.policy("hae").decisions += 1
    metrics.publish()  # within the interval: left to the timer
    metrics.publish()  # one timer, however many steps
    assert _scrape(tmp_path)[("vllm_kvevict_decisions_total", (("policy", "hae"),))] == 1
    key, deadline = ("vllm_kvevict_decisions_total", (("policy", "hae"),)), time.monotonic() + 10
    while _scrape(tmp_path)[key] != 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _scrape(tmp_path)[key] == 2 and not metrics.dirty


def test_a_late_write_into_a_removed_directory_is_dropped_quietly(tmp_path, monkeypatch):
    """At shutdown the front end removes the snapshot directory; a pending timer write must
    not raise in its thread."""
    import shutil
    import threading

    directory = tmp_path / "snapshots"
    directory.mkdir()
    monkeypatch.setenv(METRICS_DIR_ENV, str(directory))
    errors = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    metrics = EvictionMetrics(interval_s=0.2)
    metrics.policy("hae").decisions += 1
    metrics.publish()
    metrics.policy("hae").decisions += 1
    metrics.publish()  # pending in the timer
    timer = metrics._timer
    shutil.rmtree(directory)
    timer.join(5)
    assert not timer.is_alive() and errors == []


def test_multiprocess_registries_of_api_servers_carry_the_collector(tmp_path, monkeypatch):
    """``--api-server-count N``: prometheus_client's multiprocess mode. Each API server's
    ``/metrics`` handler (prometheus_fastapi_instrumentator) builds a fresh registry per scrape
    with ``multiprocess.MultiProcessCollector``, as does vLLM's ``get_prometheus_registry``;
    every such registry must serve our counters."""
    import vllm.v1.metrics.prometheus as prom
    from prometheus_client import multiprocess
    from prometheus_fastapi_instrumentator import instrumentation

    from vllm_kvevict.metrics import install_multiprocess_hook

    install_multiprocess_hook()
    snapshots, multiproc = tmp_path / "snapshots", tmp_path / "prom"
    snapshots.mkdir()
    multiproc.mkdir()
    monkeypatch.setenv(METRICS_DIR_ENV, str(snapshots))
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(multiproc))
    metrics = EvictionMetrics(block_bytes=1)
    metrics.policy("laprox").released_blocks += 5
    metrics.publish()

    def handler_registry():  # what the instrumentator's /metrics handler does per scrape
        registry = instrumentation.CollectorRegistry()
        instrumentation.multiprocess.MultiProcessCollector(registry)
        return registry

    for build in (handler_registry, prom.get_prometheus_registry):
        first, second = build(), build()
        assert first is not second
        for registry in (first, second):
            text = generate_latest(registry).decode()
            assert 'vllm_kvevict_released_blocks_total{policy="laprox"} 5.0' in text
    # not a server with eviction: nothing added
    monkeypatch.delenv(METRICS_DIR_ENV)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    assert "vllm_kvevict" not in generate_latest(registry).decode()
