"""The OpenAI server with eviction on: per-request control, 400s, metrics, and a bounded soak.

One ``vllm serve smollm2 --kv-eviction attention`` process (loopback) for the module, started
through our CLI exactly as the README does. The soak's size comes from
``KVEVICT_SOAK_REQUESTS`` (default 96, the CI version; the README gives the long manual run);
with ``KVEVICT_SOAK_RESULT=path`` its figures are also written there as JSON. Prompt chunks
are 256 tokens, so the soak's longer prompts prefill in several chunks and the requests that
ask for prefill eviction evict between them.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time

import pytest
from engine_helpers import Server, passkey_prompt

pytestmark = pytest.mark.engine

SOAK_REQUESTS = int(os.environ.get("KVEVICT_SOAK_REQUESTS", "96"))
CONCURRENCY = 8


#: what clients of the test server may set (the operator's --kv-eviction-client-options)
CLIENT_OPTIONS = {"policy": {"choices": ["attention", "streamingllm", "snapkv"]},
                  "budget": {"min": 0.1}, "floor_tokens": {}, "prefill_eviction": {}}


@pytest.fixture(scope="module")
def server():
    with Server(["smollm2", "--served-model-name", "smollm2", "--block-size", "32",
                 "--max-model-len", "2048", "--dtype", "float32", "--enforce-eager",
                 "--max-num-seqs", "16", "--max-num-batched-tokens", "256",
                 "--kv-eviction", "attention",
                 "--kv-eviction-budget", "0.25", "--kv-eviction-interval", "4",
                 "--kv-eviction-client-options", json.dumps(CLIENT_OPTIONS)]) as srv:
        yield srv


def _completion(prompt: str, xargs: dict | None = None, max_tokens: int = 8) -> dict:
    body = {"model": "smollm2", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    if xargs is not None:
        body["vllm_xargs"] = xargs
    return body


def test_per_request_options_and_the_eviction_report(server):
    status, body = server.post("/v1/completions", _completion(passkey_prompt()))
    assert status == 200, body
    report = body["kv_transfer_params"]["kv_eviction"]
    assert report["policy"] == "attention" and report["evicted_tokens"] > 0
    assert "71432" in body["choices"][0]["text"]
    # the same prompt with the budget lifted for this request only: nothing evicted
    status, body = server.post("/v1/completions", _completion(passkey_prompt(), {"kv_eviction.budget": 1.0}))
    assert status == 200 and body["kv_transfer_params"]["kv_eviction"]["evicted_tokens"] == 0
    # the JSON-string form and another policy
    status, body = server.post("/v1/completions", _completion(
        passkey_prompt(), {"kv_eviction": json.dumps({"policy": "streamingllm", "budget": 0.25})}))
    assert status == 200 and body["kv_transfer_params"]["kv_eviction"]["policy"] == "streamingllm"


def _chat(question: str, xargs: dict | None = None) -> dict:
    body = {"model": "smollm2", "max_tokens": 12, "temperature": 0,
            "messages": [{"role": "user", "content": question}]}
    if xargs is not None:
        body["vllm_xargs"] = xargs
    return body


def test_a_short_chat_under_the_floor_is_answered_with_nothing_evicted(server):
    """The demo's chat at the server's 25 % budget: ≈ 40 tokens with the template, under the
    default floor (256 tokens), so nothing is scored or evicted and it answers; with the floor
    lifted for the request (the control) its first block, the system prompt and question, goes."""
    status, body = server.post("/v1/chat/completions", _chat("What is the capital of France?"))
    assert status == 200, body
    report = body["kv_transfer_params"]["kv_eviction"]
    assert report["evicted_tokens"] == 0 and report["evicted_blocks"] == 0, report
    assert "Paris" in body["choices"][0]["message"]["content"]
    status, body = server.post("/v1/chat/completions", _chat(
        "What is the capital of France?", {"kv_eviction.floor_tokens": 0}))
    assert status == 200, body
    assert body["kv_transfer_params"]["kv_eviction"]["evicted_tokens"] > 0


@pytest.mark.parametrize("xargs, field", [
    ({"kv_eviction.budget": 1.5}, "kv_eviction.budget"),
    ({"kv_eviction.policy": "lru"}, "kv_eviction.policy"),
    ({"kv_eviction": "{not json"}, "kv_eviction"),
    ({"kv_eviction.colour": "red"}, "kv_eviction.colour"),
])
def test_bad_request_options_get_a_400_naming_the_field(server, xargs, field):
    status, body = server.post("/v1/completions", _completion("The sky is", xargs))
    assert status == 400, body
    assert field in body["error"]["message"]
    status, _ = server.post("/v1/completions", _completion("The sky is"))
    assert status == 200  # the server keeps serving


@pytest.mark.parametrize("xargs, message", [
    ({"kv_eviction.recycle_bin_blocks": 4096}, "kv_eviction.recycle_bin_blocks: this server does "
     "not let clients set it"),
    ({"kv_eviction.policy": "hybridkv"}, "kv_eviction.policy: this server lets clients choose only"),
    ({"kv_eviction.budget": 0.05}, "kv_eviction.budget: this server allows clients >= 0.1"),
    ({"kv_eviction": json.dumps({"options": {"window": 8}})}, "kv_eviction.options: this server"),
])
def test_options_the_operator_did_not_allow_get_a_400(server, xargs, message):
    status, body = server.post("/v1/completions", _completion("The sky is", xargs))
    assert status == 400, body
    assert message in body["error"]["message"]
    # what the operator allows still works
    status, _ = server.post("/v1/completions", _completion("The sky is", {"kv_eviction.budget": 0.5}))
    assert status == 200


def test_metrics_endpoint_exports_eviction_counters(server):
    server.post("/v1/completions", _completion(passkey_prompt("55555")))
    m = server.metrics()
    assert m["vllm_kvevict_released_blocks_total"] > 0
    assert m["vllm_kvevict_evicted_blocks_total"] >= m["vllm_kvevict_released_blocks_total"]
    assert m["vllm_kvevict_bytes_freed_total"] > 0
    assert m["vllm_kvevict_decisions_total"] > 0
    assert m["vllm_kvevict_decision_seconds_count"] == m["vllm_kvevict_decisions_total"]


async def _soak(server, n: int) -> dict:
    from openai import AsyncOpenAI, BadRequestError

    client = AsyncOpenAI(base_url=f"{server.base}/v1", api_key="none", max_retries=0, timeout=600)
    rng = random.Random(0)
    gate = asyncio.Semaphore(CONCURRENCY)
    outcome = {"ok": 0, "bad_400": 0, "aborted": 0, "prefill_eviction": 0, "errors": []}

    async def one(i: int) -> None:
        kind = rng.choice(["plain", "plain", "stream", "abort", "bad", "chat"])
        repeats = rng.choice([1, 3, 6, 12, 18])
        prompt = passkey_prompt(str(10000 + i), repeats=repeats, depth=rng.random())
        budget = rng.choice([0.1, 0.25, 0.5, 1.0])
        xargs = {"kv_eviction.budget": budget}
        if rng.random() < 0.3:
            xargs["kv_eviction.prefill_eviction"] = True
        extra = {"vllm_xargs": xargs}
        async with gate:
            try:
                if kind == "bad":
                    try:
                        await client.completions.create(
                            model="smollm2", prompt=prompt, max_tokens=4,
                            extra_body={"vllm_xargs": {"kv_eviction.budget": -budget}})
                    except BadRequestError:
                        outcome["bad_400"] += 1
                    else:
                        outcome["errors"].append(f"{i}: bad options accepted")
                    return
                if kind == "chat":
                    r = await client.chat.completions.create(
                        model="smollm2", max_tokens=16, messages=[{"role": "user", "content": prompt}],
                        extra_body=extra)
                    assert r.choices[0].message.content is not None
                elif kind == "plain":
                    r = await client.completions.create(
                        model="smollm2", prompt=prompt, max_tokens=rng.choice([8, 32, 64]),
                        extra_body=extra)
                    assert r.choices[0].text is not None
                else:
                    stream = await client.completions.create(
                        model="smollm2", prompt=prompt, max_tokens=48, stream=True,
                        extra_body=extra)
                    chunks = 0
                    async for _ in stream:
                        chunks += 1
                        if kind == "abort" and chunks == 3:
                            await stream.close()  # client goes away mid-stream
                            outcome["aborted"] += 1
                            return
                    assert chunks > 0
                outcome["ok"] += 1
                outcome["prefill_eviction"] += "kv_eviction.prefill_eviction" in xargs
            except Exception as exc:  # noqa: BLE001 — every failure of a valid request is a finding
                outcome["errors"].append(f"{i} ({kind}): {type(exc).__name__}: {exc}")

    await asyncio.gather(*(one(i) for i in range(n)))
    await client.close()
    return outcome


def _wait_idle(server, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while True:
        m = server.metrics()
        if m.get("vllm:num_requests_running", 0) == 0 and m.get("vllm:num_requests_waiting", 0) == 0:
            return m
        if time.time() > deadline:
            raise AssertionError(f"requests still running: {m.get('vllm:num_requests_running')}")
        time.sleep(0.5)


def test_soak_mixed_traffic_leaves_no_blocks_behind(server):
    warm = asyncio.run(_soak(server, 16))
    assert not warm["errors"], warm["errors"][:5]
    _wait_idle(server)
    rss_before = server.rss_mb()
    started = time.time()
    outcome = asyncio.run(_soak(server, SOAK_REQUESTS))
    elapsed = time.time() - started
    m = _wait_idle(server)
    rss_after = server.rss_mb()
    print(f"soak: {SOAK_REQUESTS} requests at concurrency {CONCURRENCY} in {elapsed:.0f} s: "
          f"{outcome['ok']} ok, {outcome['aborted']} aborted mid-stream, {outcome['bad_400']} "
          f"rejected (400), {outcome['prefill_eviction']} ok with prefill eviction; RSS {rss_before:.0f} -> {rss_after:.0f} MB; "
          f"released {m['vllm_kvevict_released_blocks_total']:.0f} blocks")
    if os.environ.get("KVEVICT_SOAK_RESULT"):
        with open(os.environ["KVEVICT_SOAK_RESULT"], "w") as f:
            json.dump({"command": f"KVEVICT_SOAK_REQUESTS={SOAK_REQUESTS} bash scripts/test.sh "
                       "tests/engine/test_serve.py -k soak -s", "requests": SOAK_REQUESTS,
                       "concurrency": CONCURRENCY, "seconds": elapsed,
                       **{k: v for k, v in outcome.items() if k != "errors"},
                       "errors_on_valid_requests": len(outcome["errors"]),
                       "errors_sample": outcome["errors"][:5],
                       "kv_cache_usage_after": m["vllm:kv_cache_usage_perc"],
                       "parked_blocks_after": m["vllm_kvevict_parked_blocks_now"],
                       "rss_mb_before": rss_before, "rss_mb_after": rss_after,
                       "released_blocks_total": m["vllm_kvevict_released_blocks_total"]},
                      f, indent=1)
    assert not outcome["errors"], outcome["errors"][:5]
    assert outcome["bad_400"] > 0 and outcome["aborted"] > 0 and outcome["ok"] > 0
    assert m["vllm:kv_cache_usage_perc"] == 0.0  # every block back in the pool
    assert m["vllm_kvevict_parked_blocks_now"] == 0
    assert rss_after - rss_before < 0.05 * rss_before + 64  # flat: no per-request growth
    assert "Traceback" not in server.tail(400)
