"""Worker cost of scoring: host syncs, statistic launches, bytes sent to the host and host-side
time per step, by the number of requests scored in the step, through vLLM on the embedded
SmolLM2 (vLLM's CPU backend: the hooks measure the statistics; on NVIDIA the plugin's attention
backend measures the decode ones inside its pass and the hooks then run only at prefill).

Per step it counts:
* ``host_syncs``: what would stall the host on a GPU — the worker's blocking transfers (every
  host<->device move of its bookkeeping goes through ``adapter/transfers.py``: ``downloads``,
  the one copy of the step's scores, and ``uploads``, one non-blocking copy from pinned
  memory, counted apart because they do not synchronise; ``tests/unit/test_gpu_path.py`` runs a
  step on the ``meta`` device to show nothing else crosses) plus every read of tensor data the
  policies make while scoring (``.item()``/``int()``/``.tolist()``/boolean indexing..., the
  detector of ``tests/unit/test_policies_device.py`` around ``block_scores``);
* statistic calls (``kernels.dispatch`` entry points the hooks call, one launch each on NVIDIA,
  and the decode statistic's torch twin, one call per request and layer on the CPU backend;
  on NVIDIA the attention backend measures that one inside its pass, no call at all);
* host bytes (the ``[sum of blocks + requests]`` float32 of the download);
* the worker's own host time (``begin_step`` + ``fix_inputs`` + the hooks' bookkeeping +
  ``finish_step``, minus the time inside the statistics);
* the policies' device state per request (their per-block stores) at the first and the last
  of those steps: flat, it follows the request's blocks, not the steps.
For R concurrent requests decoding with a policy that scores every decode step (H2O, HybridKV)
or every 16th (SnapKV, LaProx), each step's counts are kept with the number it scored.

    python benchmarks/bench_worker.py            # ~6 min: R = 1, 16, 64; h2o, snapkv, hybridkv, laprox

Writes ``results/worker.json``. Claims checked: host syncs per step are at most 2 (goal) and do
not grow with R; host bytes per scored request are 4 bytes x blocks (+ one flag).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests", "support"))  # engine_helpers

import common  # noqa: E402

#: two policies scored at every decode step (H2O, HybridKV) and two every ``interval`` steps
#: (SnapKV, LaProx): the run of results/worker.json; checked against the registry
POLICIES = ("h2o", "snapkv", "hybridkv", "laprox")
REQUESTS = (1, 16, 64)
PROMPT_TOKENS = 256
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
                "worker_s": 0.0, "uploads": 0, "downloads": 0, "policy_reads": 0,
                "decode_scored": 0, "state_bytes": 0}

    def close_step(self):
        if self.current["scored"]:
            self.steps.append(self.current)
        self.current = self._empty()


def install(counter: Counter) -> None:
    from vllm_kvevict.kernels import dispatch, reference

    from vllm_kvevict.adapter import scoring_batch
    from vllm_kvevict.adapter import worker as W

    # the hooks' decode statistic on the CPU backend: one twin call per request and layer (on
    # NVIDIA the attention backend's kernel measures it inside its pass: no call at all)
    targets = [(dispatch, name) for name in ENTRY_POINTS] + [(reference, "dense_block_attention")]
    for module, name in targets:
        original = getattr(module, name, None)
        if original is None:
            continue

        def counted(*a, _orig=original, **k):
            t0 = time.perf_counter()
            try:
                return _orig(*a, **k)
            finally:
                counter.current["calls"] += 1
                counter.current["stat_s"] += time.perf_counter() - t0

        setattr(module, name, counted)

    reduce = scoring_batch._all_reduce_mean

    def all_reduce_mean(scores, sizes, device, **kwargs):
        counter.current["host_bytes"] += 4 * (sum(sizes) + len(sizes))
        counter.current["scored"] += len(sizes)
        counter.current["blocks"] += sum(sizes)
        return reduce(scores, sizes, device, **kwargs)

    scoring_batch._all_reduce_mean = all_reduce_mean  # what finish_step calls

    from test_policies_device import HostReads

    from vllm_kvevict.policies.base import EvictionPolicy

    for cls in {c for c in _subclasses(EvictionPolicy) if "block_scores" in vars(c)}:
        def block_scores(self, stats, state, _orig=cls.block_scores):
            with HostReads() as mode:
                out = _orig(self, stats, state)
            counter.current["policy_reads"] += len(mode.reads)
            return out

        cls.block_scores = block_scores

    def timed(method):
        original = getattr(W.WorkerEviction, method)

        def wrapper(self, *a, **k):
            if method == "finish_step":  # only decode scorings count as decode steps
                counter.current["decode_scored"] = sum(
                    sr.task.phase == "decode" for sr in self.scored)
            t0 = time.perf_counter()
            try:
                return original(self, *a, **k)
            finally:
                counter.current["worker_s"] += time.perf_counter() - t0
                if method == "finish_step":
                    counter.current["uploads"] = self.transfers.counts["uploads"]
                    counter.current["downloads"] = self.transfers.counts["downloads"]
                    counter.current["state_bytes"] = _state_bytes(self.policy_state)
                    counter.close_step()

        setattr(W.WorkerEviction, method, wrapper)

    for method in ("begin_step", "fix_inputs", "_measure_layer", "finish_step"):
        timed(method)


def _state_bytes(policy_state: dict) -> int:
    """Device bytes the policies keep per request across steps (their block stores), the
    largest over the running requests."""
    sizes = [sum(v.numel() * v.element_size() for v in state.values() if hasattr(v, "numel"))
             for state in policy_state.values()]
    return max(sizes, default=0)


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", default=",".join(POLICIES))
    args = parser.parse_args()
    policies = common.check_policies(args.policies)
    common.engine_env()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    import tasks
    from engine_helpers import make_llm
    from vllm import SamplingParams, TokensPrompt

    counter = Counter()
    install(counter)
    started = time.perf_counter()
    llm = make_llm({"kv_eviction": {"policy": "h2o", "budget": 0.25}},
                   max_num_seqs=max(REQUESTS), max_model_len=1024, enable_prefix_caching=False)
    engine_s = time.perf_counter() - started
    layers = len(llm.llm_engine.model_config.hf_config.to_dict().get("layer_types") or []) or \
        llm.llm_engine.model_config.hf_config.num_hidden_layers
    rows = []
    for policy in policies:
        for r in REQUESTS:
            prompts = [TokensPrompt(prompt_token_ids=tasks.make_sample(
                "needle", PROMPT_TOKENS, 0.5, i).token_ids) for i in range(r)]
            params = SamplingParams(temperature=0, max_tokens=DECODE, ignore_eos=True,
                                    extra_args={"kv_eviction": {"policy": policy, "budget": 0.25}})
            counter.steps.clear()
            llm.generate(prompts, params, use_tqdm=False)
            # decode steps scoring all R (a prefill scoring reads back once per request)
            decode = [s for s in counter.steps if s["decode_scored"] == s["scored"] == r]
            if not decode:
                continue
            syncs = [s["downloads"] + s["policy_reads"] for s in decode]
            row = {
                "policy": policy, "requests": r, "steps": len(decode),
                "host_syncs_per_step": statistics.median(syncs),
                "host_syncs_per_step_max": max(syncs),
                "uploads_per_step": statistics.median(s["uploads"] for s in decode),
                # per request, at the first and the last decode step scoring all R: flat when
                # the stores only follow the request's own blocks (it grows by about one)
                "state_bytes_first": decode[0]["state_bytes"],
                "state_bytes_last": decode[-1]["state_bytes"],
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
            print(f"  {policy:9s} R={r:3d}: {row['host_syncs_per_step']:.0f} host syncs/step "
                  f"(max {row['host_syncs_per_step_max']}), "
                  f"{row['uploads_per_step']:.0f} pinned uploads/step, policy state "
                  f"{row['state_bytes_first']} -> {row['state_bytes_last']} B/request, "
                  f"{row['calls_per_step']:.0f} statistic calls/step "
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
        ["policy", "requests scored", "host syncs / step (max)", "pinned uploads / step",
         "statistic calls / step", "calls / layer",
         "host bytes / request", "bytes / block", "worker host ms / request"],
        [[r["policy"], r["requests"],
          f"{r['host_syncs_per_step']:.0f} ({r['host_syncs_per_step_max']})",
          f"{r['uploads_per_step']:.0f}", f"{r['calls_per_step']:.0f}",
          f"{r['calls_per_step_per_layer']:.1f}", f"{r['host_bytes_per_request']:.0f}",
          f"{r['host_bytes_per_block']:.2f}", f"{r['worker_host_ms_per_request']:.3f}"]
         for r in rows]))


if __name__ == "__main__":
    main()
