"""vLLM's own multimodal load generator against ``smollm2-vlm``, eviction off and on.

A client nobody here wrote: ``vllm bench serve --dataset-name random-mm`` sends random images
over the OpenAI chat API (``/v1/chat/completions``, base64 ``image_url`` parts). Per variant a
fresh ``vllm serve smollm2-vlm`` (the plugin's CLI wrapper), one after the other:

- ``off``: the plugin loaded, no ``--kv-eviction`` (nothing evicted);
- ``hae_25``: ``--kv-eviction hae --kv-eviction-budget 0.25``.

Reports vLLM's own figures (completed/failed requests, request and output-token throughput,
TTFT) and the plugin's ``/metrics`` (evicted tokens by modality) after the run.

    python benchmarks/bench_vllm_mm.py                 # 32 requests, 2 images each, ~10 min
    python benchmarks/bench_vllm_mm.py --num-prompts 64

Writes ``results/vllm_bench_mm.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests", "support"))  # engine_helpers

import common  # noqa: E402

VARIANTS = {"off": [], "hae_25": ["--kv-eviction", "hae", "--kv-eviction-budget", "0.25"]}


def plugin_metrics(base: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("vllm_kvevict_") and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = out.get(name, 0.0) + float(value)
    return out


def run_variant(name: str, flags: list[str], args, model: str) -> dict:
    from engine_helpers import Server

    server = Server(["smollm2-vlm", "--served-model-name", "smollm2-vlm", "--block-size", "32",
                     "--max-model-len", "4096", "--dtype", "float32", "--max-num-seqs", "16",
                     *flags], kv_cache_gb="2", timeout=600)
    base = server.base
    env = {**os.environ}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    try:
        out_dir = tempfile.mkdtemp(prefix=f"vllm-bench-{name}-")
        cmd = [sys.executable, "-m", "vllm_kvevict.cli", "bench", "serve",
               "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
               "--base-url", base, "--model", "smollm2-vlm", "--tokenizer", model,
               "--dataset-name", "random-mm", "--num-prompts", str(args.num_prompts),
               "--random-input-len", str(args.input_len), "--random-output-len",
               str(args.output_len), "--random-mm-base-items-per-request", str(args.images),
               "--random-mm-limit-mm-per-prompt", json.dumps({"image": args.images, "video": 0}),
               "--random-mm-bucket-config", "{(256, 256, 1): 1.0}",
               "--request-rate", "inf", "--max-concurrency", str(args.concurrency),
               "--seed", str(common.SEED), "--ignore-eos",
               "--save-result", "--result-dir", out_dir, "--result-filename", "result.json"]
        started = time.perf_counter()
        bench = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
        elapsed = time.perf_counter() - started
        if bench.returncode != 0:
            raise RuntimeError(f"{name}: vllm bench serve failed ({bench.returncode}):\n"
                               f"{bench.stdout[-3000:]}\n{bench.stderr[-3000:]}")
        with open(os.path.join(out_dir, "result.json")) as f:
            result = json.load(f)
        keep = ("completed", "failed", "duration", "request_throughput", "output_throughput",
                "total_token_throughput", "mean_ttft_ms", "median_ttft_ms", "mean_tpot_ms",
                "total_input_tokens", "total_output_tokens")
        return {"flags": flags, "wall_s": elapsed, **{k: result.get(k) for k in keep},
                "plugin_metrics": plugin_metrics(base)}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--images", type=int, default=2, help="images per request")
    parser.add_argument("--input-len", type=int, default=256, help="random text tokens")
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default="vllm_bench_mm.json")
    args = parser.parse_args()
    from vllm_kvevict.models import model_path

    model = str(model_path("smollm2-vlm"))
    results = {}
    for name in args.variants.split(","):
        results[name] = run_variant(name, VARIANTS[name], args, model)
        r = results[name]
        print(f"{name}: {r['completed']} completed, {r['failed']} failed, "
              f"{r['output_throughput']:.1f} out tok/s, TTFT {r['mean_ttft_ms']:.0f} ms", flush=True)
    data = {"command": common.command(), "client": "vllm bench serve --dataset-name random-mm",
            "settings": vars(args), "versions": common.versions(), "machine": common.machine(),
            "results": results}
    if {"off", "hae_25"} <= results.keys():
        data["output_throughput_ratio"] = (results["hae_25"]["output_throughput"]
                                           / results["off"]["output_throughput"])
    common.write_json(args.out, data)


if __name__ == "__main__":
    main()
