"""Natural-text haystack at tight budgets: accuracy per policy, budget and protection arm, plus
what each request kept (which positional blocks, the answer's block, its score rank).

Same engine as bench_quality.py (``build_llm``: block 32, max_model_len 8192, prefix caching,
no chunked prefill, greedy, 10 tokens). Task ``natural`` (tasks.py). Per request two protection
arms, same engine, per-request config:

* ``new``: the default protection (scales with the budget, config.EvictionConfig.protection);
* ``old``: explicit ``sink_tokens: 4, recent_tokens: 64`` (the behaviour before that change).

Every evicting request's first decision is recorded by wrapping ``Decisions.decide``:
the block scores it saw, the protected blocks and the blocks it excluded, so the answer block's
fate and rank are read from the engine itself.

    python benchmarks/bench_natural.py                       # 1536 x 12 and 4608 x 8 prompts
    python benchmarks/bench_natural.py --contexts 1536 --prompts 12 --budgets 0.1,0.05

Writes ``results/natural.json`` (one row per request) and prints the tables; ``--experiment
NAME`` folds a one-off run (other policies, ``--variants``, lengths, ``--profile``) into that
file's ``experiments[NAME]`` instead, where results/natural.md cites it.
``--capture DIR`` also saves the prefill statistics of one laprox request per prompt (window
attention, projected-value norms) for offline diagnosis (benchmarks/diagnose_natural.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests", "support"))  # engine_helpers

import common  # noqa: E402

BLOCK = 32
ARMS = {"new": {}, "old": {"sink_tokens": 4, "recent_tokens": 64}}
DECISIONS: dict[str, dict] = {}


def depths(n: int) -> list[float]:
    return [round(0.1 + 0.8 * i / max(n - 1, 1), 4) for i in range(n)]


def answer_span(sample) -> tuple[int, int]:
    """[start, end) token positions of the access code's digits in the prompt."""
    from tasks import NATURAL_FACT, encode

    fact = encode(NATURAL_FACT.format(value=sample.answer))
    ids = sample.token_ids
    for i in range(len(ids) - len(fact) + 1):
        if ids[i:i + len(fact)] == fact:
            prefix = encode(NATURAL_FACT.split("{value}")[0])
            assert fact[:len(prefix)] == prefix
            digits = len(fact) - len(prefix) - 1  # the final "." is one token
            start = i + len(prefix)
            return start, start + digits
    raise AssertionError("fact not found")


def install_decision_hook() -> None:
    from vllm_kvevict.adapter.budget import request_budget
    from vllm_kvevict.adapter.decisions import Decisions
    from vllm_kvevict.adapter.request_state import committed_tokens

    original = Decisions.decide

    def decide(self, deciding):
        snaps = {}
        for request, state in deciding:
            req_id = request.request_id
            if req_id in DECISIONS:
                continue
            committed = committed_tokens(request)
            positions = self.ledger.resident_array(req_id)
            budget = request_budget(state.config, committed, request.num_prompt_tokens,
                                    self.block_size)
            scored, _ = state.scores_at(positions)
            protected = budget.protected(positions, None if scored is None else ~scored)
            snaps[req_id] = {"committed": committed, "positions": positions.tolist(),
                             "scores": dict(state.scores),
                             "protected": positions[protected].tolist(),
                             "keep_blocks": budget.keep_blocks}
        original(self, deciding)
        for req_id, snap in snaps.items():
            snap["excluded"] = np.flatnonzero(self.ledger.excluded_mask(req_id)).tolist()
            if snap["excluded"]:
                DECISIONS[req_id] = snap

    Decisions.decide = decide


def disable_prefix_cap() -> None:
    """The scheduler before its prefix-hit cap: the hit vLLM finds is used as is."""
    from vllm_kvevict.adapter import admission

    admission.cap_prefix_hit = lambda request, found, **_: found


def find_decision(request_id: str) -> dict | None:
    hits = [v for k, v in DECISIONS.items() if k == request_id or k.startswith(f"{request_id}-")]
    return hits[-1] if hits else None


def run_jobs(llm, jobs: list[dict]) -> None:
    from tasks import extract_answer, is_correct
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    wave = 48
    for start in range(0, len(jobs), wave):
        part = jobs[start:start + wave]
        prompts = [TokensPrompt(prompt_token_ids=j["sample"].token_ids) for j in part]
        params = [SamplingParams(temperature=0, max_tokens=common.MAX_TOKENS,
                                 extra_args={"kv_eviction": j["kv"]}) for j in part]
        outs = llm.generate(prompts, params, use_tqdm=False)
        for j, out in zip(part, outs):
            text = out.outputs[0].text
            j["output"], j["extracted"] = text, extract_answer(text)
            j["correct"] = is_correct(text, j["sample"].answer)
            j["cached_tokens"] = out.num_cached_tokens
            j["decision"] = find_decision(out.request_id)


