"""Prompts larger than the KV pool: stock vLLM vs prefill eviction on one small fixed pool.

The pool is 64 blocks of 32 tokens (63 usable: 2,016 tokens) for ``max_model_len`` 7,000 and
prompt chunks of 120 tokens (so chunks end inside blocks). Stock vLLM is started on it first
(it refuses: the pool cannot hold one ``max_model_len`` request); then the plugin with
``prefill_eviction`` serves pass-key prompts of increasing length at 25 % and 10 % budgets,
each answer checked, with the most blocks the request held at once.

    python benchmarks/bench_prefill.py            # ~10 min

Writes ``results/prefill.json``.

``--accuracy``: retrieval accuracy vs budget with prefill eviction off, and on with each way
of scoring the middle chunks (``prefill_query``: the chunk's own queries, the question probe,
keywords), the same prompts (``tasks.py`` pass key, needle, natural text and look-alike facts,
``ACC_CONTEXT`` tokens, three depths) on a pool large enough for all, chunks of ``ACC_CHUNK``
tokens; then ``SMALL_CONTEXT``-token needle prompts on a pool smaller than the prompt. Writes
``results/prefill_accuracy.json``.

    python benchmarks/bench_prefill.py --accuracy # ~20 min
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "support"))

import common  # noqa: E402

POOL_BLOCKS, BLOCK, MAX_LEN, CHUNK = 64, 32, 7000, 120
REPEATS = (48, 100, 134)  # pass-key prompts of ~2.3k, ~4.8k and ~6.5k tokens
#: the policies of the published runs (results/prefill.json, prefill_accuracy.json), checked
#: against the registry when a run starts
POLICIES = ("laprox", "snapkv", "attention", "h2o", "streamingllm")
BUDGETS = (0.25, 0.1)
KEY = "71432"
ACC_CONTEXT, ACC_CHUNK, ACC_DEPTHS, ACC_PER_DEPTH = 1024, 256, (0.25, 0.5, 0.75), 4
#: --accuracy: the two policies its runs compare (checked against the registry when it starts)
ACC_POLICIES, ACC_BUDGETS = ("snapkv", "laprox"), (0.25, 0.1)
#: pass key and needle in varied text, and two tasks the question mechanisms were not tuned
#: on: ordinary text with one access code (natural) and look-alike facts (multifact)
ACC_TASKS = ("passkey", "needle", "natural", "multifact")
#: what scores the middle chunks (``prefill_query``)
ACC_QUERIES = ("chunk", "probe", "keywords")
#: a pool smaller than the prompt: needle prompts of SMALL_CONTEXT tokens on SMALL_POOL blocks
SMALL_CONTEXT, SMALL_POOL, SMALL_BUDGET = 2304, 48, 0.25


def _score(llm, samples, kv) -> tuple[int, list[dict]]:
    """Correct answers of ``samples`` under per-request ``kv``, and each request's report."""
    import tasks
    from engine_helpers import sampling
    from vllm.inputs import TokensPrompt

    llm.reset_prefix_cache()
    prompts = [TokensPrompt(prompt_token_ids=s.token_ids) for s in samples]
    outs = llm.generate(prompts, [sampling(kv, max_tokens=10)] * len(prompts), use_tqdm=False)
    reports = [(o.kv_transfer_params or {}).get("kv_eviction") or {} for o in outs]
    return sum(tasks.is_correct(o.outputs[0].text, s.answer) for o, s in zip(outs, samples)), reports


def _runs(policies, budgets):
    """(label, per-request kv) of the full cache, then per policy and budget: prefill eviction
    off, then on with each ``prefill_query``."""
    yield "full", 1.0, False, None, {"policy": "none"}
    for policy in policies:
        for budget in budgets:
            yield policy, budget, False, None, {"policy": policy, "budget": budget,
                                                "prefill_eviction": False}
            for query in ACC_QUERIES:
                yield policy, budget, True, query, {"policy": policy, "budget": budget,
                                                    "prefill_eviction": True,
                                                    "prefill_query": query}


