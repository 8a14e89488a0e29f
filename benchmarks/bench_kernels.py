"""GPU microbenchmark: what measuring block statistics inside paged decode attention costs.

For batch ∈ {1, 8, 32, 256} × context ∈ {1k, 4k, 16k} (all requests of a batch at the full
context, block tables shuffled like a real pool) it times one decode step of one layer:

sdpa_dense         torch SDPA on pre-gathered contiguous K/V (no paging: a lower bound)
sdpa_gather        gathering the paged blocks + torch SDPA (a non-paged kernel on a paged cache)
triton_plain       our paged kernel, statistics off
triton_fused       our paged kernel + per-block attention mass and Σp² (what the policies need)
triton_fused_probs the same + full per-token probabilities (``token_probs=True``)
triton_fused_loop  the fused kernel called once per request (as the worker scored before
                   batching): against ``triton_fused``, what one batched launch for all the
                   step's scored requests saves (``batched_speedup``)

and checks the fused output against the dense SDPA output. Writes a markdown table and a CSV
to ``benchmarks/results/``. Without an NVIDIA GPU it says so and exits 0 (no numbers).
Needs only torch and triton: from a bare checkout it imports ``kernels/`` by path.

    python benchmarks/bench_kernels.py [--dtype float16] [--heads 32 --kv-heads 8 --head-dim 128]
        [--batches 1 8 32] [--contexts 1024 4096 16384] [--time-budget-s S] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

BATCHES = (1, 8, 32, 256)
CONTEXTS = (1024, 4096, 16384)
VARIANTS = ("sdpa_dense", "sdpa_gather", "triton_plain", "triton_fused", "triton_fused_probs",
            "triton_fused_loop")
RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def ensure_kernels_importable() -> None:
    """``vllm_kvevict.kernels`` from a bare checkout too (``vllm_kvevict/__init__.py``)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import vllm_kvevict  # dependency-free

    vllm_kvevict.ensure_kernels_importable()


def make_inputs(batch, context, args, device, seed=0):
    """Paged caches holding ``batch`` requests of ``context`` tokens, block ids shuffled."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dtype = getattr(torch, args.dtype)
    bs, hkv, d = args.block_size, args.kv_heads, args.head_dim
    per_req = math.ceil(context / bs)
    num_blocks = batch * per_req
    shape = (num_blocks, bs, hkv, d)
    key = torch.randn(shape, generator=gen).to(device, dtype)
    value = torch.randn(shape, generator=gen).to(device, dtype)
    table = torch.randperm(num_blocks, generator=gen).view(batch, per_req).to(device, torch.int32)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    query = torch.randn(batch, args.heads, d, generator=gen).to(device, dtype)
    return dict(query=query, key=key, value=value, table=table, seq_lens=seq_lens)


def dense_kv(inp, context):
    """[B, Hkv, T, D] contiguous copies of every request's keys and values."""
    def gather(cache):
        b, nb = inp["table"].shape
        blocks = cache[inp["table"].long().flatten()]  # [B*nb, bs, Hkv, D]
        return blocks.view(b, -1, *cache.shape[2:])[:, :context].transpose(1, 2).contiguous()
    return gather(inp["key"]), gather(inp["value"])


def variants(inp, context):
    ensure_kernels_importable()
    from vllm_kvevict.kernels.paged_decode import paged_decode_attention

    q4 = inp["query"][:, :, None, :]  # [B, Hq, 1, D]
    k_dense, v_dense = dense_kv(inp, context)
    paged = (inp["query"], inp["key"], inp["value"], inp["table"], inp["seq_lens"])
    q, t, n = inp["query"], inp["table"], inp["seq_lens"]

    def sdpa_gather():
        k, v = dense_kv(inp, context)
        return F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)

    fns = {
        "sdpa_dense": lambda: F.scaled_dot_product_attention(q4, k_dense, v_dense, enable_gqa=True),
        "sdpa_gather": sdpa_gather,
        "triton_plain": lambda: paged_decode_attention(*paged, stats=False),
        "triton_fused": lambda: paged_decode_attention(*paged),
        "triton_fused_probs": lambda: paged_decode_attention(*paged, token_probs=True),
        "triton_fused_loop": lambda: [
            paged_decode_attention(q[i:i + 1], inp["key"], inp["value"], t[i:i + 1], n[i:i + 1])
            for i in range(q.shape[0])],
    }
    return fns


