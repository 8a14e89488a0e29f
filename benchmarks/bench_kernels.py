"""GPU microbenchmark: what measuring block statistics inside the decode attention pass costs.

The plugin's attention backend (``vllm_kvevict/backend``) serves decode rows with its own
paged kernel (``kernels/fused_decode.py``), which can fold each block's attention mass into
per-request accumulators as a side output. For each (batch, context) — all requests of a batch
at the full context, block tables shuffled like a real pool, caches in vLLM's GPU layout
(``vllm_layer_caches``, LBHNC) — it times one decode step of one layer:

sdpa_dense     torch SDPA (its flash path) on pre-gathered contiguous K/V: no paging, a lower
               bound; vLLM's own kernels are not available without vLLM
sdpa_gather    gathering the paged blocks + torch SDPA (a non-paged kernel on a paged cache)
plain          the backend's kernel, side output off (no row scored)
fused          the same launch with every row scored (H2O's and HybridKV's worst case: every
               request every step)

and reports ``fused_cost_ratio = fused / plain`` (the goal: <= 1.05), ``sdpa_ratio = plain /
sdpa_dense``, the statistics' device bytes per scored request (``stats_bytes_per_request``:
Σ and max accumulators + the kernel's per-block partials), and checks the output against the
dense SDPA output and the attended mass (each KV head's blocks sum to its query heads). Writes
a markdown table and a CSV to ``benchmarks/results/``. Without an NVIDIA GPU it says so and
exits 0 (no numbers). Needs only torch and triton: from a bare checkout it imports
``kernels/`` by path.

    python benchmarks/bench_kernels.py [--dtype float16] [--heads 32 --kv-heads 8 --head-dim 128]
        [--batches 1 8 64] [--contexts 1024 8192] [--time-budget-s S] [--out-dir DIR]
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

BATCHES = (1, 8, 64, 256)
CONTEXTS = (1024, 8192, 16384)
#: the shape the issue names: Llama-8B (32 query / 8 KV heads, head 128), batch 64, 8k context
HEADLINE = (64, 8192)
VARIANTS = ("sdpa_dense", "sdpa_gather", "plain", "fused")
RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def ensure_kernels_importable() -> None:
    """``vllm_kvevict.kernels`` from a bare checkout too (``vllm_kvevict/__init__.py``)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import vllm_kvevict  # dependency-free

    vllm_kvevict.ensure_kernels_importable()


def make_inputs(batch, context, args, device, seed=0):
    """Paged caches in vLLM's GPU layout holding ``batch`` requests of ``context`` tokens, block
    ids shuffled; the statistics buffers of a batch where every row is scored."""
    ensure_kernels_importable()
    from vllm_kvevict.kernels.fused_decode import split_scratch
    from vllm_kvevict.kernels.paged import PagedKV, vllm_layer_caches

    gen = torch.Generator(device="cpu").manual_seed(seed)
    dtype = getattr(torch, args.dtype)
    bs, hkv, d, hq = args.block_size, args.kv_heads, args.head_dim, args.heads
    per_req = math.ceil(context / bs)
    num_blocks = batch * per_req
    cache = vllm_layer_caches(1, num_blocks, hkv, bs, d, "LBHNC", dtype, device)[0]
    cache.copy_(torch.randn(cache.shape, generator=gen).to(dtype))
    kv = PagedKV.from_vllm(cache, d)
    table = torch.randperm(num_blocks, generator=gen).view(batch, per_req).to(device, torch.int32)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    query = torch.randn(batch, hq, d, generator=gen).to(device, dtype)
    f32 = dict(dtype=torch.float32, device=device)
    stats = dict(
        slot=torch.arange(batch, dtype=torch.int32, device=device),
        park_ids=torch.zeros(1, dtype=torch.int32, device=device),
        park_start=torch.zeros(batch + 1, dtype=torch.int32, device=device),
        mass=torch.zeros(batch, hkv, per_req, **f32), peak=torch.zeros(batch, hkv, per_req, **f32),
        block_partials=(torch.empty(batch, per_req, hq, **f32), torch.empty(batch, per_req, hq, **f32)),
    )
    return dict(query=query, key=kv.key, value=kv.value, table=table, seq_lens=seq_lens,
                out=torch.empty_like(query), stats=stats,
                scratch=split_scratch(batch, hq, hkv, d, device))


def stats_bytes_per_request(inp) -> int:
    """Device bytes the statistics hold per scored request (accumulators + partials)."""
    s = inp["stats"]
    return sum(t[0].numel() * t.element_size() for t in (s["mass"], s["peak"], *s["block_partials"]))


def dense_kv(inp, context):
    """[B, Hkv, T, D] contiguous copies of every request's keys and values."""
    def gather(cache):
        b, nb = inp["table"].shape
        blocks = cache[inp["table"].long().flatten()]  # [B*nb, bs, Hkv, D]
        return blocks.reshape(b, -1, *cache.shape[2:])[:, :context].transpose(1, 2).contiguous()
    return gather(inp["key"]), gather(inp["value"])


