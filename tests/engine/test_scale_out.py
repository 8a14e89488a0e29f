"""Scale-out on vLLM's own machinery: ``--data-parallel-size 2`` (two engine cores, each with
its own evicting scheduler) behind two API servers (vLLM's default for DP 2, which puts
Prometheus in multiprocess mode). One server for the module; engine cores share the 2 CPUs.
"""

from __future__ import annotations

import concurrent.futures
import os

import pytest
from engine_helpers import Server, passkey_prompt

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    snapshots = tmp_path_factory.mktemp("kvevict-metrics")
    os.environ["VLLM_KVEVICT_METRICS_DIR"] = str(snapshots)  # inherited; read back below
    try:
        with Server(["smollm2", "--served-model-name", "smollm2", "--block-size", "32",
                     "--max-model-len", "2048", "--dtype", "float32", "--enforce-eager",
                     "--max-num-seqs", "8", "--data-parallel-size", "2",
                     "--kv-eviction", "attention", "--kv-eviction-budget", "0.25",
                     "--kv-eviction-interval", "4"], timeout=600) as srv:
            srv.snapshots = snapshots
            yield srv
    finally:
        os.environ.pop("VLLM_KVEVICT_METRICS_DIR", None)


def _ask(server, key: str) -> tuple[int, dict]:
    return server.post("/v1/completions", {"model": "smollm2", "prompt": passkey_prompt(key),
                                           "max_tokens": 8, "temperature": 0})


def test_two_engine_cores_evict_and_every_api_server_exports_their_sum(server):
    keys = [f"{k}{k}{k}{k}{k}" for k in range(1, 9)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda key: _ask(server, key), keys))
    for key, (status, body) in zip(keys, results):
        assert status == 200, body
        assert body["kv_transfer_params"]["kv_eviction"]["evicted_tokens"] > 0
        assert key in body["choices"][0]["text"]
    # both engine cores decided (each publishes its own snapshot)
    engines = sorted(p for p in os.listdir(server.snapshots) if p.endswith(".json"))
    assert len(engines) == 2, engines
    # scrapes land on either API server (SO_REUSEPORT): every one reports the same totals
    scrapes = [server.metrics("vllm_kvevict") for _ in range(8)]
    totals = {s["vllm_kvevict_released_blocks_total"] for s in scrapes}
    decisions = {s["vllm_kvevict_decisions_total"] for s in scrapes}
    assert len(totals) == 1 and totals.pop() > 0
    assert len(decisions) == 1 and decisions.pop() >= len(keys)
