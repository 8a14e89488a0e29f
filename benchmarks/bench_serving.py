"""Memory, concurrency and throughput: stock vLLM vs the plugin on a deliberately small KV pool.

Workload: ``requests`` long prompts (``tasks.py`` needle samples of ``prompt_tokens`` tokens,
the 7-digit number in the middle; their varied haystacks share no prefix beyond the intro, so
prefix caching does not shrink them - the repeated pass-key filler did) arriving at once,
``max_tokens`` greedy output tokens each (``ignore_eos``), on a KV pool of ``pool_blocks``
blocks of 32 tokens (one of them vLLM's null block): too small for all of them, and sized so
that the requests stock vLLM admits outgrow it while decoding - stock vLLM queues the rest and
preempts (recompute) when the pool runs dry. Variants, each in its own process, one after the
other:

- ``stock``: vLLM without the plugin (``VLLM_PLUGINS=""``);
- ``budget_50`` / ``budget_25`` / ``budget_10``: the plugin evicting to that KV budget;
- ``pool_pressure``: the plugin with budget 1.0 and pool-pressure mode (evicts only instead of
  preempting);
- ``prefill_25`` / ``prefill_10``: the plugin at that budget with prefill eviction: a request
  evicts between its prompt chunks and is admitted when its peak (budget + one chunk) fits,
  not its whole prompt.

Every variant, stock included, runs with the same chunk size (``chunk_tokens``, vLLM's
``max_num_batched_tokens``).

The engine runs in-process and is stepped by hand; after every step we sample the scheduler:
running requests, KV blocks in use, and per request the first-token time. Printed and written
to ``benchmarks/results/serving.json`` (+ ``serving_blocks.png``); ratios are plugin ÷ stock
for every plugin variant, and at the top level for the ``--headline`` variant (default
``prefill_25``).

    python benchmarks/bench_serving.py --profile quick   # ~4 min on 2 cores
    python benchmarks/bench_serving.py --profile full    # ~19 min
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

PROFILES = {
    # quick: 3 prompts of 32 blocks admitted (96 of 100 usable), each grows 2 blocks: preemption
    "quick": {"requests": 8, "prompt_tokens": 1024, "max_tokens": 64, "pool_blocks": 101,
              "chunk_tokens": 256},
    # full: 2 prompts of 64 blocks admitted (128 of 136 usable), each grows 8 blocks: preemption
    "full": {"requests": 16, "prompt_tokens": 2048, "max_tokens": 256, "pool_blocks": 137,
             "chunk_tokens": 256},
}
VARIANTS = {
    "stock": None,
    "budget_50": {"budget": 0.5},
    "budget_25": {"budget": 0.25},
    "budget_10": {"budget": 0.1},
    "pool_pressure": {"budget": 1.0, "pool_pressure": True},
    "prefill_25": {"budget": 0.25, "prefill_eviction": True},
    "prefill_10": {"budget": 0.1, "prefill_eviction": True},
}


def run_variant(name: str, policy: str, cfg: dict) -> dict:
    import tasks
    from engine_helpers import engine_core, make_llm, recorded_preemptions
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    extra = VARIANTS[name]
    config = {"kv_eviction": {"policy": policy, "interval": 8, **extra}} if extra is not None else None
    llm = make_llm(config, num_gpu_blocks_override=cfg["pool_blocks"], max_num_seqs=cfg["requests"],
                   max_model_len=cfg["prompt_tokens"] + cfg["max_tokens"] + 64,
                   max_num_batched_tokens=cfg["chunk_tokens"])
    sched = engine_core(llm).scheduler
    pool = sched.kv_cache_manager.block_pool
    total_blocks = pool.num_gpu_blocks - 1  # minus the null block
    params = SamplingParams(temperature=0, max_tokens=cfg["max_tokens"], ignore_eos=True)
    engine = llm.llm_engine
    samples = [tasks.make_sample("needle", cfg["prompt_tokens"], 0.5, i) for i in range(cfg["requests"])]
    first_token: dict[str, float] = {}
    finished: dict[str, str] = {}
    timeline = []  # (t, running, blocks in use)
    with recorded_preemptions(sched) as preemptions:
        start = time.perf_counter()
        for i, sample in enumerate(samples):
            engine.add_request(f"r{i}", TokensPrompt(prompt_token_ids=sample.token_ids), params)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.outputs and out.outputs[0].token_ids and out.request_id not in first_token:
                    first_token[out.request_id] = time.perf_counter() - start
                if out.finished:
                    finished[out.request_id] = out.outputs[0].text
            used = total_blocks - pool.get_num_free_blocks()
            timeline.append((time.perf_counter() - start, len(sched.running), used))
    elapsed = time.perf_counter() - start
    output_tokens = cfg["requests"] * cfg["max_tokens"]
    running = [s[1] for s in timeline]
    blocks_per_request = [s[2] / s[1] for s in timeline if s[1]]
    retrieved = sum(tasks.is_correct(text, samples[int(r[1:])].answer) for r, text in finished.items())
    return {
        "variant": name, "policy": policy if extra is not None else None, "config": extra,
        **cfg, "usable_blocks": total_blocks,
        "total_s": elapsed,
        "output_tokens_per_s": output_tokens / elapsed,
        "mean_running": sum(running) / len(running),
        "peak_running": max(running),
        "mean_blocks_per_request": sum(blocks_per_request) / len(blocks_per_request),
        "peak_blocks_used": max(s[2] for s in timeline),
        "preemptions": len(preemptions),
        "mean_ttft_s": sum(first_token.values()) / len(first_token),
        "max_ttft_s": max(first_token.values()),
        "answers_retrieved": retrieved,
        "timeline": timeline,
    }


def ratios(variant: dict, stock: dict) -> dict:
    """Plugin variant / stock: mean running requests, output tokens/s, mean blocks per running
    request, mean first-token time; answers as the difference in percentage points."""
    return {
        "concurrency_ratio": variant["mean_running"] / stock["mean_running"],
        "throughput_ratio": variant["output_tokens_per_s"] / stock["output_tokens_per_s"],
        "blocks_per_request_ratio": variant["mean_blocks_per_request"] / stock["mean_blocks_per_request"],
        "ttft_ratio": variant["mean_ttft_s"] / stock["mean_ttft_s"],
        "answers_points_vs_stock": 100 * (variant["answers_retrieved"] / variant["requests"]
                                          - stock["answers_retrieved"] / stock["requests"]),
    }


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for name, r in results.items():
        t = [s[0] for s in r["timeline"]]
        ax.plot(t, [s[2] for s in r["timeline"]], label=f"{name} ({r['total_s']:.0f} s)")
    ax.axhline(next(iter(results.values()))["usable_blocks"], color="grey", ls=":", label="pool size")
    ax.set_xlabel("seconds since all requests arrived")
    ax.set_ylabel("KV blocks in use")
    ax.set_title("KV blocks in use: stock vLLM vs vllm-kvevict")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--policy", default="snapkv", help="eviction policy of the plugin variants")
    parser.add_argument("--headline", default="prefill_25", choices=[v for v in VARIANTS if v != "stock"])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="serving.json",
                        help="results file (the blocks plot only for the default)")
    parser.add_argument("--experiment", default="",
                        help="a one-off run (e.g. another --policy): fold it into --out's "
                             "experiments[NAME] (results/serving.md shows it) instead of "
                             "replacing the file; no blocks plot")
    args = parser.parse_args()
    cfg = PROFILES[args.profile]
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args.variant, args.policy, cfg)))
        return
    common.check_policies([args.policy])
    results = {}
    for name in args.variants.split(","):
        env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
               "VLLM_CPU_KVCACHE_SPACE": "4"}
        if name == "stock":
            env["VLLM_PLUGINS"] = ""
        proc = subprocess.run(
            [sys.executable, __file__, "--variant", name, "--profile", args.profile, "--policy", args.policy],
            capture_output=True, text=True, env=env,
        )
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if not line:
            sys.exit(f"{name} failed:\n{proc.stderr[-4000:]}")
        r = results[name] = json.loads(line[-1][7:])
        print(f"{name:14s} {r['total_s']:6.1f} s  {r['output_tokens_per_s']:6.1f} out tok/s  "
              f"running mean {r['mean_running']:.1f} peak {r['peak_running']}  "
              f"blocks/request {r['mean_blocks_per_request']:.1f}  preemptions {r['preemptions']}  "
              f"TTFT mean {r['mean_ttft_s']:.1f} s  answers {r['answers_retrieved']}/{r['requests']}",
              flush=True)
    summary = {
        "command": " ".join(["python", "benchmarks/bench_serving.py", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "profile": args.profile, "policy": args.policy, "headline": args.headline,
        "results": results,
    }
    if "stock" in results:
        stock = results["stock"]
        summary["ratios"] = {name: ratios(r, stock) for name, r in results.items() if name != "stock"}
        for name, q in summary["ratios"].items():
            print(f"{name} / stock: concurrency x{q['concurrency_ratio']:.2f}, throughput "
                  f"x{q['throughput_ratio']:.2f}, blocks/request x{q['blocks_per_request_ratio']:.2f}, "
                  f"TTFT x{q['ttft_ratio']:.2f}, answers {q['answers_points_vs_stock']:+.0f} points")
        summary.update(summary["ratios"].get(args.headline, {}))
    common.write_json(args.out, summary, args.experiment, indent=1)
    if args.out == "serving.json" and not args.experiment:
        plot(results, os.path.join(str(common.RESULTS), "serving_blocks.png"))


if __name__ == "__main__":
    main()
