"""Long generations at a fixed token budget: KV held per decode step, and drift vs the full cache.

One request (a varied text and an open instruction, ``tasks.drift_prompt``) generates
``--tokens`` tokens greedily (``ignore_eos``) with the full cache and with each policy at
``budget_tokens``. After every allocation the scheduler's blocks for the request are counted
(the ledger's resident blocks: what it holds in the pool, recycle bin included). Then the full
cache reads each policy's prompt + generated tokens (``prompt_logprobs``, no eviction), so at
every generated position we have the full cache's distribution p and the policy's q on the same
prefix: top-1 agreement and a KL(p || q) lower bound (``bench_quality.drift_steps``), overall
and per window of ``WINDOW`` steps (does the drift grow with the length?), and how many
generated tokens equal the full cache's own generation at the same position (a greedy text
that differs once goes its own way, so this falls fast even when every step agrees).

    python benchmarks/bench_longgen.py              # ~6 min on 2 cores

Writes ``results/longgen.json`` and ``results/longgen.png``.
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

BLOCK = 32
PROMPT_TOKENS, TOKENS, BUDGET_TOKENS = 512, 2048, 256
#: the policies of the published run (results/longgen.json), checked against the registry
POLICIES = ("snapkv", "laprox", "streamingllm")
WINDOW = 256  # drift per window of generated steps
TOP_K = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=TOKENS)
    parser.add_argument("--budget-tokens", type=int, default=BUDGET_TOKENS)
    parser.add_argument("--policies", default=",".join(POLICIES))
    args = parser.parse_args()
    policies = common.check_policies(args.policies)
    common.engine_env()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from bench_quality import drift_steps
    from engine_helpers import make_llm, sampling, scheduler, shutdown
    from tasks import drift_prompt
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    llm = make_llm({"kv_eviction": {"policy": "snapkv", "budget": 0.25}},
                   max_model_len=PROMPT_TOKENS + args.tokens + 64)
    sched = scheduler(llm)
    held: list[tuple[int, int]] = []  # (tokens computed, blocks held) after each allocation
    original = sched.kv_cache_manager.allocate_slots

    def allocate_slots(request, *a, **k):
        out = original(request, *a, **k)
        held.append((request.num_computed_tokens, len(sched.ledger.resident_array(request.request_id))))
        return out

    sched.kv_cache_manager.allocate_slots = allocate_slots
    ids = drift_prompt(PROMPT_TOKENS, 0, common.SEED)
    runs = {"full": {"policy": "none"}}
    runs.update({p: {"policy": p, "budget_tokens": args.budget_tokens} for p in policies})
    results = {}
    for name, kv in runs.items():
        held.clear()
        llm.reset_prefix_cache()
        t0 = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)],
                           sampling(kv, max_tokens=args.tokens, logprobs=TOP_K, ignore_eos=True),
                           use_tqdm=False)[0]
        seconds = time.perf_counter() - t0
        tokens = list(out.outputs[0].token_ids)
        decode = [(n, b) for n, b in held if n >= len(ids)]
        results[name] = {"kv": kv, "tokens": tokens, "seconds": seconds,
                         "logprobs": out.outputs[0].logprobs, "held": decode}
        print(f"{name:12s} {len(tokens)} tokens in {seconds:.0f} s; blocks held at the end "
              f"{decode[-1][1] if decode else '-'}, most {max((b for _, b in decode), default=0)}",
              flush=True)
    sched.kv_cache_manager.allocate_slots = original

    rows = []
    for name, r in results.items():
        ref = llm.generate([TokensPrompt(prompt_token_ids=ids + r["tokens"])],
                           sampling({"policy": "none"}, max_tokens=1, prompt_logprobs=TOP_K),
                           use_tqdm=False)[0]
        p = [{t: (lp.logprob, lp.rank) for t, lp in d.items()} for d in ref.prompt_logprobs[len(ids):]]
        q = [{t: (lp.logprob, lp.rank) for t, lp in d.items()} for d in r["logprobs"]]
        steps = drift_steps(p, q, r["tokens"])
        windows = [steps[i:i + WINDOW] for i in range(0, len(steps), WINDOW)]
        decode_blocks = [b for _, b in r["held"]]
        rows.append({
            "run": name, "kv_eviction": r["kv"], "generated": len(r["tokens"]),
            "seconds": r["seconds"],
            "blocks_held_max": max(decode_blocks), "blocks_held_last": decode_blocks[-1],
            "blocks_held_median_second_half": statistics.median(
                decode_blocks[len(decode_blocks) // 2:]),
            "top1_agreement": sum(a for a, _ in steps) / len(steps),
            "kl_lower_bound_mean": sum(k for _, k in steps) / len(steps),
            "top1_agreement_per_window": [sum(a for a, _ in w) / len(w) for w in windows],
            "kl_lower_bound_per_window": [sum(k for _, k in w) / len(w) for w in windows],
            "same_tokens_as_full": sum(a == b for a, b in zip(r["tokens"], results["full"]["tokens"])),
            "held": r["held"],
        })
        print(f"{name:12s} top-1 agreement {rows[-1]['top1_agreement']:.3f}  KL>= "
              f"{rows[-1]['kl_lower_bound_mean']:.3f}  per {WINDOW}-step window: "
              + " ".join(f"{a:.2f}" for a in rows[-1]["top1_agreement_per_window"]), flush=True)
    shutdown(llm)
    common.write_json("longgen.json", {
        "command": common.command(), "versions": common.versions(), "machine": common.machine(),
        "prompt_tokens": len(ids), "budget_tokens": args.budget_tokens, "block_size": BLOCK,
        "window": WINDOW, "rows": rows, "total_s": time.perf_counter() - started,
    })
    plot(rows, args.budget_tokens, common.RESULTS / "longgen.png")
    print(f"total {time.perf_counter() - started:.0f} s; wrote results/longgen.json, longgen.png")


def plot(rows: list[dict], budget_tokens: int, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for r in rows:
        steps = [n - r["held"][0][0] for n, _ in r["held"]]
        top.plot(steps, [b for _, b in r["held"]], label=r["run"])
        if r["run"] != "full":
            x = [(i + 0.5) * WINDOW for i in range(len(r["kl_lower_bound_per_window"]))]
            bottom.plot(x, r["kl_lower_bound_per_window"], marker="o", label=r["run"])
    top.axhline(budget_tokens / BLOCK, color="grey", ls=":", label=f"budget ({budget_tokens} tokens)")
    top.set_ylabel("KV blocks held")
    top.set_yscale("log")
    top.legend(fontsize=8)
    top.set_title(f"One long generation at budget_tokens={budget_tokens}")
    bottom.set_ylabel(f"KL(full || policy) lower\nbound, mean per {WINDOW} steps")
    bottom.set_xlabel("decode step")
    bottom.set_ylim(bottom=0)
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    if sys.argv[1:] == ["--plot-only"]:  # redraw from results/longgen.json
        import json

        data = json.loads((common.RESULTS / "longgen.json").read_text())
        plot(data["rows"], data["budget_tokens"], common.RESULTS / "longgen.png")
    else:
        main()