def variants(inp, context):
    ensure_kernels_importable()
    from vllm_kvevict.kernels.fused_decode import fused_decode_attention

    q4 = inp["query"][:, :, None, :]  # [B, Hq, 1, D]
    k_dense, v_dense = dense_kv(inp, context)
    paged = (inp["query"], inp["key"], inp["value"], inp["table"], inp["seq_lens"], inp["out"],
             inp["query"].shape[-1] ** -0.5)

    def sdpa_gather():
        k, v = dense_kv(inp, context)
        return F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)

    def fused():
        inp["stats"]["mass"].zero_()  # what the worker does before each step
        inp["stats"]["peak"].zero_()
        return fused_decode_attention(*paged, scratch=inp["scratch"], **inp["stats"])

    return {
        "sdpa_dense": lambda: F.scaled_dot_product_attention(q4, k_dense, v_dense, enable_gqa=True),
        "sdpa_gather": sdpa_gather,
        "plain": lambda: fused_decode_attention(*paged, scratch=inp["scratch"]),
        "fused": fused,
    }


def run_config(batch, context, args, device, timer):
    """One table row: microseconds per variant, the ratios, K/V bandwidth, output error."""
    inp = make_inputs(batch, context, args, device)
    fns = variants(inp, context)
    reference = fns["sdpa_dense"]()[:, :, 0].float()
    out = fns["fused"]().float()
    err = (out - reference).abs().max().item()
    # each KV head's attended blocks sum to its number of query heads (one layer)
    mass_err = (inp["stats"]["mass"].sum(-1) - args.heads // args.kv_heads).abs().max().item()
    row = dict(dtype=args.dtype, batch=batch, context=context, max_abs_err=err,
               mass_sum_err=mass_err)
    for name in VARIANTS:
        row[f"{name}_us"] = timer(fns[name]) * 1e3
    kv_bytes = 2 * inp["key"][0].numel() * inp["key"].element_size() * inp["table"].numel()
    row["fused_cost_ratio"] = row["fused_us"] / row["plain_us"]
    row["sdpa_ratio"] = row["plain_us"] / row["sdpa_dense_us"]
    row["plain_GBps"] = kv_bytes / (row["plain_us"] * 1e-6) / 1e9
    row["stats_bytes_per_request"] = stats_bytes_per_request(inp)
    del inp, fns, out
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
    p.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"],
                   choices=["float16", "bfloat16", "float32"],
                   help="the headline shape runs in each, the grid in the first")
    p.add_argument("--no-headline", dest="headline", action="store_false",
                   help=f"skip batch {HEADLINE[0]} x context {HEADLINE[1]} (unless in the grid)")
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    p.add_argument("--contexts", type=int, nargs="+", default=list(CONTEXTS))
    p.add_argument("--warmup-ms", type=float, default=25, help="triton do_bench warm-up per variant")
    p.add_argument("--rep-ms", type=float, default=100, help="triton do_bench timing per variant")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="start no new configuration after this many seconds (the rest are skipped)")
    p.add_argument("--out-dir", type=Path, default=None, help="default: benchmarks/results/")
    return p.parse_args(argv)


def configs(args) -> list[tuple[str, int, int]]:
    """(dtype, batch, context) in run order: the headline shape in every dtype first, then the
    grid in the first dtype."""
    head = [(dt, *HEADLINE) for dt in args.dtypes] if args.headline else []
    grid = [(args.dtypes[0], b, c) for b in args.batches for c in args.contexts]
    return head + [c for c in grid if c not in head]


def benchmark(args, device="cuda"):
    """Every configuration of ``args`` on the GPU: ``(rows, meta, skipped)``.

    ``skipped`` names the configurations not run (out of memory, or past the time budget).
    """
    meta = dict(gpu=torch.cuda.get_device_name(), heads=args.heads, kv_heads=args.kv_heads,
                head_dim=args.head_dim, block_size=args.block_size,
                torch=torch.__version__, date=datetime.date.today().isoformat())
    timer = lambda fn: cuda_timer(fn, args.warmup_ms, args.rep_ms)  # noqa: E731
    start = time.monotonic()
    rows, skipped = [], []
    for dtype, batch, context in configs(args):
        where = f"{dtype} batch {batch} context {context}"
        if args.time_budget_s is not None and time.monotonic() - start > args.time_budget_s:
            print(f"{where}: past the {args.time_budget_s:.0f} s budget, skipped")
            skipped.append(dict(dtype=dtype, batch=batch, context=context, reason="time budget"))
            continue
        try:
            row = run_config(batch, context, argparse.Namespace(**{**vars(args), "dtype": dtype}),
                             device, timer)
        except torch.cuda.OutOfMemoryError:
            print(f"{where}: out of memory, skipped")
            skipped.append(dict(dtype=dtype, batch=batch, context=context, reason="out of memory"))
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