def record(j: dict) -> dict:
    s = j["sample"]
    a0, a1 = answer_span(s) if s.task == "natural" else (0, 0)
    answer_blocks = sorted({p // BLOCK for p in range(a0, a1)})
    row = {"prompt_id": s.seed, "task": s.task, "context_tokens": s.context_tokens, "depth": s.depth,
           "policy": j["policy"], "budget": j["budget"], "arm": j["arm"], "answer": s.answer,
           "output": j["output"], "extracted": j["extracted"], "correct": j["correct"],
           "cached_tokens": j["cached_tokens"], "answer_tokens": [a0, a1],
           "answer_blocks": answer_blocks, "kept_fraction": 1.0}
    d = j.get("decision")
    if d:
        excluded = set(d["excluded"])
        kept = [p for p in d["positions"] if p not in excluded]
        scored = sorted(((sc, p) for p, sc in d["scores"].items() if p not in d["protected"]),
                        reverse=True)
        rank = {p: i + 1 for i, (_, p) in enumerate(scored)}
        row.update({
            "kept_fraction": 1.0 - len(excluded) * BLOCK / d["committed"],
            "num_blocks": len(d["positions"]), "keep_blocks": d["keep_blocks"],
            "protected_blocks": d["protected"], "kept_blocks": kept,
            "scored_kept_blocks": [p for p in kept if p not in d["protected"]],
            "answer_blocks_kept": [b in kept for b in answer_blocks],
            # rank among the unprotected (scored) blocks, 1 = best; None if protected
            "answer_block_rank": [rank.get(b) for b in answer_blocks],
            "num_scored": len(scored),
        })
    return row


def kv_config(label: str, budget: float, arm: str, options: dict, variants: dict) -> dict:
    policy, opts = variants.get(label, (label, options.get(label)))
    return {"policy": policy, "budget": budget, **ARMS[arm], **({"options": opts} if opts else {})}


def install_capture(out_dir: str) -> list:
    """Save the prefill RequestStatistics that laprox sees (window attention + value norms)."""
    import torch

    from vllm_kvevict.policies.laprox import LaProxPolicy

    captured: list = []
    original = LaProxPolicy.block_scores

    def block_scores(self, stats, state):
        if CAPTURE["on"] and stats.phase == "prefill" and stats.window_attn is not None:
            captured.append({k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v)
                             for k, v in vars(stats).items()})
        return original(self, stats, state)

    LaProxPolicy.block_scores = block_scores
    os.makedirs(out_dir, exist_ok=True)
    return captured


CAPTURE = {"on": False}


def summarize(rows: list[dict]) -> list[dict]:
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["context_tokens"], r["policy"], r["budget"], r["arm"]), []).append(r)
    out = []
    for (ctx, policy, budget, arm), rs in sorted(cells.items(), key=lambda kv: (
            kv[0][0], kv[0][1] != common.FULL, kv[0][1], -kv[0][2], kv[0][3])):
        c, n = sum(r["correct"] for r in rs), len(rs)
        lo, hi = common.wilson(c, n)
        kept_ans = [all(r["answer_blocks_kept"]) for r in rs
                    if r.get("answer_blocks_kept")]
        out.append({"context_tokens": ctx, "policy": policy, "budget": budget, "arm": arm,
                    "correct": c, "n": n, "accuracy": c / n, "ci_low": lo, "ci_high": hi,
                    "kept_fraction": sum(r["kept_fraction"] for r in rs) / n,
                    "answer_kept": sum(kept_ans), "answer_kept_n": len(kept_ans)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="1536,4608")
    parser.add_argument("--prompts", default="12,8", help="prompts per context (comma list)")
    parser.add_argument("--budgets", default="0.1,0.05")
    parser.add_argument("--policies", default="",
                        help="comma-separated registered policies or --variants labels "
                        "(default: every compared method, common.compared_policies())")
    parser.add_argument("--arms", default="new,old")
    parser.add_argument("--options", default="{}",
                        help='JSON {policy: {option: value}} applied to every request of it')
    parser.add_argument("--variants", default="{}",
                        help='JSON {label: [policy, {options}]}: extra policy labels for --policies')
    parser.add_argument("--capture", default="", help="save laprox prefill stats here (1st ctx)")
    parser.add_argument("--no-prefix-cap", action="store_true",
                        help="measure without the scheduler's prefix-hit cap (a windowed policy "
                             "then sees only the queries the prefix cache leaves to compute)")
    parser.add_argument("--out", default="natural.json")
    parser.add_argument("--experiment", default="",
                        help="a one-off run: fold it into --out's experiments[NAME] (the "
                             "results pages cite it there) instead of replacing the file")
    parser.add_argument("--profile", default="", choices=["", *sorted(common.PROFILES)],
                        help="instead of the natural task: that bench_quality profile's prompts "
                             "(templated tasks), with the same arms and per-request records")
    args = parser.parse_args()
    import json

    options = json.loads(args.options)
    variants = {k: tuple(v) for k, v in json.loads(args.variants).items()}
    contexts = [int(c) for c in args.contexts.split(",")]
    counts = [int(c) for c in args.prompts.split(",")]
    counts += [counts[-1]] * (len(contexts) - len(counts))
    budgets = [float(b) for b in args.budgets.split(",")]
    common.check_policies([p for p, _ in variants.values()])
    policies = (common.check_policies(args.policies, labels=variants)
                or common.compared_policies())
    arms = [a for a in args.arms.split(",") if a]
    common.engine_env()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    from bench_quality import build_llm, groups
    from tasks import make_samples

    install_decision_hook()
    if args.no_prefix_cap:
        disable_prefix_cap()
    captured = install_capture(args.capture) if args.capture else None
    started = time.perf_counter()
    llm = build_llm()
    engine_s = time.perf_counter() - started
    print(f"engine ready in {engine_s:.0f} s", flush=True)
    rows, timing = [], {"engine_start": engine_s}
    result = {"command": common.command(), "task": "natural", "contexts": contexts,
              "prompts": dict(zip(contexts, counts)), "budgets": budgets, "policies": policies,
              "arms": {a: ARMS[a] for a in arms}, "options": options, "variants": variants,
              "prefix_cap": not args.no_prefix_cap,
              "engine": "bench_quality.build_llm (block 32, max_model_len 8192, prefix caching, "
                        "no chunked prefill, greedy, max_tokens 10, float32 SmolLM2-135M)",
              "versions": common.versions(), "machine": common.machine(), "timing_s": timing}
    if args.profile:
        profile = common.PROFILES[args.profile]
        contexts, counts = list(profile["contexts"]), [0] * len(profile["contexts"])
        result.update(task=list(profile["tasks"]), contexts=contexts, prompts=args.profile)
    for ctx, n in zip(contexts, counts):
        t0 = time.perf_counter()
        if args.profile:
            samples = [s for s in common.profile_samples(profile) if s.context_tokens == ctx]
        else:
            samples = make_samples("natural", ctx, depths(n), 1, common.SEED)
        for group in groups(samples):
            jobs = [{"sample": s, "policy": common.FULL, "budget": 1.0, "arm": "-",
                     "kv": {"policy": "none"}} for s in group]
            run_jobs(llm, jobs)
            if captured is not None and ctx == contexts[0]:
                CAPTURE["on"] = True
                for s in group:
                    before = len(captured)
                    cj = [{"sample": s, "policy": "laprox", "budget": 0.1, "arm": "capture",
                           "kv": {"policy": "laprox", "budget": 0.1}}]
                    run_jobs(llm, cj)
                    if len(captured) > before:
                        captured[-1]["prompt_id"] = s.seed
                        captured[-1]["answer_tokens"] = list(answer_span(s))
                CAPTURE["on"] = False
            ev = [{"sample": s, "policy": p, "budget": b, "arm": a,
                   "kv": kv_config(p, b, a, options, variants)}
                  for s in group for p in policies for b in budgets for a in arms]
            run_jobs(llm, ev)
            rows += [record(j) for j in jobs + ev]
            print(f"  ctx {ctx}: {len(rows)} rows, {time.perf_counter() - t0:.0f} s", flush=True)
        timing[f"ctx_{ctx}"] = time.perf_counter() - t0
        result["rows"], result["summary"] = rows, summarize(rows)
        common.write_json(args.out, result, args.experiment)
        if captured is not None and ctx == contexts[0]:
            import torch

            torch.save(captured, os.path.join(args.capture, "stats.pt"))
            print(f"  captured {len(captured)} prefill stats", flush=True)
    timing["total"] = time.perf_counter() - started
    common.write_json(args.out, result, args.experiment)
    print(common.markdown_table(
        ["ctx", "policy", "budget", "arm", "correct/n", "95 % CI", "kept", "answer block kept"],
        [[r["context_tokens"], r["policy"], r["budget"], r["arm"], f"{r['correct']}/{r['n']}",
          f"{r['ci_low']:.2f}-{r['ci_high']:.2f}", r["kept_fraction"],
          f"{r['answer_kept']}/{r['answer_kept_n']}"] for r in result["summary"]]))
    print(f"total {timing['total']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