def run_config(batch, context, args, device, timer):
    """One table row: microseconds per variant, fused overhead, K/V bandwidth, output error."""
    inp = make_inputs(batch, context, args, device)
    fns = variants(inp, context)
    reference = fns["sdpa_dense"]()[:, :, 0].float()
    fused = fns["triton_fused"]()
    err = (fused.output.float() - reference).abs().max().item()
    # each KV head's block mass sums to its number of query heads
    mass_err = (fused.block_mass.sum(1) - args.heads // args.kv_heads).abs().max().item()
    row = dict(batch=batch, context=context, max_abs_err=err, mass_sum_err=mass_err)
    for name in VARIANTS:
        row[f"{name}_us"] = timer(fns[name]) * 1e3
    kv_bytes = 2 * inp["key"][0].numel() * inp["key"].element_size() * inp["table"].numel()
    row["fused_overhead_pct"] = 100 * (row["triton_fused_us"] / row["triton_plain_us"] - 1)
    row["batched_speedup"] = row["triton_fused_loop_us"] / row["triton_fused_us"]
    row["fused_GBps"] = kv_bytes / (row["triton_fused_us"] * 1e-6) / 1e9
    del inp, fns, fused
    return row


def cuda_timer(fn, warmup_ms=25, rep_ms=100):
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")  # milliseconds


def write_results(rows, meta, out_dir=RESULTS):
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9]+", "_", meta["gpu"]).strip("_").lower()
    csv_path, md_path = out_dir / f"bench_kernels_{tag}.csv", out_dir / f"bench_kernels_{tag}.md"
    fields = list(rows[0].keys())
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"# Paged decode kernels on {meta['gpu']}", "",
             "One decode step of one layer. " + ", ".join(f"{k}={v}" for k, v in meta.items() if k != "gpu"),
             "", "| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    lines += ["| " + " | ".join(fmt(row[f]) for f in fields) + " |" for row in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    p.add_argument("--contexts", type=int, nargs="+", default=list(CONTEXTS))
    p.add_argument("--warmup-ms", type=float, default=25, help="triton do_bench warm-up per variant")
    p.add_argument("--rep-ms", type=float, default=100, help="triton do_bench timing per variant")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="start no new configuration after this many seconds (the rest are skipped)")
    p.add_argument("--out-dir", type=Path, default=None, help="default: benchmarks/results/")
    return p.parse_args(argv)


def benchmark(args, device="cuda"):
    """Every (batch, context) of ``args`` on the GPU: ``(rows, meta, skipped)``.

    ``skipped`` names the configurations not run (out of memory, or past the time budget).
    """
    meta = dict(gpu=torch.cuda.get_device_name(), heads=args.heads, kv_heads=args.kv_heads,
                head_dim=args.head_dim, block_size=args.block_size, dtype=args.dtype,
                torch=torch.__version__, date=datetime.date.today().isoformat())
    timer = lambda fn: cuda_timer(fn, args.warmup_ms, args.rep_ms)  # noqa: E731
    start = time.monotonic()
    rows, skipped = [], []
    for batch in args.batches:
        for context in args.contexts:
            if args.time_budget_s is not None and time.monotonic() - start > args.time_budget_s:
                print(f"batch {batch} context {context}: past the {args.time_budget_s:.0f} s budget, skipped")
                skipped.append(dict(batch=batch, context=context, reason="time budget"))
                continue
            try:
                row = run_config(batch, context, args, device, timer)
            except torch.cuda.OutOfMemoryError:
                print(f"batch {batch} context {context}: out of memory, skipped")
                skipped.append(dict(batch=batch, context=context, reason="out of memory"))
                torch.cuda.empty_cache()
                continue
            rows.append(row)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
            torch.cuda.empty_cache()
    return rows, meta, skipped


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() or torch.version.hip is not None:
        print("bench_kernels: no NVIDIA GPU visible (torch.cuda.is_available() is False or ROCm); "
              "nothing timed. Kernel correctness is checked on CPU by `pytest tests/kernels` "
              "(Triton interpreter). Run this script on a CUDA node.")
        return 0
    rows, meta, _ = benchmark(args)
    if not rows:
        print("bench_kernels: no configuration ran (out of memory or time budget)")
        return 1
    md, csv_path = write_results(rows, meta, args.out_dir or RESULTS)
    print(f"wrote {md} and {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
