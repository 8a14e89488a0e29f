"""Worker cost of scoring: statistic launches, bytes sent to the host and host-side time per
step, by the number of requests scored in the step, through vLLM on the embedded SmolLM2.

A counting shim wraps every ``kernels.dispatch`` entry point the worker calls (one call is one
kernel launch on NVIDIA; here its torch reference) and the worker's one device-to-host copy
(``_all_reduce_mean``: the ``[sum of blocks + requests]`` float32 it moves to the host). For R
concurrent requests decoding with a policy that scores every decode step (H2O, HybridKV) or
every 16th (SnapKV), each step's counts are kept with the number of requests it scored; the
worker's own host-side time per step (``begin_step`` + ``fix_inputs`` + the hooks'
bookkeeping + ``finish_step``, minus the time inside the statistics) is timed too.

    python benchmarks/bench_worker.py            # ~3 min: R = 1, 4, 16; h2o, snapkv, hybridkv

Writes ``results/worker.json``. Claims checked: statistic calls per step do not grow with R
(they are per layer and statistic), and host bytes per scored request are at most 4 bytes x
blocks x 1 (one float per block, plus one flag per request).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import common  # noqa: E402

POLICIES = ("h2o", "snapkv", "hybridkv")
REQUESTS = (1, 4, 16)
PROMPT_TOKENS = 1024
DECODE = 40
ENTRY_POINTS = ("window_attention", "key_bounds", "block_key_bounds",
                "quest_scores", "value_proj_norm", "wo_gram")


class Counter:
    """Per step: statistic calls, seconds inside them, bytes to host, requests scored."""

    def __init__(self):
        self.steps: list[dict] = []
        self.current = self._empty()

    @staticmethod
    def _empty():
        return {"calls": 0, "stat_s": 0.0, "host_bytes": 0, "scored": 0, "blocks": 0,
                "worker_s": 0.0}

    def close_step(self):
        if self.current["scored"]:
            self.steps.append(self.current)
        self.current = self._empty()


def install(counter: Counter) -> None:
    from vllm_kvevict.kernels import dispatch

    from vllm_kvevict.adapter import worker as W

    for name in ENTRY_POINTS:
        original = getattr(dispatch, name, None)
        if original is None:
            continue

        def counted(*a, _orig=original, **k):
            t0 = time.perf_counter()
            try:
                return _orig(*a, **k)
            finally:
                counter.current["calls"] += 1
                counter.current["stat_s"] += time.perf_counter() - t0

        setattr(dispatch, name, counted)

    reduce = W._all_reduce_mean

    def all_reduce_mean(scores, sizes, device):
        counter.current["host_bytes"] += 4 * (sum(sizes) + len(sizes))
        counter.current["scored"] += len(sizes)
        counter.current["blocks"] += sum(sizes)
        return reduce(scores, sizes, device)

    W._all_reduce_mean = all_reduce_mean

    def timed(method):
        original = getattr(W.WorkerEviction, method)

        def wrapper(self, *a, **k):
            t0 = time.perf_counter()
            try:
                return original(self, *a, **k)
            finally:
                counter.current["worker_s"] += time.perf_counter() - t0
                if method == "finish_step":
                    counter.close_step()

        setattr(W.WorkerEviction, method, wrapper)

    for method in ("begin_step", "fix_inputs", "_measure_layer", "finish_step"):
        timed(method)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", default=",".join(POLICIES))
    args = parser.parse_args()
    common.engine_env()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    import tasks
    from engine_helpers import make_llm
    from vllm import SamplingParams, TokensPrompt

    counter = Counter()
    install(counter)
    started = time.perf_counter()
    llm = make_llm({"kv_eviction": {"policy": "h2o", "budget": 0.25}}, max_num_seqs=32,
                   max_model_len=4096, enable_prefix_caching=False)
    engine_s = time.perf_counter() - started
    layers = len(llm.llm_engine.model_config.hf_config.to_dict().get("layer_types") or []) or \
        llm.llm_engine.model_config.hf_config.num_hidden_layers
    rows = []
    for policy in [p for p in args.policies.split(",") if p]:
        for r in REQUESTS:
            prompts = [TokensPrompt(prompt_token_ids=tasks.make_sample(
                "needle", PROMPT_TOKENS, 0.5, i).token_ids) for i in range(r)]
            params = SamplingParams(temperature=0, max_tokens=DECODE, ignore_eos=True,
                                    extra_args={"kv_eviction": {"policy": policy, "budget": 0.25}})
            counter.steps.clear()
            llm.generate(prompts, params, use_tqdm=False)
            decode = [s for s in counter.steps if s["scored"] == r]  # steps scoring all R
            if not decode:
                continue
            row = {
                "policy": policy, "requests": r, "steps": len(decode),
                "calls_per_step": statistics.median(s["calls"] for s in decode),
                "calls_per_step_per_layer": statistics.median(s["calls"] for s in decode) / layers,
                "host_bytes_per_request": statistics.median(s["host_bytes"] / r for s in decode),
                "blocks_per_request": statistics.median(s["blocks"] / r for s in decode),
                "worker_host_ms_per_request": statistics.median(
                    (s["worker_s"] - s["stat_s"]) * 1e3 / r for s in decode),
                "stat_ms_per_step": statistics.median(s["stat_s"] * 1e3 for s in decode),
            }
            row["host_bytes_per_block"] = row["host_bytes_per_request"] / row["blocks_per_request"]
            rows.append(row)
            print(f"  {policy:9s} R={r:3d}: {row['calls_per_step']:.0f} statistic calls/step "
                  f"({row['calls_per_step_per_layer']:.1f}/layer), "
                  f"{row['host_bytes_per_request']:.0f} B to host per request "
                  f"({row['host_bytes_per_block']:.2f} B/block), worker host time "
                  f"{row['worker_host_ms_per_request']:.3f} ms/request", flush=True)
    common.write_json("worker.json", {
        "command": common.command(), "layers": layers, "prompt_tokens": PROMPT_TOKENS,
        "decode_tokens": DECODE, "versions": common.versions(), "machine": common.machine(),
        "timing_s": {"engine_start": engine_s, "total": time.perf_counter() - started},
        "rows": rows,
    })
    print(common.markdown_table(
        ["policy", "requests scored", "statistic calls / step", "calls / layer",
         "host bytes / request", "bytes / block", "worker host ms / request"],
        [[r["policy"], r["requests"], f"{r['calls_per_step']:.0f}",
          f"{r['calls_per_step_per_layer']:.1f}", f"{r['host_bytes_per_request']:.0f}",
          f"{r['host_bytes_per_block']:.2f}", f"{r['worker_host_ms_per_request']:.3f}"]
         for r in rows]))


if __name__ == "__main__":
    main()