def accuracy() -> None:
    """Prefill eviction off vs on with each way of scoring the middle chunks (the same samples,
    policies and budgets, one engine whose pool holds every prompt whole); then needle prompts
    on a pool smaller than the prompt (a second engine), against the first engine's full
    cache and prefill-eviction-off rows for the same prompts."""
    import tasks
    from engine_helpers import make_llm, shutdown

    common.check_policies(ACC_POLICIES)
    started = time.perf_counter()
    llm = make_llm({"kv_eviction": {"policy": "snapkv", "budget": 0.25}},
                   max_model_len=SMALL_CONTEXT + 64, max_num_batched_tokens=ACC_CHUNK)
    rows = []

    def measure(engine, task, samples, context, small=False, runs=None):
        for policy, budget, on, query, kv in runs or _runs(ACC_POLICIES, ACC_BUDGETS):
            t0 = time.perf_counter()
            correct, reports = _score(engine, samples, kv)
            attended = [r.get("attended_tokens", 0) / max(r.get("total_tokens", 1), 1)
                        for r in reports]
            rows.append({"task": task, "context_tokens": context, "policy": policy,
                         "budget": budget, "prefill_eviction": on, "prefill_query": query,
                         "small_pool": small, "correct": correct,
                         "n": len(samples), "attended_share": sum(attended) / len(attended),
                         "seconds": time.perf_counter() - t0})
            print(f"  {task:9s} {'small pool ' if small else ''}{policy:7s} {budget:4.2f} "
                  f"prefill_eviction={on!s:5s} {query or '':8s} {correct}/{len(samples)}",
                  flush=True)

    for task in ACC_TASKS:
        measure(llm, task, tasks.make_samples(task, ACC_CONTEXT, ACC_DEPTHS, ACC_PER_DEPTH),
                ACC_CONTEXT)
    long_samples = tasks.make_samples("needle", SMALL_CONTEXT, ACC_DEPTHS, ACC_PER_DEPTH)
    measure(llm, "needle", long_samples, SMALL_CONTEXT, runs=[
        r for r in _runs(ACC_POLICIES, (SMALL_BUDGET,)) if not r[2]])
    shutdown(llm)
    small = make_llm({"kv_eviction": {"policy": "snapkv", "budget": SMALL_BUDGET,
                                      "prefill_eviction": True}},
                     num_gpu_blocks_override=SMALL_POOL, max_model_len=SMALL_CONTEXT + 64,
                     max_num_batched_tokens=ACC_CHUNK)
    measure(small, "needle", long_samples, SMALL_CONTEXT, small=True, runs=[
        r for r in _runs(ACC_POLICIES, (SMALL_BUDGET,)) if r[2]])
    shutdown(small)
    common.write_json("prefill_accuracy.json", {
        "command": common.command(), "versions": common.versions(), "machine": common.machine(),
        "context_tokens": ACC_CONTEXT, "chunk_tokens": ACC_CHUNK, "depths": list(ACC_DEPTHS),
        "per_depth": ACC_PER_DEPTH, "small_pool": {"context_tokens": SMALL_CONTEXT,
                                                   "pool_tokens": (SMALL_POOL - 1) * BLOCK,
                                                   "budget": SMALL_BUDGET},
        "rows": rows, "total_s": time.perf_counter() - started,
    })
    print(f"total {time.perf_counter() - started:.0f} s; wrote results/prefill_accuracy.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--accuracy", action="store_true",
                        help="accuracy vs budget with prefill eviction on and off instead")
    args = parser.parse_args()
    policies = common.check_policies(args.policies)
    common.engine_env()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if args.accuracy:
        accuracy()
        return
    from engine_helpers import make_llm, passkey_prompt, sampling, scheduler, shutdown

    started = time.perf_counter()
    engine = dict(num_gpu_blocks_override=POOL_BLOCKS, max_model_len=MAX_LEN,
                  max_num_batched_tokens=CHUNK)
    try:
        shutdown(make_llm(None, **engine))
        stock = {"started": True}
    except Exception as exc:  # vLLM refuses the pool (raised from the engine core)
        text = str(exc)
        while exc.__cause__ is not None and "max seq len" not in text:
            exc = exc.__cause__
            text = str(exc)
        stock = {"started": False, "error": text[:300]}
    print("stock vLLM:", stock, flush=True)

    llm = make_llm({"kv_eviction": {"policy": "laprox", "budget": 0.25,
                                    "prefill_eviction": True}}, **engine)
    sched = scheduler(llm)
    pool_tokens = sched.kv_cache_manager.block_pool.get_num_free_blocks() * BLOCK
    peak = {"blocks": 0}
    original = sched.kv_cache_manager.allocate_slots

    def allocate_slots(request, *a, **k):
        out = original(request, *a, **k)
        peak["blocks"] = max(peak["blocks"], len(sched.ledger.resident_array(request.request_id)))
        return out

    sched.kv_cache_manager.allocate_slots = allocate_slots
    rows = []
    for repeats in REPEATS:
        prompt = passkey_prompt(KEY, repeats=repeats)
        for policy in policies:
            for budget in BUDGETS:
                llm.reset_prefix_cache()
                peak["blocks"] = 0
                t0 = time.perf_counter()
                out = llm.generate([prompt], sampling({"policy": policy, "budget": budget},
                                                      max_tokens=6), use_tqdm=False)[0]
                row = {"prompt_tokens": len(out.prompt_token_ids), "policy": policy,
                       "budget": budget, "correct": KEY in out.outputs[0].text,
                       "answer": out.outputs[0].text, "peak_blocks": peak["blocks"],
                       "peak_tokens": peak["blocks"] * BLOCK,
                       "prompt_over_pool": len(out.prompt_token_ids) / pool_tokens,
                       "seconds": time.perf_counter() - t0}
                rows.append(row)
                print(f"  {row['prompt_tokens']:5d} tok ({row['prompt_over_pool']:.2f}x pool) "
                      f"{policy:12s} {budget:4.2f}  correct={row['correct']!s:5s} "
                      f"peak {row['peak_tokens']} tok  {row['seconds']:.0f} s", flush=True)
    shutdown(llm)
    common.write_json("prefill.json", {
        "command": common.command(), "versions": common.versions(), "machine": common.machine(),
        "pool_blocks": POOL_BLOCKS - 1, "pool_tokens": pool_tokens, "block_size": BLOCK,
        "max_model_len": MAX_LEN, "chunk_tokens": CHUNK, "stock": stock, "rows": rows,
        "total_s": time.perf_counter() - started,
    })
    print(f"total {time.perf_counter() - started:.0f} s; wrote results/prefill.json")


if __name__ == "__main__":
    main()
