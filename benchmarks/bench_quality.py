"""Quality vs KV budget: retrieval accuracy and generation drift of every policy, through vLLM.

One engine serves everything: its default ``kv_eviction`` config is overridden per request
(``SamplingParams.extra_args``), so every (prompt x policy x budget) request runs in the same
engine, greedy, on the embedded SmolLM2-135M (float32; ``--model gemma3``: Gemma-3-270M, a
hybrid sliding-window model evicted in its full-attention layers). The full cache is policy ``full`` with
budget 1.0: the request overrides the policy to ``none``, so the plugin does not track it.

Prefix caching: for each group of prompts the full-cache requests run first; the evicting
requests of the same prompts then hit the prefix cache for every block but the last one, which
vLLM recomputes. Prompt lengths are multiples of the block size (32), so that recomputed block
is exactly the 32-query observation window the windowed policies score (their window is the
queries computed in the prompt's last step). ``--check-prefix-cache`` reruns one prompt per
policy with the prefix cache reset and reports whether the tokens are the same.

Retrieval: tasks.py prompts (passkey, needle, multifact) at the profile's context lengths and
depths; correct iff the first number generated is the expected one; Wilson 95 % intervals.
``kept_fraction`` is the KV the request really kept after the first decision (whole blocks;
sink and recent tokens are protected, so it can exceed the nominal budget on short prompts).

Drift: a varied text and an open instruction; each policy generates ``drift_tokens`` tokens
greedily (eviction keeps running every ``interval`` decode steps) with its top-K logprobs. The
full cache then reads the same prompt + generated tokens (prompt_logprobs, no eviction): at every
generated position we have the full cache's distribution p and the policy's q on the very same
prefix. Reported: top-1 agreement (the policy's greedy token is the full cache's argmax) and a
KL(p || q) lower bound: KL of p and q coarsened to the tokens present in both top-K lists plus
one bucket for the rest (coarsening never increases KL). The ``full`` row is a control (decode
path vs prefill path numerics).

    python benchmarks/bench_quality.py --profile quick      # ~4-5 min on 2 cores
    python benchmarks/bench_quality.py --profile full       # ~25 min

Writes ``results/quality.json`` and ``results/quality_samples.csv`` (``--model gemma3``:
``quality_gemma3.json``, ``quality_gemma3_samples.csv``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests", "support"))  # engine_helpers

import common  # noqa: E402

BLOCK_SIZE = 32
TOP_K = 10  # logprobs per step for the drift measure
GROUP_TOKENS = 32768  # prompt tokens per prefix-cache group (the pool holds ~90k tokens)
WAVE = 48  # requests per generate() call: the scheduler keeps the last 64 eviction logs


POLICIES: list[str] = []  # main(): --policies, by default common.compared_policies()


def configs() -> list[tuple[str, float]]:
    return [(common.FULL, 1.0)] + [(p, b) for p in POLICIES for b in common.BUDGETS]


def kv_args(policy: str, budget: float) -> dict:
    # full cache: eviction off for the request (not tracked by the plugin at all)
    return {"policy": "none"} if policy == common.FULL else {"policy": policy, "budget": budget}


#: --model: the embedded text models (``vllm_kvevict.models``), what the results are named
MODELS = {
    "smollm2": ("SmolLM2-135M-Instruct (embedded, float32)", ""),
    "gemma3": ("Gemma-3-270M base (embedded, float32; 15 sliding-window layers of 512 tokens, "
               "3 full-attention layers: eviction in the full ones)", "_gemma3"),
}


def build_llm(model: str = "smollm2", server_policy: str = "streamingllm"):
    from engine_helpers import make_llm

    from vllm_kvevict.models import model_path

    return make_llm(
        {"kv_eviction": {"policy": server_policy, "budget": 0.5}},
        model=str(model_path(model)),
        max_model_len=8192,  # SmolLM2's max_position_embeddings; 4k prompts + answers fit
        max_num_seqs=32,
        enable_prefix_caching=True,
        # whole prompts in one step: a windowed policy's window is the queries computed in the
        # prompt's last step, which a short last chunk would truncate
        enable_chunked_prefill=False,
        max_num_batched_tokens=8192,
    )


def kept_fraction(logs: dict, request_id: str) -> float:
    """Share of the sequence's KV kept after the request's first eviction decision."""
    matches = [v for k, v in logs.items() if k == request_id or k.startswith(f"{request_id}-")]
    if not matches or not matches[-1]:
        return 1.0
    committed, excluded = matches[-1][0]
    return 1.0 - len(excluded) * BLOCK_SIZE / committed


def generate(llm, jobs: list[dict], **sampling) -> list:
    """Run ``jobs`` ({"ids", "policy", "budget"}) in waves; adds "kept_fraction"; returns outputs."""
    from engine_helpers import scheduler
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    outputs = []
    for start in range(0, len(jobs), WAVE):
        wave = jobs[start:start + WAVE]
        prompts = [TokensPrompt(prompt_token_ids=j["ids"]) for j in wave]
        params = [SamplingParams(temperature=0, extra_args={"kv_eviction": kv_args(j["policy"], j["budget"])},
                                 **sampling) for j in wave]
        outs = llm.generate(prompts, params, use_tqdm=False)
        logs = scheduler(llm).kv_book.finished_logs
        for j, out in zip(wave, outs):
            j["kept_fraction"] = kept_fraction(logs, out.request_id)
        outputs += outs
    return outputs


def groups(samples, limit: int = GROUP_TOKENS):
    group, tokens = [], 0
    for s in samples:
        if group and tokens + len(s.token_ids) > limit:
            yield group
            group, tokens = [], 0
        group.append(s)
        tokens += len(s.token_ids)
    if group:
        yield group


def run_retrieval(llm, samples) -> list[dict]:
    from tasks import extract_answer, is_correct

    records = []
    evicting = [c for c in configs() if c[0] != common.FULL]
    for group in groups(samples):
        # full cache first: its prefill fills the prefix cache for the evicting requests
        jobs = [{"sample": s, "ids": s.token_ids, "policy": common.FULL, "budget": 1.0} for s in group]
        jobs += [{"sample": s, "ids": s.token_ids, "policy": p, "budget": b}
                 for s in group for p, b in evicting]
        full, rest = jobs[:len(group)], jobs[len(group):]
        outs = generate(llm, full, max_tokens=common.MAX_TOKENS, logprobs=0)
        outs += generate(llm, rest, max_tokens=common.MAX_TOKENS, logprobs=0)
        for j, out in zip(full + rest, outs):
            s, text = j["sample"], out.outputs[0].text
            records.append({
                "task": s.task, "context_tokens": s.context_tokens, "depth": s.depth,
                "seed": s.seed, "policy": j["policy"], "budget": j["budget"],
                "answer": s.answer, "output": text, "extracted": extract_answer(text),
                "correct": is_correct(text, s.answer), "kept_fraction": j["kept_fraction"],
                "cached_tokens": out.num_cached_tokens,
                "token_ids": list(out.outputs[0].token_ids),
                "logprobs": _token_logprobs(out.outputs[0]),
            })
        print(f"  {len(records)} requests done", flush=True)
    return records


def _token_logprobs(completion) -> list[float]:
    return [lp[t].logprob for t, lp in zip(completion.token_ids, completion.logprobs or [])]


def check_prefix_cache(llm, sample, records, budget: float = 0.1) -> dict:
    """Rerun ``sample`` per policy with an empty prefix cache; compare with the cached run."""
    out = {}
    for policy in POLICIES:
        warm = next(r for r in records if r["seed"] == sample.seed and r["policy"] == policy
                    and r["budget"] == budget)
        llm.reset_prefix_cache()
        job = {"ids": sample.token_ids, "policy": policy, "budget": budget}
        cold = generate(llm, [job], max_tokens=common.MAX_TOKENS, logprobs=0)[0]
        cold_lp = _token_logprobs(cold.outputs[0])
        same = list(cold.outputs[0].token_ids) == warm["token_ids"]
        out[policy] = {
            "budget": budget, "warm_cached_tokens": warm["cached_tokens"],
            "cold_cached_tokens": cold.num_cached_tokens, "same_tokens": same,
            "same_kept_fraction": job["kept_fraction"] == warm["kept_fraction"],
            "max_abs_logprob_diff": max((abs(a - b) for a, b in zip(cold_lp, warm["logprobs"])),
                                        default=0.0) if same else None,
        }
    return out


def coarse_kl(p: dict[int, float], q: dict[int, float]) -> float:
    """KL(p || q) of two distributions known by some of their log-probabilities, coarsened to
    the tokens known in both plus one bucket for all others: a lower bound of the true KL."""
    common_tokens = p.keys() & q.keys()
    kl, p_in, q_in = 0.0, 0.0, 0.0
    for t in common_tokens:
        pt, qt = math.exp(p[t]), math.exp(q[t])
        kl += pt * (p[t] - q[t])
        p_in += pt
        q_in += qt
    p_rest, q_rest = max(1.0 - p_in, 0.0), max(1.0 - q_in, 0.0)
    if p_rest > 1e-9:
        kl += p_rest * (math.log(p_rest) - math.log(max(q_rest, 1e-12)))
    return max(kl, 0.0)


def drift_steps(reference: list[dict], generated: list[dict], tokens: list[int]) -> list[tuple[bool, float]]:
    """Per generated step: (policy token == full-cache argmax, coarse KL(full || policy))."""
    steps = []
    for p, q, tok in zip(reference, generated, tokens):
        top = min(p, key=lambda t: p[t][1])  # rank 1
        pl = {t: v[0] for t, v in p.items()}
        ql = {t: v[0] for t, v in q.items()}
        steps.append((top == tok, coarse_kl(pl, ql)))
    return steps


def run_drift(llm, profile: dict) -> list[dict]:
    from tasks import drift_prompt

    prompts = [drift_prompt(profile["drift_context"], i, common.SEED) for i in range(profile["drift_prompts"])]
    n_tokens = profile["drift_tokens"]
    jobs = [{"ids": ids, "policy": p, "budget": b, "prompt": i}
            for i, ids in enumerate(prompts) for p, b in configs()]
    full = [j for j in jobs if j["policy"] == common.FULL]
    rest = [j for j in jobs if j["policy"] != common.FULL]
    outs = generate(llm, full, max_tokens=n_tokens, ignore_eos=True, logprobs=TOP_K)
    outs += generate(llm, rest, max_tokens=n_tokens, ignore_eos=True, logprobs=TOP_K)
    jobs = full + rest
    # the full cache reads prompt + generated tokens (no eviction): p at every generated step;
    # one reference per distinct sequence (policies often generate the same tokens)
    sequences = {tuple(j["ids"] + list(o.outputs[0].token_ids)): None for j, o in zip(jobs, outs)}
    refs = [{"ids": list(seq), "policy": common.FULL, "budget": 1.0} for seq in sequences]
    for seq, ref in zip(sequences, generate(llm, refs, max_tokens=1, prompt_logprobs=TOP_K)):
        sequences[seq] = ref
    per_config: dict[tuple, list] = {}
    for j, out in zip(jobs, outs):
        ref = sequences[tuple(j["ids"] + list(out.outputs[0].token_ids))]
        n_prompt = len(j["ids"])
        p = [{t: (lp.logprob, lp.rank) for t, lp in d.items()} for d in ref.prompt_logprobs[n_prompt:]]
        q = [{t: (lp.logprob, lp.rank) for t, lp in d.items()} for d in out.outputs[0].logprobs]
        steps = drift_steps(p, q, list(out.outputs[0].token_ids))
        per_config.setdefault((j["policy"], j["budget"]), []).append((steps, j["kept_fraction"]))
    rows = []
    for (policy, budget), runs in per_config.items():
        steps = [s for run, _ in runs for s in run]
        rows.append({
            "policy": policy, "budget": budget, "context_tokens": profile["drift_context"],
            "prompts": len(runs), "steps": len(steps),
            "top1_agreement": sum(a for a, _ in steps) / len(steps),
            "kl_lower_bound_mean": sum(k for _, k in steps) / len(steps),
            "kl_lower_bound_max": max(k for _, k in steps),
            "kept_fraction": sum(k for _, k in runs) / len(runs),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(common.PROFILES), default="quick")
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2",
                        help="embedded model (gemma3 writes quality_gemma3.json)")
    parser.add_argument("--no-drift", action="store_true", help="skip the drift measure")
    parser.add_argument("--no-check-prefix-cache", action="store_true")
    parser.add_argument("--policies", default="",
                        help="comma-separated registered policies (default: every compared "
                        "method, common.compared_policies())")
    parser.add_argument("--server-policy", default="streamingllm",
                        help="the engine's default policy (every request overrides it; a LaProx "
                        "default keeps the projected-value norms per KV slot)")
    args = parser.parse_args()
    try:
        POLICIES[:] = common.check_policies(args.policies) or common.compared_policies()
    except ValueError as exc:
        parser.error(str(exc))
    common.engine_env()
    os.environ.setdefault("KVEVICT_EVICTION_LOG", "1")  # kept_fraction reads the log
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    profile = common.PROFILES[args.profile]
    import tasks

    tasks.use_model(args.model)
    model_name, suffix = MODELS[args.model]
    samples = common.profile_samples(profile)
    started = time.perf_counter()
    llm = build_llm(args.model, args.server_policy)
    engine_s = time.perf_counter() - started
    print(f"engine ready in {engine_s:.0f} s; {len(samples)} prompts x {len(configs())} configs", flush=True)
    records = run_retrieval(llm, samples)
    retrieval_s = time.perf_counter() - started - engine_s
    check = {} if args.no_check_prefix_cache else check_prefix_cache(llm, samples[0], records)
    drift = [] if args.no_drift else run_drift(llm, profile)
    rows = common.accuracy_rows(records, "policy")
    kept: dict[tuple, list[float]] = {}
    for r in records:
        kept.setdefault((r["task"], r["context_tokens"], r["policy"], r["budget"]), []).append(r["kept_fraction"])
    for row in rows:
        k = kept[(row["task"], row["context_tokens"], row["policy"], row["budget"])]
        row["kept_fraction"] = sum(k) / len(k)
    result = {
        "command": common.command(), "profile": args.profile, "settings": profile,
        "budgets": common.BUDGETS, "policies": [common.FULL, *POLICIES],
        "engine": {"model": model_name, "block_size": BLOCK_SIZE,
                   "max_model_len": 8192, "prefix_caching": True, "chunked_prefill": False,
                   "greedy": True, "max_tokens": common.MAX_TOKENS, "seed": common.SEED},
        "versions": common.versions(), "machine": common.machine(),
        "timing_s": {"engine_start": engine_s, "retrieval": retrieval_s,
                     "total": time.perf_counter() - started},
        "rows": rows, "drift": drift, "prefix_cache_check": check,
    }
    common.write_json(f"quality{suffix}.json", result)
    common.write_csv(f"quality{suffix}_samples.csv", [
        {k: v for k, v in r.items() if k not in ("token_ids", "logprobs")} for r in records])
    common.print_pooled(rows, "policy", "Retrieval accuracy, vLLM + plugin")
    if drift:
        print("\nDrift vs full cache over", drift[0]["steps"] // max(drift[0]["prompts"], 1),
              "generated tokens per prompt")
        print(common.markdown_table(
            ["policy", "budget", "top-1 agreement", "KL lower bound (mean)", "kept"],
            [[d["policy"], d["budget"], d["top1_agreement"], d["kl_lower_bound_mean"], d["kept_fraction"]]
             for d in drift]))
    if check:
        print("\nprefix-cache check (cold vs cached, same tokens):",
              {p: c["same_tokens"] for p, c in check.items()})
    print(f"\ntotal {time.perf_counter() - started:.0f} s; wrote results/quality{suffix}.json",
          flush=True)


if __name__ == "__main__":
    main()
