"""Eviction metrics: counted in the scheduler, exported on vLLM's Prometheus endpoint.

The scheduler runs in the engine-core process, ``/metrics`` is served by the API-server
process, and vLLM's ``SchedulerStats`` has no field a plugin may extend (it is serialised by
its declared fields). So the scheduler publishes a small JSON snapshot of its cumulative
counters to a directory shared through the environment (``VLLM_KVEVICT_METRICS_DIR``, created
by the front end before it starts the engine core), and a Prometheus collector registered in
vLLM's registry reads the snapshots at scrape time. Cumulative counters make a lost or
late snapshot harmless: the next scrape sees the totals. A snapshot is written at most every
``VLLM_KVEVICT_METRICS_INTERVAL_S`` seconds (default 0.5; 0 writes at every step that changed
something): in a busy engine some request decides at nearly every step, and writing the JSON
costs a few hundred microseconds, as much as the step's eviction work. A change is never
left unwritten: a timer thread writes the last one when that interval has passed.
"""

from __future__ import annotations

import atexit
import bisect
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field

METRICS_DIR_ENV = "VLLM_KVEVICT_METRICS_DIR"
METRICS_INTERVAL_ENV = "VLLM_KVEVICT_METRICS_INTERVAL_S"
DEFAULT_INTERVAL_S = 0.5
PREFIX = "vllm_kvevict"
#: decision latency histogram buckets, seconds
LATENCY_BUCKETS = (0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


@dataclass
class PolicyCounters:
    """Cumulative counts for one policy."""

    evicted_blocks: int = 0  # blocks that left attention (parked or released while kept)
    parked_blocks: int = 0
    restored_blocks: int = 0
    released_blocks: int = 0  # blocks returned to the pool (from attention or the bin)
    pool_pressure_released_blocks: int = 0
    bytes_freed: int = 0
    decisions: int = 0
    decision_seconds_sum: float = 0.0
    decision_seconds_buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    requests_with_eviction: int = 0
    scoring_skipped: int = 0  # scoring tasks whose statistics were not measured
    visual_evicted_tokens: int = 0  # tokens of released blocks that are image tokens
    text_evicted_tokens: int = 0  # the other tokens of released blocks

    def merge(self, snapshot: dict) -> None:
        """Add another engine's snapshot of the same counters."""
        for key, value in snapshot.items():
            if key == "decision_seconds_buckets":
                value = [a + b for a, b in zip(self.decision_seconds_buckets, value)]
            else:
                value += getattr(self, key)
            setattr(self, key, value)

    def observe_decision(self, seconds: float, count: int = 1) -> None:
        """``count`` decisions of ``seconds`` each (a step's batch shares its time)."""
        self.decisions += count
        self.decision_seconds_sum += seconds * count
        for i in range(bisect.bisect_left(LATENCY_BUCKETS, seconds), len(LATENCY_BUCKETS)):
            self.decision_seconds_buckets[i] += count


@dataclass
class EvictionMetrics:
    """What one scheduler counts, per policy, plus engine-wide numbers."""

    block_bytes: int = 0  # bytes of one KV block over all layers (for bytes_freed)
    policies: dict[str, PolicyCounters] = field(default_factory=dict)
    preemptions_avoided: int = 0
    parked_blocks_now: int = 0
    dirty: bool = False
    #: seconds between two snapshot writes at most (``VLLM_KVEVICT_METRICS_INTERVAL_S``)
    interval_s: float = field(default_factory=lambda: float(
        os.environ.get(METRICS_INTERVAL_ENV, DEFAULT_INTERVAL_S)))
    _last_write: float = field(default=float("-inf"), repr=False, compare=False)
    _timer: threading.Timer | None = field(default=None, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def policy(self, name: str) -> PolicyCounters:
        """The policy's counters (the caller is about to change them: marks the snapshot)."""
        self.dirty = True
        counters = self.policies.get(name)
        if counters is None:
            counters = self.policies[name] = PolicyCounters()
        return counters

    def total(self, counter: str) -> float:
        return sum(getattr(c, counter) for c in self.policies.values())

    @property
    def totals(self) -> EngineTotals:
        return EngineTotals(self)

    def snapshot(self) -> dict:
        return {
            # a list first: the timer thread may read while the scheduler adds a policy
            "policies": {name: asdict(c) for name, c in list(self.policies.items())},
            "preemptions_avoided": self.preemptions_avoided,
            "parked_blocks_now": self.parked_blocks_now,
        }

    def publish(self) -> None:
        """Write the snapshot if anything changed (atomic rename; a reader never sees half),
        at most every ``interval_s``; a change within it is written by a timer thread when
        the interval has passed. Called every scheduler step: costs one attribute test when
        nothing changed."""
        if not self.dirty:
            return
        directory = os.environ.get(METRICS_DIR_ENV)
        if not directory or not os.path.isdir(directory):
            return
        wait = self._last_write + self.interval_s - time.monotonic()
        if wait > 0:
            with self._lock:
                if self._timer is None:
                    self._timer = threading.Timer(wait, self._write_later, (directory,))
                    self._timer.daemon = True
                    self._timer.start()
            return
        self._write(directory)

    def _write_later(self, directory: str) -> None:
        with self._lock:
            self._timer = None
        try:
            self._write(directory)
        except OSError:  # the front end removed the directory (shutting down): nothing to do
            pass

    def _write(self, directory: str) -> None:
        with self._lock:
            self.dirty = False
            self._last_write = time.monotonic()
            path = os.path.join(directory, f"engine-{os.getpid()}.json")
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.snapshot(), f)
            os.replace(tmp, path)


class EngineTotals:
    """Engine-wide totals over all policies, read live from the metrics (tests, logs)."""

    _COUNTER = {
        "released": "released_blocks", "parked": "parked_blocks", "restored": "restored_blocks",
        "pool_pressure_released": "pool_pressure_released_blocks", "decisions": "decisions",
        "decision_seconds": "decision_seconds_sum", "scoring_skipped": "scoring_skipped",
    }

    def __init__(self, metrics: EvictionMetrics):
        self._metrics = metrics

    def __getattr__(self, name: str):
        if name == "preemptions_avoided":
            return self._metrics.preemptions_avoided
        if name not in self._COUNTER:
            raise AttributeError(name)
        return self._metrics.total(self._COUNTER[name])


# -- front end --------------------------------------------------------------------------------
_COUNTERS = {
    "evicted_blocks": "KV blocks taken out of attention (parked or released)",
    "parked_blocks": "KV blocks parked in the recycle bin",
    "restored_blocks": "parked KV blocks restored into attention",
    "released_blocks": "KV blocks returned to the block pool",
    "pool_pressure_released_blocks": "KV blocks released by pool-pressure mode instead of preempting",
    "bytes_freed": "KV-cache bytes returned to the block pool",
    "decisions": "eviction decisions taken",
    "requests_with_eviction": "requests that had at least one block evicted",
    "scoring_skipped": "scoring tasks whose attention statistics were not measured (their "
                       "blocks keep their last scores); should stay 0",
}


def read_snapshots(directory: str) -> list[dict]:
    snapshots = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".json"):
            try:
                with open(os.path.join(directory, name)) as f:
                    snapshots.append(json.load(f))
            except (OSError, ValueError):
                continue  # being replaced right now; the next scrape reads it
    return snapshots


