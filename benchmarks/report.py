"""Merge the benchmark results into ``summary.json``, the results pages and PNG plots.

Reads (each optional) the benchmarks' JSON/CSV in ``benchmarks/results/`` (quality.json,
kvpress.json, scheduler.json, serving.json, overhead.json, ...: ``PAGES`` lists them by page);
writes summary.json, accuracy_vs_budget.png, scheduler_cost.png and, when measured, drift.png,
and the generated parts of README.md (the one-screen summary) and of each page of ``PAGES``:
the blocks between ``<!-- report.py: NAME -->`` markers. Everything outside the markers is
written by hand and kept. Ratios are plugin / stock; a number that was not measured is null.

    python benchmarks/report.py [--results DIR] [--command "bash benchmarks/run.sh full"]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402

HEADLINE_BUDGETS = (0.1, 0.05)


def load(results: Path, name: str) -> dict | None:
    path = results / name
    if not path.is_file():
        return None
    with open(path) as f:
        return json.load(f)


def _number(value):
    return float(value) if isinstance(value, (int, float)) else None


def build_summary(results: Path, command: str | None = None) -> dict:
    quality, kvp = load(results, "quality.json"), load(results, "kvpress.json")
    sched = load(results, "scheduler.json")
    serving, overhead = load(results, "serving.json") or {}, load(results, "overhead.json") or {}
    fields = ("task", "context_tokens", "{m}", "budget", "accuracy", "n")

    def rows(data, method):
        keys = [f.format(m=method) for f in fields]
        return [{k: r[k] for k in keys} for r in (data or {}).get("rows", [])]

    versions: dict = {}
    for data in (sched, kvp, quality):  # quality last: its engine versions win
        versions.update((data or {}).get("versions", {}))
    return {
        "quality": rows(quality, "policy"),
        "kvpress": rows(kvp, "press"),
        "serving": {  # the key order
            "concurrency_ratio": _number(serving.get("concurrency_ratio")),
            "throughput_ratio": _number(serving.get("throughput_ratio")),
            "idle_overhead_ratio": _number(overhead.get("idle_overhead_ratio")),
            "blocks_per_request_ratio": _number(serving.get("blocks_per_request_ratio")),
            "answers_points_vs_stock": _number(serving.get("answers_points_vs_stock")),
            "headline": serving.get("headline"),
            "by_variant": serving.get("ratios"),  # every plugin variant / stock
        },
        "scheduler_ms": [{"requests": r["requests"], "blocks": r["blocks"], "ms": r["ms"]}
                         for r in (sched or {}).get("summary", [])],
        "command": command or "python benchmarks/report.py",
        "versions": versions,
    }


def pooled_accuracy(rows: list[dict], method_key: str) -> dict[tuple, tuple[float, int, float, float]]:
    """(method, budget) -> (accuracy, n, ci_low, ci_high) over every task and context."""
    out = {}
    for key, (correct, n) in common.pooled(
        [{**r, "correct": round(r["accuracy"] * r["n"])} for r in rows], method_key
    ).items():
        out[key] = (correct / n, n, *common.wilson(correct, n))
    return out


# -- plots -----------------------------------------------------------------------------------
def _budget_axis(ax) -> None:
    """Log-scaled budget axis labelled at the benchmark budgets only."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.set_xticks(list(common.BUDGETS))
    ax.set_xticklabels([f"{b:.0%}" for b in common.BUDGETS])
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_accuracy(summary: dict, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [("quality", "policy", "-", "o", "plugin"), ("kvpress", "press", "--", "s", "kvpress")]
    if not any(summary[s[0]] for s in series):
        return False
    fig, ax = plt.subplots(figsize=(10, 5))
    names = list(dict.fromkeys(r[key] for section, key, *_ in series for r in summary[section]
                               if r[key] != common.FULL))
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(names)}  # same method, same colour
    for section, key, style, marker, source in series:
        table = pooled_accuracy(summary[section], key)
        for method in dict.fromkeys(m for m, _ in table):
            if method == common.FULL:
                budgets = [b for m, b in table if m == method]
                acc = table[(method, budgets[0])][0]
                ax.axhline(acc, ls=style, color="grey", lw=1, label=f"{source}: full cache")
                continue
            budgets = sorted(b for m, b in table if m == method)
            acc = [table[(method, b)][0] for b in budgets]
            err = [[a - table[(method, b)][2] for a, b in zip(acc, budgets)],
                   [table[(method, b)][3] - a for a, b in zip(acc, budgets)]]
            ax.errorbar(budgets, acc, yerr=err, ls=style, marker=marker, capsize=2,
                        color=colors[method], label=f"{source}: {method}", alpha=0.85)
    _budget_axis(ax)
    ax.set_xlabel("KV budget (fraction of the prompt kept)")
    ax.set_ylabel("retrieval accuracy (all tasks, contexts)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Accuracy vs KV budget - SmolLM2-135M (bars: Wilson 95 %)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_scheduler(summary: dict, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["scheduler_ms"]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for n in sorted({r["requests"] for r in rows}):
        pts = sorted((r["blocks"], r["ms"]) for r in rows if r["requests"] == n)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{n} requests")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("blocks per request")
    ax.set_ylabel("ms per scheduling step (all deciding)")
    ax.set_title("Eviction decision cost (slowest policy)")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_drift(drift: list[dict], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [d for d in drift if d["policy"] != common.FULL]
    if not rows:
        return False
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for policy in dict.fromkeys(d["policy"] for d in rows):
        pts = sorted((d["budget"], d["top1_agreement"], d["kl_lower_bound_mean"])
                     for d in rows if d["policy"] == policy)
        a1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=policy)
        a2.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=policy)
    for ax, label in ((a1, "top-1 agreement with full cache"), (a2, "KL(full || policy) lower bound")):
        _budget_axis(ax)
        ax.set_xlabel("KV budget")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    a1.legend(fontsize=8)
    fig.suptitle("Drift over a long greedy generation (same prefix, full cache vs policy)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# -- README -----------------------------------------------------------------------------------
def _pct(v):
    return "–" if v is None else f"{v:.0%}"


def _acc_cell(entry):
    if entry is None:
        return "–"
    acc, n, low, high = entry
    return f"{acc:.0%} [{low:.0%}, {high:.0%}] n={n}"


def headline_rows(summary: dict, kept: dict | None = None) -> list[list]:
    """One row per method; ``kept`` ((policy, budget) -> mean kept fraction) marks with † the
    cells where the plugin kept the whole cache (the policy evicted nothing)."""
    kept = kept or {}
    out = []
    for section, key, source in (("quality", "policy", "plugin (vLLM)"),
                                 ("kvpress", "press", "kvpress (transformers)")):
        table = pooled_accuracy(summary[section], key)
        for method in dict.fromkeys(m for m, _ in table):
            if method == common.FULL:
                full = next(v for (m, _), v in table.items() if m == method)
                out.append([source, "full cache", _acc_cell(full), _acc_cell(full)])
            else:
                out.append([source, method] + [
                    _acc_cell(table.get((method, b)))
                    + (" †" if section == "quality" and kept.get((method, b), 0) >= 0.99 else "")
                    for b in HEADLINE_BUDGETS])
    return out


#: each plugin policy and its nearest kvpress press (LaProx ~ CriticalKV: both weight attention
#: by the value's output projection norm; H2O ~ ObservedAttention: accumulated attention)
PAIRS = (("snapkv", "snapkv"), ("streamingllm", "streamingllm"), ("h2o", "observed_attention"),
         ("laprox", "criticalkv"))
LIKE_BUDGETS = (0.25, 0.1, 0.05)


def like_for_like_rows(quality: list[dict], pipeline: list[dict], query_aware: list[dict],
                       contexts) -> list[list]:
    """Per pair and budget: plugin, kvpress query-aware (like for like), kvpress pipeline —
    pooled over the same prompts (the query-aware run's context lengths)."""
    def table(rows, key):
        return pooled_accuracy([r for r in rows if r["context_tokens"] in contexts], key)

    plugin, qa, pipe = table(quality, "policy"), table(query_aware, "press"), table(pipeline, "press")
    out = [["full cache", "full", _acc_cell(plugin.get((common.FULL, 1.0))),
            _acc_cell(qa.get((common.FULL, 1.0))), _acc_cell(pipe.get((common.FULL, 1.0)))]]
    for policy, press in PAIRS:
        for b in LIKE_BUDGETS:
            out.append([f"{policy} ↔ {press}", _pct(b), _acc_cell(plugin.get((policy, b))),
                        _acc_cell(qa.get((press, b))), _acc_cell(pipe.get((press, b)))])
    return out


def mean_kept(rows: list[dict], key: str) -> dict[tuple, float]:
    """(method, budget) -> mean kept fraction over the rows that report one."""
    acc: dict[tuple, list[float]] = {}
    for r in rows:
        if r.get("kept_fraction") is not None:
            acc.setdefault((r[key], r["budget"]), []).append(r["kept_fraction"])
    return {k: sum(v) / len(v) for k, v in acc.items()}


def detail_rows(rows: list[dict], key: str, kept: dict) -> list[list]:
    out = []
    for r in rows:
        k = kept.get((r["task"], r["context_tokens"], r[key], r["budget"]))
        out.append([r["task"], r["context_tokens"], r[key], _pct(r["budget"]),
                    f"{r['accuracy']:.0%}", r["n"], _pct(k)])
    return out


GRANULARITY_NOTE = (
    "Each policy's prefill decision applied at four granularities in one transformers reference "
    "(`bench_granularity.py`; the engine is not involved): 32- and 16-token blocks and single "
    "tokens with one kept set for every layer and head, and single tokens chosen per (layer, KV "
    "head) with the same count for each (`token/head`: the policy run on each (layer, KV head) "
    "alone). Same prompts, same budgets, the scheduler's protection rule in the unit of the "
    "granularity, one decision after the prefill, greedy answer. `block32` is what the engine "
    "does (compare with the engine's own rows on [quality.md](quality.md) and "
    "[natural.md](natural.md) as a check of the reference).")
GRANULARITY_ENGINE = (
    "What `token/head` would need in the engine: block tables fix only how many tokens a "
    "request holds, so kept tokens could be compacted inside its blocks, each (layer, KV head) "
    "moving its own kept tokens to the front of the request's blocks. (1) Rewritten blocks "
    "no longer hold the tokens their prefix-cache hash names: they must leave the prefix cache "
    "(today's guard does so only for blocks computed after an eviction). (2) The recycle bin "
    "parks whole blocks; token-level parking would need a per-(layer, head) side store to "
    "restore from. (3) Positions: RoPE is applied before caching, so moved keys keep their "
    "rotation, but new tokens' slot mapping and the attention length become per (layer, KV "
    "head), which vLLM's attention metadata (one `seq_lens` per request) cannot express: every "
    "head would have to keep the same count, as here. (4) The exactness reference becomes this "
    "benchmark's mask: a per-(layer, query head) set of hidden keys.")


def multimodal_section(mm: dict, aligned: dict | None = None, plots=()) -> list[str]:
    """Accuracy and kept fraction by modality on image-heavy prompts (bench_multimodal.py), and
    the same prompts block-aligned (``--aligned``) when measured."""
    def table(data):
        return common.markdown_table(
            ["policy", "budget", "correct/n", "95 % CI", "kept", "visual kept", "text kept"],
            [[r["policy"], _pct(r["budget"]), f"{r['correct']}/{r['n']}",
              f"{r['ci_low']:.2f}-{r['ci_high']:.2f}", _pct(r["kept"]), _pct(r["visual_kept"]),
              _pct(r["text_kept"])] for r in data["summary"]])

    lines = ["## Multimodal: image-heavy prompts, the answer in a text note", "",
             f"`bench_multimodal.py` on `{mm.get('model')}`: {mm.get('prompts')} prompts of "
             f"{mm.get('images_per_prompt')} seeded pictures (64 image tokens each), each picture "
             "followed by a short note, one note holding a 5-digit code asked at the end. The "
             "vision tower is untrained: this measures whether a policy keeps the text the "
             "answer needs when most of the KV cache is visual, not image understanding. "
             "`visual kept` / `text kept`: share of the prompt's image / other tokens not "
             "released, from each request's eviction report. Wilson 95 %.", "",
             "**As written** (notes share blocks with image tokens):", "", table(mm), ""]
    if "multimodal.png" in plots:
        lines += ["![multimodal accuracy vs budget](multimodal.png)", ""]
    if aligned and aligned.get("summary"):
        lines += ["**Block-aligned** (`--aligned`: the same prompts padded so each picture's 64 "
                  "image tokens fill exactly two all-image blocks and every other block is all "
                  "text):", "", table(aligned), ""]
        if "multimodal_aligned.png" in plots:
            lines += ["![multimodal accuracy vs budget, block-aligned](multimodal_aligned.png)", ""]
    return lines


def granularity_section(gran: dict) -> list[str]:
    """Accuracy by granularity (bench_granularity.py), one table per prompt set."""
    order = list(gran.get("granularities") or ["block32", "block16", "token", "token/head"])
    budgets = sorted(gran.get("budgets") or [], reverse=True)
    lines = ["## What token granularity would buy", "", GRANULARITY_NOTE, ""]
    for label, title in (("natural", "natural-text haystack"), ("templated", "templated tasks"),
                         ("all", "all prompts")):
        summary = gran.get(f"summary_{label}")
        if not summary or (label == "all" and not (gran.get("summary_natural")
                                                   and gran.get("summary_templated"))):
            continue  # "all" only when it differs from the one set measured
        cell = {(r["policy"], r["budget"], r["granularity"]): r for r in summary}
        full = cell.get(("full", 1.0, "-"))
        n = full["n"] if full else max(r["n"] for r in summary)
        head = f"{title}, {n} prompts" + (f"; full cache {full['correct']}/{full['n']}" if full else "")
        rows = []
        for policy in gran["policies"]:
            for b in budgets:
                rows.append([policy, _pct(b)] + [
                    (f"{c['correct']}/{c['n']} [{c['ci_low']:.2f}, {c['ci_high']:.2f}]"
                     if (c := cell.get((policy, b, g))) else "–") for g in order])
        lines += [f"**{head}** (correct/n, Wilson 95 %):", "",
                  common.markdown_table(["policy", "budget", *order], rows), ""]
    lines += [GRANULARITY_ENGINE, ""]
    return lines


def _sample_cells(path: Path, contexts, depths) -> dict[tuple, tuple[int, int]]:
    """(policy, budget) -> (correct, n) over the per-request CSV rows of ``contexts`` x
    ``depths`` (to put another run's prompts beside a run of a smaller profile)."""
    import csv

    cells: dict[tuple, list[int]] = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if int(r["context_tokens"]) in contexts and float(r["depth"]) in depths:
                cell = cells.setdefault((r["policy"], float(r["budget"])), [0, 0])
                cell[0] += r["correct"] == "True"
                cell[1] += 1
    return {k: (c, n) for k, (c, n) in cells.items()}


def second_model_section(results: Path) -> list[str]:
    """Gemma-3-270M (``bench_quality.py --model gemma3``) beside SmolLM2 on the same prompt
    specs (SmolLM2's per-request rows restricted to the Gemma run's contexts and depths)."""
    gemma = load(results, "quality_gemma3.json")
    if not gemma or not (results / "quality_gemma3_samples.csv").exists():
        return []
    settings = gemma["settings"]
    contexts, depths = set(settings["contexts"]), set(settings["depths"])
    g = _sample_cells(results / "quality_gemma3_samples.csv", contexts, depths)
    smol_csv = results / "quality_samples.csv"
    m = _sample_cells(smol_csv, contexts, depths) if smol_csv.exists() else {}

    def cell(cells, key):
        if key not in cells:
            return "–"
        c, n = cells[key]
        lo, hi = common.wilson(c, n)
        return f"{c / n:.0%} ({c}/{n}) [{lo:.2f}, {hi:.2f}]"

    keys = sorted(g, key=lambda k: (k[0] != common.FULL, k[0], -k[1]))
    rows = [[p, _pct(b), cell(g, (p, b)), cell(m, (p, b))] for p, b in keys]
    return ["## Second model: Gemma-3-270M (hybrid sliding-window KV cache)", "",
            f"`bench_quality.py --model gemma3 --profile {gemma.get('profile')}`: the same "
            f"task specs (passkey, needle, multifact; contexts {sorted(contexts)}; depths "
            f"{sorted(depths)}) in Gemma's tokens, on {gemma['engine']['model']}. Gemma's "
            "15 sliding-window layers keep their 512-token window whatever the budget, so a "
            "fact further back than 512 tokens reaches the answer only through the 3 "
            "full-attention layers, the ones evicted in. SmolLM2 column: the same specs from "
            "quality_samples.csv. Wilson 95 %.", "",
            common.markdown_table(["policy", "budget", "Gemma-3-270M", "SmolLM2-135M"], rows),
            ""]


def scheduler_section(sched: dict, all_batched: list[dict]) -> list[str]:
    """bench_scheduler.py: the worst step (every request deciding), the steady state and one
    pool-pressure call, each beside its reference implementation from the same run."""
    summaries = sched.get("summaries") or {"all_batched": all_batched}

    def table(pattern, new="batched", old="per_request"):
        after = {(r["requests"], r["blocks"]): r["ms"] for r in summaries.get(f"{pattern}_{new}", [])}
        before = {(r["requests"], r["blocks"]): r["ms"]
                  for r in summaries.get(f"{pattern}_{old}", [])}
        blocks = sorted({k[1] for k in after})
        reqs = sorted({k[0] for k in after})

        def cell(key):
            if key not in before:
                return f"{after[key]:.2f}"
            return f"{after[key]:.2f} / {before[key]:.2f} (×{before[key] / after[key]:.1f})"

        return common.markdown_table(["requests \\ blocks per request", *map(str, blocks)],
                                     [[str(n)] + [cell((n, b)) for b in blocks] for n in reqs])

    lines = ["## Scheduler cost", "",
             "One scheduling step's eviction work, ms, slowest policy; batched (one "
             "`select_batch` for the step) / one selection per request, same run. **Every "
             "request deciding** (each releasing 75 % of its blocks: the worst step; selection "
             "and block bookkeeping on vLLM's BlockPool):", "", table("all"), ""]
    if "staggered_batched" in summaries:
        plan = [r for r in sched.get("rows", []) if r.get("pattern") == "staggered"
                and r.get("impl") == "batched" and "plan_ms" in r]
        lines += [f"**Steady state**: every request at its budget, 1/{sched.get('interval', 16)} "
                  f"of them deciding in the step, each grown by {sched.get('growth_blocks', 4)} "
                  "blocks"
                  + (", on scores taken from the workers' output, plus the step plan for the "
                     "workers over all running requests (rows, offsets, score tasks)" if plan
                     else "") + ":", "", table("staggered"), ""]
    if "pressure_partition" in summaries:
        lines += ["**Pool pressure**: one call freeing 2 blocks (a decode step short of blocks) "
                  "over every running request at its budget, all freshly scored; picked by "
                  "partition (`least_important`) / by a full `np.lexsort` of every candidate:",
                  "", table("pressure", "partition", "full_sort"), ""]
    if "pressure_repeat" in summaries:
        lines += ["The second of two such calls in a row (a full pool asks at every step; the "
                  "candidates of requests unchanged since the first are cached) / the full "
                  "sort as above:", "", table("pressure", "repeat", "full_sort"), ""]
    return lines


def worker_section(worker: dict | None) -> list[str]:
    """bench_worker.py: host syncs, uploads, statistic calls, host bytes and host time per
    scored decode step."""
    if not worker or not worker.get("rows"):
        return []
    return ["## Worker cost of scoring", "",
            f"`bench_worker.py` on SmolLM2 ({worker['layers']} layers), {worker['prompt_tokens']}"
            "-token prompts at a 25 % budget: per decode step that scores R requests, the host "
            "syncs it would make on a GPU (the worker's downloads + the policies' reads of "
            "tensor data; goal <= 2), its pinned non-blocking uploads, the statistic calls "
            "(on this CPU backend the hooks' decode twin, one per request and layer; on NVIDIA "
            "the attention backend measures decode statistics inside its pass), the bytes the "
            "worker moves to the host per scored request (one float32 per block + one flag) "
            "and its host-side time per request outside the statistics.", "",
            common.markdown_table(
                ["policy", "requests scored", "host syncs / step (max)", "pinned uploads / step",
                 "statistic calls / step", "host bytes / request", "policy state B / request "
                 "(first → last step)", "worker host ms / request"],
                [[r["policy"], r["requests"],
                  f"{r['host_syncs_per_step']:.0f} ({r['host_syncs_per_step_max']})",
                  f"{r['uploads_per_step']:.0f}", f"{r['calls_per_step']:.0f}",
                  f"{r['host_bytes_per_request']:.0f}",
                  f"{r.get('state_bytes_first', '-')} → {r.get('state_bytes_last', '-')}",
                  f"{r['worker_host_ms_per_request']:.3f}"]
                 for r in worker["rows"]]), ""]


def prefill_section(prefill: dict | None) -> list[str]:
    """bench_prefill.py: prompts larger than the KV pool, stock vs prefill eviction."""
    if not prefill or not prefill.get("rows"):
        return []
    stock = prefill["stock"]
    started = ("started" if stock.get("started") else
               f"refuses to start: \"{stock.get('error', '')[:160]}...\"")
    return ["## Prompts larger than the KV pool (prefill eviction)", "",
            f"`bench_prefill.py`: a pool of {prefill['pool_tokens']} tokens "
            f"({prefill['pool_blocks']} blocks of {prefill['block_size']}) for max_model_len "
            f"{prefill['max_model_len']}, prompt chunks of {prefill['chunk_tokens']} tokens. "
            f"Stock vLLM {started} With `prefill_eviction` (pass key at mid depth, fresh "
            "prefix cache per request; peak = most tokens of KV the request held at once):", "",
            common.markdown_table(
                ["prompt tokens", "x pool", "policy", "budget", "answer right", "peak tokens"],
                [[r["prompt_tokens"], f"{r['prompt_over_pool']:.2f}", r["policy"],
                  _pct(r["budget"]), "yes" if r["correct"] else "no", r["peak_tokens"]]
                 for r in prefill["rows"]]), ""]


def prefill_accuracy_section(acc: dict | None) -> list[str]:
    """bench_prefill.py --accuracy: prefill eviction off, and on with each ``prefill_query``;
    then the pool smaller than the prompt."""
    if not acc or not acc.get("rows"):
        return []
    context = acc["context_tokens"]
    rows = [r for r in acc["rows"] if r.get("context_tokens", context) == context]
    queries = list(dict.fromkeys(r.get("prefill_query") or "chunk" for r in rows
                                 if r["prefill_eviction"]))
    cells = {(r["task"], r["policy"], r["budget"], r["prefill_eviction"],
              r.get("prefill_query") or "chunk"): r for r in rows}
    def cell(key):
        r = cells.get(key)
        return f"{r['correct']}/{r['n']}" if r else "–"

    table = []
    for (task, policy, budget, on, _), r in cells.items():
        if policy == "full" or on:
            continue
        table.append([task, policy, _pct(budget), cell((task, "full", 1.0, False, "chunk")),
                      f"{r['correct']}/{r['n']}",
                      *(cell((task, policy, budget, True, q)) for q in queries)])
    lines = ["### Accuracy with prefill eviction: what scores the middle chunks", "",
             f"`bench_prefill.py --accuracy`: the same {context}-token prompts "
             f"(depths {', '.join(str(d) for d in acc['depths'])}, {acc['per_depth']} each), "
             f"{acc['chunk_tokens']}-token chunks, a pool that holds them whole; correct answers "
             "with prefill eviction off, and on with each `prefill_query`:", "",
             common.markdown_table(["task", "policy", "budget", "full cache", "off",
                                    *(f"on: {q}" for q in queries)], table), ""]
    small = acc.get("small_pool")
    long_rows = [r for r in acc["rows"] if small and r.get("context_tokens") == small["context_tokens"]]
    if long_rows:
        ref = {(r["policy"], r["prefill_eviction"]): r for r in long_rows if not r["small_pool"]}
        on = {(r["policy"], r.get("prefill_query")): r for r in long_rows if r["small_pool"]}
        table = []
        for policy in dict.fromkeys(r["policy"] for r in long_rows if r["policy"] != "full"):
            table.append([policy, cell_of(ref.get(("full", False))),
                          cell_of(ref.get((policy, False))),
                          *(cell_of(on.get((policy, q))) for q in queries)])
        lines += [f"Needle prompts of {small['context_tokens']} tokens on a pool of "
                  f"{small['pool_tokens']} tokens (smaller than the prompt) at "
                  f"{_pct(small['budget'])}; the full cache and prefill eviction off on a pool "
                  "that holds them:", "",
                  common.markdown_table(["policy", "full cache", "off (large pool)",
                                         *(f"on: {q}" for q in queries)], table), ""]
    return lines


def cell_of(r: dict | None) -> str:
    return f"{r['correct']}/{r['n']}" if r else "–"


def longgen_section(longgen: dict | None) -> list[str]:
    """bench_longgen.py: one long generation at a fixed budget_tokens."""
    if not longgen or not longgen.get("rows"):
        return []
    rows = longgen["rows"]
    return ["## Long generations at a fixed token budget", "",
            f"`bench_longgen.py`: a {longgen['prompt_tokens']}-token prompt, "
            f"{rows[0]['generated']} tokens generated greedily, each policy at budget_tokens "
            f"{longgen['budget_tokens']}; blocks held = the request's blocks in the pool (of "
            f"{longgen['block_size']} tokens); drift = agreement with the full cache reading the "
            "same tokens.", "",
            common.markdown_table(
                ["run", "blocks held: most", "last", "top-1 agreement", "KL lower bound",
                 f"KL per {longgen['window']} steps", "tokens equal to the full cache's"],
                [[r["run"], r["blocks_held_max"], r["blocks_held_last"], r["top1_agreement"],
                  r["kl_lower_bound_mean"],
                  " ".join(f"{k:.3f}" for k in r["kl_lower_bound_per_window"]),
                  r.get("same_tokens_as_full", "–")] for r in rows]),
            "", "![blocks held and drift over one long generation](longgen.png)", ""]


def headline_section(summary: dict, quality: dict, plot: bool) -> list[str]:
    """Pooled accuracy of every plugin policy and kvpress press at the headline budgets."""
    lines = ["## Headline: retrieval accuracy at 10 % and 5 % KV budget", ""]
    if not (summary["quality"] or summary["kvpress"]):
        return lines + ["Not measured.", ""]
    headline = headline_rows(summary, mean_kept(quality.get("rows") or [], "policy"))
    lines += ["Pooled over every task (passkey, needle, multifact), context length and depth; "
              "Wilson 95 % interval; n = requests.", "",
              common.markdown_table(["", "method", "10 % budget", "5 % budget"], headline), ""]
    if summary["kvpress"]:
        lines += ["kvpress rows follow kvpress's own protocol (its text-generation "
                  "pipeline): the press compresses the context, the question is then "
                  "prefilled on the compressed cache, uncompressed; a budget is the fraction "
                  "of the whole prompt kept, question included. The plugin compresses after "
                  "the prefill (question included, always inside its protected recent 64 "
                  "tokens), so its first answer token comes from the full cache; on these "
                  "prompts that token is the space before the number. kvpress selects single "
                  "tokens per (layer, KV head), the plugin 32-token blocks shared by all "
                  "layers. TOVA and KNorm are extra presses, not asked for. The harness "
                  "checks on [kvpress.md](kvpress.md) show the compressed K/V are kvpress's own.",
                  ""]
    if any("†" in str(cell) for row in headline for cell in row):
        lines += ["† the policy kept the whole cache: no eviction took place at this budget "
                  "(see `kept` below).", ""]
    if plot:
        lines += ["![accuracy vs budget](accuracy_vs_budget.png)", "",
                  "[accuracy_vs_budget.png](accuracy_vs_budget.png): plugin policies (solid) "
                  "and kvpress presses (dashed) on the same prompts.", ""]
    return lines


def summary_headline_section(summary: dict, quality: dict) -> list[str]:
    """README's table: the plugin rows of quality.md's headline table, the full cache first
    (what each budget costs in accuracy)."""
    rows = [row[1:] for row in headline_rows(summary, mean_kept(quality.get("rows") or [], "policy"))
            if row[0] == "plugin (vLLM)"]
    if not rows:
        return []
    return ["## Retrieval accuracy at 10 % and 5 % of the KV cache", "",
            "vLLM + the plugin on SmolLM2-135M: pass key, needle and multi-fact prompts of "
            "1k-4k tokens, pooled (Wilson 95 %, n = requests); the full cache's row is what the "
            "budget costs against. kvpress on the same prompts and per-task tables: "
            "[quality.md](quality.md), [kvpress.md](kvpress.md).", "",
            common.markdown_table(["policy", "10 % budget", "5 % budget"], rows), ""]


def like_for_like_section(quality: dict, kvp: dict, qa: dict | None) -> list[str]:
    """Each plugin policy beside its nearest kvpress press, both kvpress protocols."""
    if not (qa and quality.get("rows") and kvp.get("rows")):
        return []
    contexts = qa.get("contexts") or qa["settings"]["contexts"]
    return ["## Like for like: each plugin policy and its nearest kvpress press", "",
            f"Same prompts ({qa.get('profile')} profile, contexts "
            f"{', '.join(map(str, contexts))} tokens), same budgets (fraction of the whole "
            "prompt kept), pooled over tasks and depths, Wilson 95 %. **The query-aware "
            "column is the like-for-like one**: the press compresses the whole prompt, "
            "question included, right after a full-attention prefill, and the first "
            "answer token comes from that prefill - what the plugin does (it scores after "
            "the prefill, the question in its observation window). The pipeline column "
            "is kvpress's text-generation protocol (context compressed without the "
            "question, query-agnostic). Remaining differences: kvpress keeps single "
            "tokens per (layer, KV head), the plugin 32-token blocks for all layers; "
            "kvpress compresses once, the plugin every 16 decode steps; the plugin row "
            f"comes from quality.json (profile `{quality.get('profile')}`, commit "
            f"{str((quality.get('versions') or {}).get('vllm-kvevict-commit', '?'))[:7]}).", "",
            common.markdown_table(["pair", "budget", "plugin (vLLM)",
                                   "kvpress query-aware", "kvpress pipeline"],
                                  like_for_like_rows(quality["rows"], kvp["rows"],
                                                     qa["rows"], contexts)), ""]


def _variant_tables(serving: dict) -> list[str]:
    """bench_serving.py's ratios per plugin variant and its per-variant measurements."""
    lines = []
    if serving.get("ratios"):
        lines += ["Every plugin variant / stock, in the same run:", "",
                  common.markdown_table(["variant", "concurrency", "throughput", "blocks/request",
                                         "TTFT", "answers (points vs stock)"],
                                        [[name, q["concurrency_ratio"], q["throughput_ratio"],
                                          q["blocks_per_request_ratio"], q["ttft_ratio"],
                                          f"{q['answers_points_vs_stock']:+.0f}"]
                                         for name, q in serving["ratios"].items()]), ""]
    variants = serving.get("results") or {}
    if variants:
        first = next(iter(variants.values()))
        lines += [f"Per variant ({serving.get('profile')} profile, policy "
                  f"`{serving.get('policy')}`, headline `{serving.get('headline')}`): "
                  f"{first['requests']} requests of {first['prompt_tokens']} prompt tokens, "
                  f"{first['max_tokens']} output tokens each, all arriving at once; KV pool of "
                  f"{first['usable_blocks']} usable blocks of 32 tokens.",
                  "",
                  common.markdown_table(
                      ["variant", "total s", "out tok/s", "running mean", "running peak",
                       "blocks/request", "preemptions", "TTFT mean s", "answers right"],
                      [[name, v["total_s"], v["output_tokens_per_s"], v["mean_running"],
                        v["peak_running"], v["mean_blocks_per_request"], v["preemptions"],
                        v["mean_ttft_s"],
                        f"{v['answers_retrieved']}/{v['requests']}"]
                       for name, v in variants.items()]), ""]
    return lines


def serving_section(summary: dict, serving: dict, plot: bool) -> list[str]:
    """bench_serving.py / bench_overhead.py: the headline ratios, then every variant."""
    s = summary["serving"]
    if not serving and s["idle_overhead_ratio"] is None:
        return []
    lines = ["## Serving (plugin / stock)", "",
             common.markdown_table(["concurrency", "throughput", "idle overhead (decode tok/s)",
                                    "blocks per request"],
                                   [[s["concurrency_ratio"], s["throughput_ratio"],
                                     s["idle_overhead_ratio"], s["blocks_per_request_ratio"]]]),
             "", f"From serving.json (headline variant `{s.get('headline')}`) and overhead.json "
             "(– = not measured).", ""]
    lines += _variant_tables({**serving, "ratios": s.get("by_variant")})
    if serving.get("results") and plot:
        lines += ["![KV blocks in use over time](serving_blocks.png)", ""]
    return lines


def serving_experiments_section(serving: dict) -> list[str]:
    """One-off bench_serving.py runs folded into serving.json (``--experiment NAME``)."""
    lines = []
    for name, run in (serving.get(common.EXPERIMENTS) or {}).items():
        lines += [f"### `experiments.{name}` of serving.json", "",
                  f"`{run.get('command')}`" + (f" (first written as {run['folded_from']})"
                                               if run.get("folded_from") else "") + ":", ""]
        lines += _variant_tables(run)
    return (["## Other runs of the serving benchmark", ""] + lines) if lines else []


def floor_section(floor: dict | None) -> list[str]:
    """bench_floor.py: what each ``floor_tokens`` keeps of short requests and costs long ones."""
    if not floor or not floor.get("summary"):
        return []
    policies = [p for p in dict.fromkeys(r["policy"] for r in floor.get("rows") or [])
                if p != common.FULL]
    return ["## The floor (`floor_tokens`)", "",
            f"`bench_floor.py`: mixed chat traffic at a {_pct(floor['budget'])} budget with floors "
            f"{', '.join(map(str, floor['floors']))} tokens per request ({', '.join(policies)}), "
            "against the full cache; per request class: answers equal to the full cache's "
            "(`same`), answers containing the expected word (`right`), KV tokens kept at the "
            "end (`kept`). Why the default is 256: the floor footnote of "
            "[the project README](../../README.md).", "",
            "```", *floor["summary"], "```", ""]


def soak_section(soak: dict | None) -> list[str]:
    """tests/engine/test_serve.py's soak with ``KVEVICT_SOAK_RESULT``: one row of its figures."""
    if not soak:
        return []
    keys = [k for k, v in soak.items() if k != "command" and isinstance(v, (int, float))]
    return ["## Soak (OpenAI server, mixed traffic)", "",
            "The last long soak of `tests/engine/test_serve.py` (requests with and without prefill "
            "eviction, aborted streams, bad options refused with 400; `kv_cache_usage_after` "
            "and `parked_blocks_after`: the KV pool and the recycle bin after the run):", "",
            common.markdown_table(keys, [[f"{soak[k]:g}" for k in keys]]), ""]


def overhead_section(overhead: dict | None) -> list[str]:
    """bench_overhead.py: decode speed with the plugin loaded and idle, and evicting, vs stock."""
    runs = (overhead or {}).get("results") or {}
    if not runs:
        return []
    def ratio(key):
        value = _number(overhead.get(key))
        return "–" if value is None else f"×{value:.3f}"

    return ["## Overhead with nothing to evict (`bench_overhead.py`)", "",
            "The same pass-key prompts, greedy, each variant in its own process: stock vLLM, the "
            "plugin loaded with nothing to evict (`plugin_idle`, budget 1.0) and evicting to 25 % "
            "(`plugin_evict_25`); decode tokens/s of the plugin / stock's: idle "
            f"{ratio('idle_overhead_ratio')} (`idle_overhead_ratio`), evicting "
            f"{ratio('evicting_25_ratio')} (`evicting_25_ratio`).", "",
            common.markdown_table(["variant", "requests", "output tokens", "total s", "prefill s",
                                   "decode tok/s"],
                                  [[name, r.get("requests"), r.get("output_tokens"),
                                    r.get("total_s"), r.get("prefill_s"),
                                    r.get("decode_tokens_per_s")] for name, r in runs.items()]),
            ""]


def kernels_section(gpu: dict | None) -> list[str]:
    """gpu_check.sh's JSON (bench_kernels.py on an NVIDIA GPU), when one was copied here."""
    lines = ["## The attention backend's kernel on a GPU (`gpu_check.sh`, `bench_kernels.py`)", ""]
    bench = (gpu or {}).get("bench") or {}
    if not gpu:
        return lines + ["No `gpu_check.json` here: the kernel's cost (`fused_cost_ratio`, goal "
                        "≤ 1.05, and the ratio to torch SDPA) is measured only on an NVIDIA GPU "
                        "with `bash benchmarks/gpu_check.sh` (what it writes: "
                        "[../README.md](../README.md#gpu-check-gpu_checksh)).", ""]
    device = gpu.get("device") or {}
    lines += [f"Device: {device.get('name', '?')}; tests ok: {gpu.get('tests_ok')}; "
              f"{gpu.get('date', '')}.", ""]
    for key in ("fused_cost_ratio", "sdpa_ratio", "stats_bytes_per_request", "max_abs_err"):
        if key in bench:
            lines += [f"- `{key}`: {bench[key]}"]
    return lines + [""]


def drift_section(quality: dict, plot: bool) -> list[str]:
    drift = quality.get("drift") or []
    if not drift:
        return []
    lines = ["## Drift vs full cache", "",
             f"{drift[0]['prompts']} prompt(s) of {drift[0]['context_tokens']} tokens, "
             f"{drift[0]['steps'] // max(drift[0]['prompts'], 1)} greedy tokens each; per step "
             "the policy's next-token distribution vs the full cache's on the same prefix. "
             "KL is a lower bound (distributions known by their top-10 only).", "",
             common.markdown_table(["policy", "budget", "top-1 agreement", "KL lower bound (mean)",
                                    "kept"],
                                   [[d["policy"], _pct(d["budget"]), d["top1_agreement"],
                                     d["kl_lower_bound_mean"], _pct(d["kept_fraction"])]
                                    for d in drift]), ""]
    if plot:
        lines += ["![drift](drift.png)", ""]
    return lines


def by_task_section(title: str, data: dict, key: str) -> list[str]:
    rows = data.get("rows") or []
    if not rows:
        return []
    kept = {(r["task"], r["context_tokens"], r[key], r["budget"]): r.get("kept_fraction")
            for r in rows}
    return [f"## {title}", "",
            "`kept` = KV really kept after the first decision (whole blocks for the "
            "plugin, sink and recent tokens protected; tokens for kvpress).", "",
            common.markdown_table(["task", "context", key, "budget", "accuracy", "n", "kept"],
                                  detail_rows(rows, key, kept)), ""]


def prefix_check_section(quality: dict) -> list[str]:
    check = quality.get("prefix_cache_check") or {}
    if not check:
        return []
    same = [p for p, c in check.items() if c["same_tokens"]]
    return ["## Prefix-cache exactness check", "",
            f"One prompt rerun per policy with the prefix cache reset: identical tokens for "
            f"{len(same)}/{len(check)} policies ({', '.join(same) or 'none'}).", ""]


def kvpress_checks_section(kvp: dict) -> list[str]:
    hook = kvp.get("kvpress_hook_check") or {}
    if not hook and kvp.get("decode_path_check") is None:
        return []
    lines = ["## kvpress harness checks", ""]
    if hook:
        lines += [f"Compressed K/V bit-identical to kvpress's own hook path: "
                  f"{', '.join(f'{k} {v}' for k, v in hook.items())}.", ""]
    if kvp.get("decode_path_check") is not None:
        lines += [f"Decoding from a per-head shuffled full cache gives the full cache's tokens: "
                  f"{kvp['decode_path_check']}.", ""]
    return lines


# -- pages ------------------------------------------------------------------------------------
REPORT = "python benchmarks/report.py"
SOAK = ("KVEVICT_SOAK_REQUESTS=1000 KVEVICT_SOAK_RESULT=benchmarks/results/soak.json "
        "bash scripts/test.sh tests/engine/test_serve.py -k soak -s")

#: the results pages beside README.md: file -> (title, what it shows, its files: (files written
#: together, the command that writes them; None: the command the first JSON records))
PAGES = {
    "quality.md": ("Retrieval accuracy vs KV budget",
                   "pass key, needle, multi-fact on SmolLM2-135M: pooled and per task and "
                   "context, drift, one long generation", [
                       (("quality.json", "quality_samples.csv"), None),
                       (("longgen.json", "longgen.png"), None),
                       (("accuracy_vs_budget.png", "drift.png"), REPORT)]),
    "kvpress.md": ("The plugin beside kvpress",
                   "the same prompts with kvpress's presses on transformers: like for like, "
                   "per task, harness checks", [
                       (("kvpress.json", "kvpress_samples.csv"), None),
                       (("kvpress_query_aware.json", "kvpress_query_aware_samples.csv"), None)]),
    "natural.md": ("Natural text (`bench_natural.py`)",
                   "ordinary text with one access code: why SnapKV/HAE/HybridKV collapsed "
                   "(the head merge), protection, prompt lengths and the prefix-hit cap", [
                       (("natural.json",), None)]),
    "granularity.md": ("Token granularity (`bench_granularity.py`)",
                       "each policy's decision per 32/16-token block, per token, per token and "
                       "head, in a transformers reference", [
                           (("granularity.json",), None)]),
    "gemma3.md": ("Second model: Gemma-3-270M",
                  "hybrid sliding-window KV cache, eviction in the 3 full-attention layers", [
                      (("quality_gemma3.json", "quality_gemma3_samples.csv"), None)]),
    "multimodal.md": ("Multimodal: image-heavy prompts",
                      "the answer in a text note among pictures, as written and block-aligned; "
                      "vLLM's own multimodal client", [
                          (("multimodal.json", "multimodal.png"), None),
                          (("multimodal_aligned.json", "multimodal_aligned.png"), None),
                          (("vllm_bench_mm.json",), None)]),
    "serving.md": ("Serving: memory, concurrency, throughput",
                   "a KV pool too small for the load, stock vLLM vs the plugin; the floor; "
                   "the soak", [
                       (("serving.json", "serving_blocks.png"), None),
                       (("floor.json",), None),
                       (("soak.json",), SOAK)]),
    "prefill.md": ("Prefill eviction (`bench_prefill.py`)",
                   "prompts up to 3.2x the pool; accuracy by what scores the middle chunks", [
                       (("prefill.json",), None), (("prefill_accuracy.json",), None)]),
    "scheduler.md": ("Scheduler cost (`bench_scheduler.py`)",
                     "one scheduling step's eviction work, 1-256 requests x 64-4096 blocks, "
                     "against the targets", [
                         (("scheduler.json",), None), (("scheduler_cost.png",), REPORT)]),
    "kernels-and-overhead.md": ("Worker cost, kernels and overhead",
                                "host syncs and bytes per scored step, decode overhead with "
                                "nothing to evict, the GPU kernel check", [
                                    (("worker.json",), None), (("overhead.json",), None),
                                    (("gpu_check.json",), "bash benchmarks/gpu_check.sh")]),
}
BEGIN, END = "<!-- report.py: {} -->", "<!-- /report.py: {} -->"


def files_section(results: Path, page: str) -> list[str]:
    """The page's files that exist here, each with the command that writes it, and the one-off
    runs folded into them (``experiments``)."""
    rows = []
    for files, command in PAGES[page][2]:
        present = [f for f in files if (results / f).exists()]
        if not present:
            continue
        data = load(results, files[0]) if files[0].endswith(".json") else None
        rows.append([", ".join(f"[{f}]({f})" for f in present),
                     f"`{command or (data or {}).get('command') or '?'}`"])
        for name, run in ((data or {}).get(common.EXPERIMENTS) or {}).items():
            rows.append([f"[{files[0]}]({files[0]}) `experiments.{name}`",
                         f"`{run.get('command', '?')}`"])
    if not rows:
        return []
    return ["Files, each written by the command beside it (from the repository root); "
            f"`{REPORT}` then rewrites the parts of this page between `report.py` markers "
            "(the rest is written by hand). Summary and other pages: [README.md](README.md).", "",
            common.markdown_table(["file", "written by"], rows), ""]


def pages_section(results: Path) -> list[str]:
    """README's index of the pages."""
    rows = []
    for page, (title, what, files) in PAGES.items():
        if (results / page).exists():
            present = [f for group, _ in files for f in group if (results / f).exists()]
            rows.append([f"[{title}]({page})", what, ", ".join(present) or "–"])
    return ["## Pages", "", common.markdown_table(["page", "what", "files"], rows), ""]


def header_section(summary: dict, quality: dict, kvp: dict, sched: dict) -> list[str]:
    lines = [f"Regenerated by `{summary['command']}` from the JSON/CSV files here "
             "(machine-readable: [summary.json](summary.json)); each page names the command "
             "that wrote its files. How each number is measured: [../README.md](../README.md).",
             ""]
    machine = quality.get("machine") or kvp.get("machine") or sched.get("machine")
    if machine:
        lines += [f"- Machine: {machine.get('cpus')} CPUs ({machine.get('processor')}), "
                  f"{machine.get('memory_gb', '?')} GB RAM, no GPU; {machine.get('platform')}."]
    lines += ["- Versions: " + ", ".join(f"{k} {v}" for k, v in summary["versions"].items())]
    profiles = {name: d.get("profile") for name, d in
                (("quality", quality), ("kvpress", kvp), ("scheduler", sched)) if d}
    if profiles:
        lines += ["- Profiles: " + ", ".join(f"{k} `{v}`" for k, v in profiles.items())]
    return lines + [""]


def update_page(path: Path, title: str, blocks: list[tuple[str, list[str]]]) -> Path:
    """Write each generated block of ``path`` between its markers, keeping every line outside
    them (the hand-written findings); a block without markers yet goes at the end, and a page
    that does not exist yet gets its title and the blocks that have content."""
    text = path.read_text() if path.exists() else f"# {title}\n"
    for name, lines in blocks:
        begin, end = BEGIN.format(name), END.format(name)
        while lines and not lines[-1]:
            lines = lines[:-1]
        body = "\n".join([begin, *lines, "", end] if lines else [begin, end])
        at, stop = text.find(begin), text.find(end)
        if at >= 0 and stop > at:
            text = text[:at] + body + text[stop + len(end):]
        elif lines:
            text = text.rstrip("\n") + "\n\n" + body + "\n"
    path.write_text(text)
    return path


def write_pages(results: Path, summary: dict) -> list[Path]:
    """README.md (the summary) and every page of ``PAGES``: their generated blocks from the
    results here. Returns the paths written, README.md first."""
    quality = load(results, "quality.json") or {}
    kvp = load(results, "kvpress.json") or {}
    sched = load(results, "scheduler.json") or {}
    serving = load(results, "serving.json") or {}
    gran = load(results, "granularity.json")
    mm = load(results, "multimodal.json")
    png = {p.name for p in results.glob("*.png")}
    blocks = {
        "quality.md": [
            ("headline", headline_section(summary, quality, "accuracy_vs_budget.png" in png)),
            ("drift", drift_section(quality, "drift.png" in png)),
            ("longgen", longgen_section(load(results, "longgen.json"))),
            ("by-task", by_task_section("Plugin accuracy by task and context", quality, "policy")),
            ("prefix-cache", prefix_check_section(quality))],
        "kvpress.md": [
            ("like-for-like", like_for_like_section(quality, kvp,
                                                    load(results, "kvpress_query_aware.json"))),
            ("by-task", by_task_section("kvpress accuracy by task and context", kvp, "press")),
            ("harness", kvpress_checks_section(kvp))],
        "natural.md": [],
        "granularity.md": [("granularity", granularity_section(gran)
                            if gran and gran.get("summary_all") else [])],
        "gemma3.md": [("gemma3", second_model_section(results))],
        "multimodal.md": [("multimodal", multimodal_section(
            mm, load(results, "multimodal_aligned.json"), png) if mm and mm.get("summary") else [])],
        "serving.md": [
            ("serving", serving_section(summary, serving, "serving_blocks.png" in png)),
            ("experiments", serving_experiments_section(serving)),
            ("floor", floor_section(load(results, "floor.json"))),
            ("soak", soak_section(load(results, "soak.json")))],
        "prefill.md": [
            ("prefill", prefill_section(load(results, "prefill.json"))),
            ("accuracy", prefill_accuracy_section(load(results, "prefill_accuracy.json")))],
        "scheduler.md": [("scheduler", scheduler_section(sched, summary["scheduler_ms"])
                          + (["![scheduler cost](scheduler_cost.png)", ""]
                             if "scheduler_cost.png" in png else [])
                          if summary["scheduler_ms"] else [])],
        "kernels-and-overhead.md": [
            ("worker", worker_section(load(results, "worker.json"))),
            ("overhead", overhead_section(load(results, "overhead.json"))),
            ("kernels", kernels_section(load(results, "gpu_check.json")))],
    }
    written = []
    for page, page_blocks in blocks.items():
        page_blocks = [("files", files_section(results, page)), *page_blocks]
        if (results / page).exists() or any(lines for name, lines in page_blocks
                                            if name not in ("files", "kernels")):
            written.append(update_page(results / page, PAGES[page][0], page_blocks))
    readme = update_page(results / "README.md", "Benchmark results", [
        ("header", header_section(summary, quality, kvp, sched)),
        ("headline", summary_headline_section(summary, quality)),
        ("pages", pages_section(results))])
    return [readme, *written]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=common.RESULTS)
    parser.add_argument("--command", help="the command that regenerated the results")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    results = args.results
    results.mkdir(parents=True, exist_ok=True)
    summary = build_summary(results, args.command)
    with open(results / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    plots = {}
    if not args.no_plots:
        plots["accuracy"] = plot_accuracy(summary, results / "accuracy_vs_budget.png")
        plots["scheduler"] = plot_scheduler(summary, results / "scheduler_cost.png")
        plots["drift"] = plot_drift((load(results, "quality.json") or {}).get("drift") or [],
                                    results / "drift.png")
    pages = write_pages(results, summary)
    print(f"wrote {results / 'summary.json'}, " + ", ".join(p.name for p in pages) +
          "".join(f", {name} plot" for name, ok in plots.items() if ok))
    return summary


if __name__ == "__main__":
    main()
