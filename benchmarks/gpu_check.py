"""One GPU check: the kernel tests in float32/float16/bfloat16, then the kernel benchmark, one JSON.

Run it as ``bash benchmarks/gpu_check.sh`` (any directory) on an NVIDIA node that has python,
torch, triton and pytest, from a bare checkout: nothing is installed, ``kernels/`` is imported
by path (``tests/kernels/conftest.py``, ``bench_kernels.py``).

1. ``pytest tests/kernels`` once per cache dtype (``KVEVICT_KERNEL_DTYPES``), the three runs in
   parallel (each compiles its own Triton kernels, which is most of their time);
2. ``bench_kernels.py``'s benchmark of the attention backend's kernel — statistics on vs off
   (``fused_cost_ratio``) and against torch SDPA — at Llama-8B shapes (batch 64, 8k context,
   float16 and bfloat16) first, then a grid, bounded by what is left of the time budget; it
   writes its markdown/CSV to ``benchmarks/results/``; the headline ratios go to the JSON's
   ``bench`` entry;
3. one JSON (default ``benchmarks/results/gpu_check.json``; ``--out`` or
   ``KVEVICT_GPU_CHECK_JSON``), also copied with the logs under ``$OUT`` when that is set.

Without an NVIDIA GPU it says so and exits 0, writing nothing. Exit status 1 when a test
failed or the benchmark could not run (the JSON is written all the same).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DTYPES = ("float32", "float16", "bfloat16")
BUDGET_S = 420  # the whole check; a GPU node should take about half of it (see README)
TEST_TIMEOUT_S = 270  # each pytest run; the benchmark gets the rest of BUDGET_S (>= 60 s)
TAIL_CHARS = 4000  # of a failed pytest run's output, kept in the JSON


def nvidia_gpu() -> bool:
    import torch

    return torch.cuda.is_available() and torch.version.hip is None


def junit_summary(path: Path) -> dict:
    """Counts and the failing/erroring test ids of one pytest ``--junitxml`` file."""
    counts = dict(passed=0, failed=0, errors=0, skipped=0)
    failures, skips = [], {}
    for case in ET.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "").replace(".", "/")
        name = f"{module}.py::{case.get('name')}" if module else case.get("name", "?")
        kinds = {child.tag: child for child in case}
        if "failure" in kinds or "error" in kinds:
            kind = "failure" if "failure" in kinds else "error"  # an Element without children is falsy
            counts["failed" if kind == "failure" else "errors"] += 1
            failures.append(f"{name} ({kinds[kind].get('message', '')[:200]})")
        elif "skipped" in kinds:
            counts["skipped"] += 1
            reason = kinds["skipped"].get("message", "")
            skips[reason] = skips.get(reason, 0) + 1
        else:
            counts["passed"] += 1
    return dict(counts, failures=failures, skip_reasons=skips)


def run_tests(log_dir: Path, dtypes, timeout_s: float) -> dict:
    """``pytest tests/kernels`` per dtype, all at once; a summary per dtype."""
    procs = {}
    for dtype in dtypes:
        env = {**os.environ, "KVEVICT_KERNEL_DTYPES": dtype}
        env.pop("TRITON_INTERPRET", None)  # compile for the GPU
        log = (log_dir / f"pytest_{dtype}.log").open("w")
        # own --basetemp: concurrent sessions must not clean up each other's tmp_path folders
        cmd = [sys.executable, "-m", "pytest", "tests/kernels", "-q", "-p", "no:cacheprovider",
               f"--junitxml={log_dir / f'junit_{dtype}.xml'}", f"--basetemp={log_dir / f'tmp_{dtype}'}"]
        procs[dtype] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log,
                                         stderr=subprocess.STDOUT), log, time.monotonic())
    deadline = time.monotonic() + timeout_s
    results = {}
    for dtype, (proc, log, started) in procs.items():
        timed_out = False
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            timed_out = True
        log.close()
        out = (log_dir / f"pytest_{dtype}.log").read_text(errors="replace")
        junit = log_dir / f"junit_{dtype}.xml"
        summary = junit_summary(junit) if junit.exists() else dict(
            passed=0, failed=0, errors=0, skipped=0, failures=[], skip_reasons={})
        summary.update(returncode=proc.returncode, timed_out=timed_out,
                       seconds=round(time.monotonic() - started, 1),
                       summary_line=next((line for line in reversed(out.splitlines())
                                          if line.strip()), ""))
        if timed_out or proc.returncode != 0:
            summary["output_tail"] = out[-TAIL_CHARS:]
        results[dtype] = summary
        print(f"pytest {dtype}: {summary['summary_line']}"
              + (f" (killed after {timeout_s:.0f} s)" if timed_out else ""), flush=True)
    return results


def run_bench(args, budget_s: float) -> dict:
    """bench_kernels.py's benchmark, in this process; rows and where the tables went."""
    sys.path.insert(0, str(HERE))
    import bench_kernels

    argv = ["--dtypes", *args.bench_dtypes, "--time-budget-s", f"{budget_s:.0f}"]
    if args.bench_batches:
        argv += ["--batches", *map(str, args.bench_batches)]
    if args.bench_contexts:
        argv += ["--contexts", *map(str, args.bench_contexts)]
    bargs = bench_kernels.parse_args(argv)
    started = time.monotonic()
    try:
        rows, meta, skipped = bench_kernels.benchmark(bargs)
    except Exception:  # recorded in the JSON; the exit status says it failed
        return dict(error=traceback.format_exc()[-TAIL_CHARS:], argv=argv)
    result = dict(argv=argv, meta=meta, rows=rows, skipped=skipped,
                  seconds=round(time.monotonic() - started, 1))
    head = [r for r in rows if (r["batch"], r["context"]) == bench_kernels.HEADLINE]
    for key in ("fused_cost_ratio", "sdpa_ratio", "stats_bytes_per_request", "max_abs_err"):
        result[key] = {r["dtype"]: r[key] for r in head}  # batch 64, 8k context, per dtype
    if rows:
        md, csv_path = bench_kernels.write_results(rows, meta, bargs.out_dir or bench_kernels.RESULTS)
        result.update(markdown=str(md), csv=str(csv_path))
        print(f"bench: wrote {md} and {csv_path}", flush=True)
        print(f"bench: fused_cost_ratio {result['fused_cost_ratio']} (goal <= 1.05), plain / "
              f"SDPA {result['sdpa_ratio']}, statistics bytes per request "
              f"{result['stats_bytes_per_request']}", flush=True)
    else:
        result["error"] = "no configuration ran (out of memory or time budget)"
    return result