class EvictionCollector:
    """Prometheus collector: sums the engines' snapshots at scrape time."""

    def __init__(self, directory: str):
        self.directory = directory

    def collect(self):
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        snapshots = read_snapshots(self.directory) if os.path.isdir(self.directory) else []
        per_policy: dict[str, PolicyCounters] = {}
        for snap in snapshots:
            for name, counters in snap["policies"].items():
                per_policy.setdefault(name, PolicyCounters()).merge(counters)
        for counter, doc in _COUNTERS.items():
            family = CounterMetricFamily(f"{PREFIX}_{counter}", doc, labels=["policy"])
            for policy, values in sorted(per_policy.items()):
                family.add_metric([policy], getattr(values, counter))
            yield family
        tokens = CounterMetricFamily(
            f"{PREFIX}_evicted_tokens", "tokens of KV blocks returned to the block pool, by "
            "modality (visual = multimodal placeholder tokens; a mixed block counts each token "
            "by its own)", labels=["policy", "modality"])
        for policy, values in sorted(per_policy.items()):
            tokens.add_metric([policy, "visual"], values.visual_evicted_tokens)
            tokens.add_metric([policy, "text"], values.text_evicted_tokens)
        yield tokens
        hist = HistogramMetricFamily(
            f"{PREFIX}_decision_seconds", "time of one eviction decision (policy + bookkeeping)",
            labels=["policy"],
        )
        for policy, values in sorted(per_policy.items()):
            buckets = [(str(b), c) for b, c in zip(LATENCY_BUCKETS, values.decision_seconds_buckets)]
            buckets.append(("+Inf", values.decisions))
            hist.add_metric([policy], buckets, values.decision_seconds_sum)
        yield hist
        avoided = CounterMetricFamily(
            f"{PREFIX}_preemptions_avoided", "preemptions avoided by pool-pressure eviction"
        )
        avoided.add_metric([], sum(s["preemptions_avoided"] for s in snapshots))
        yield avoided
        parked = GaugeMetricFamily(f"{PREFIX}_parked_blocks_now", "KV blocks in the recycle bin now")
        parked.add_metric([], sum(s["parked_blocks_now"] for s in snapshots))
        yield parked


