"""Decode throughput: stock vLLM vs the plugin loaded with nothing evicted vs evicting.

Each variant runs in its own process (stock with ``VLLM_PLUGINS=""``), one after the other, on
the embedded SmolLM2 model: N prompts of ~600 tokens, greedy, M output tokens, after one warm-up
request. Prints and writes ``benchmarks/results/overhead.json``; ratios are plugin ÷ stock.

    python benchmarks/bench_overhead.py [--requests 4] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "support"))  # engine_helpers

import common  # noqa: E402

VARIANTS = {
    "stock": None,
    "plugin_idle": {"policy": "attention", "budget": 1.0},
    "plugin_evict_25": {"policy": "attention", "budget": 0.25, "interval": 16},
}


def run_variant(name: str, requests: int, max_tokens: int) -> dict:
    from engine_helpers import make_llm, passkey_prompt
    from vllm import SamplingParams

    config = VARIANTS[name]
    llm = make_llm({"kv_eviction": config} if config else None, enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate([passkey_prompt("10000")], SamplingParams(temperature=0, max_tokens=8))
    prompts = [passkey_prompt(str(20000 + i)) for i in range(requests)]
    # prefill alone, then prefill + decode: the difference is decode time
    t0 = time.perf_counter()
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1))
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    total = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"variant": name, "requests": requests, "output_tokens": tokens,
            "total_s": total, "prefill_s": prefill,
            "decode_tokens_per_s": (tokens - requests) / max(total - prefill, 1e-9)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args.variant, args.requests, args.max_tokens)))
        return
    results = {}
    for name in VARIANTS:
        env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        if name == "stock":
            env["VLLM_PLUGINS"] = ""
        proc = subprocess.run(
            [sys.executable, __file__, "--variant", name, "--requests", str(args.requests),
             "--max-tokens", str(args.max_tokens)],
            capture_output=True, text=True, env=env,
        )
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if not line:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(line[-1][7:])
        print(f"{name:18s} decode {results[name]['decode_tokens_per_s']:.2f} tok/s "
              f"(total {results[name]['total_s']:.1f} s)", flush=True)
    stock = results["stock"]["decode_tokens_per_s"]
    summary = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "results": results,
        "idle_overhead_ratio": results["plugin_idle"]["decode_tokens_per_s"] / stock,
        "evicting_25_ratio": results["plugin_evict_25"]["decode_tokens_per_s"] / stock,
    }
    print(f"plugin idle / stock decode tok/s = {summary['idle_overhead_ratio']:.3f}; "
          f"evicting at 25% / stock = {summary['evicting_25_ratio']:.3f}")
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    with open(common.RESULTS / "overhead.json", "w") as f:
        json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