def versions() -> dict:
    import pytest
    import torch
    import triton

    try:  # optional: only the Triton interpreter (CPU) needs it
        import numpy

        numpy_version = numpy.__version__
    except ImportError:
        numpy_version = None
    return dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version(), triton=triton.__version__,
                pytest=pytest.__version__, numpy=numpy_version)


def device_info() -> dict:
    import torch

    props = torch.cuda.get_device_properties(0)
    info = dict(name=torch.cuda.get_device_name(0), count=torch.cuda.device_count(),
                capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                memory_GiB=round(props.total_memory / 2**30, 1))
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            info["driver"] = subprocess.run(
                [smi, "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"],
                capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def git_info() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=20).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(commit=commit, dirty=bool(dirty)) if commit else {}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path,
                   default=Path(os.environ.get("KVEVICT_GPU_CHECK_JSON") or HERE / "results" / "gpu_check.json"))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--bench-dtypes", nargs="+", default=["float16", "bfloat16"], choices=DTYPES,
                   help="the headline shape (batch 64, 8k) in each, the grid in the first")
    p.add_argument("--bench-batches", type=int, nargs="+", help="default: bench_kernels.py's")
    p.add_argument("--bench-contexts", type=int, nargs="+", help="default: bench_kernels.py's")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    try:
        ok = nvidia_gpu()
    except ImportError as exc:
        print(f"gpu_check: cannot import torch ({exc}); it needs python with torch, triton, pytest")
        return 1
    if not ok:
        print("gpu_check: no NVIDIA GPU found (torch.cuda.is_available() is False, or ROCm); "
              "nothing run, nothing written. CPU checks: pytest tests/kernels (Triton interpreter).")
        return 0
    try:
        import pytest  # noqa: F401
        import triton  # noqa: F401
    except ImportError as exc:
        print(f"gpu_check: {exc}: this check needs torch, triton and pytest (no install is done)")
        return 1

    log_dir = Path(tempfile.mkdtemp(prefix="kvevict_gpu_check_"))
    report = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), device=device_info(),
                  versions=versions(), git=git_info(), host=platform.node(), logs=str(log_dir))
    print(f"gpu_check on {report['device']['name']}: torch {report['versions']['torch']} "
          f"(CUDA {report['versions']['cuda']}), triton {report['versions']['triton']}; "
          f"logs in {log_dir}", flush=True)

    report["pytest"] = run_tests(log_dir, args.dtypes, TEST_TIMEOUT_S)
    tests_ok = all(r["returncode"] == 0 and not r["timed_out"] for r in report["pytest"].values())
    report["tests_ok"] = tests_ok
    bench_ok = True
    if not args.skip_bench:
        budget = max(60.0, BUDGET_S - (time.monotonic() - started))
        report["bench"] = run_bench(args, budget)
        bench_ok = "error" not in report["bench"]
    report["seconds"] = round(time.monotonic() - started, 1)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"gpu_check: wrote {args.out} ({report['seconds']:.0f} s)", flush=True)
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy2(args.out, out / args.out.name)
        for key in ("markdown", "csv"):
            if report.get("bench", {}).get(key):
                shutil.copy2(report["bench"][key], out)
        shutil.copytree(log_dir, out / "gpu_check_logs", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("tmp_*"))  # the tests' tmp_path folders
        print(f"gpu_check: copied the JSON, tables and logs to {out}")
    for dtype, result in report["pytest"].items():
        for failure in result["failures"]:
            print(f"FAILED [{dtype}] {failure}")
    return 0 if tests_ok and bench_ok else 1


if __name__ == "__main__":
    sys.exit(main())