_registered = False


def register_collector() -> None:
    """In the front end: create the snapshot directory (inherited by the engine cores and API
    servers it spawns) and register the collector in vLLM's Prometheus registry. Idempotent."""
    global _registered
    if _registered:
        return
    _registered = True
    directory = os.environ.get(METRICS_DIR_ENV)
    if not directory:
        directory = tempfile.mkdtemp(prefix="vllm-kvevict-metrics-")
        os.environ[METRICS_DIR_ENV] = directory
        atexit.register(shutil.rmtree, directory, True)
    from vllm.v1.metrics.prometheus import get_prometheus_registry

    with_collector(get_prometheus_registry())


def with_collector(registry):
    """Add the collector to ``registry`` once, if this process belongs to an evicting server
    (the front end exported ``VLLM_KVEVICT_METRICS_DIR``). Returns ``registry``."""
    directory = os.environ.get(METRICS_DIR_ENV)
    if directory and not getattr(registry, "_kvevict_collector", False):
        registry.register(EvictionCollector(directory))
        registry._kvevict_collector = True
    return registry


def install_multiprocess_hook() -> None:
    """Registries of prometheus_client's multiprocess mode get the collector too.

    With one API server, ``/metrics`` serves prometheus_client's global registry, where
    ``register_collector`` put the collector. With several (``--api-server-count N``, also
    vLLM's default under ``--data-parallel-size N``) vLLM switches to multiprocess mode
    (``PROMETHEUS_MULTIPROC_DIR``), and then each API server's ``/metrics`` handler
    (prometheus_fastapi_instrumentator's) builds a fresh registry per scrape with
    ``multiprocess.MultiProcessCollector(registry)``, as does vLLM's ``get_prometheus_registry``.
    Replacing that class's module attribute with a subclass that also adds our collector
    reaches all of them; the API servers inherit the snapshot directory, so each serves the
    sum of all engine cores' snapshots. Idempotent; inert outside an evicting server.
    """
    from prometheus_client import multiprocess

    base = multiprocess.MultiProcessCollector
    if getattr(base, "_kvevict", False):
        return

    class MultiProcessCollector(base):
        _kvevict = True

        def __init__(self, registry, path=None):
            super().__init__(registry, path)
            if registry is not None:
                with_collector(registry)

    multiprocess.MultiProcessCollector = MultiProcessCollector
