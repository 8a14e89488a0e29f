"""Offline diagnosis of the window-scored policies on the natural task (no engine).

Reads the prefill statistics bench_natural.py ``--capture`` saved (the engine's own window
attention [L, Hq, W, T] and projected-value norms of each prompt), re-runs each policy's
``block_scores`` with option variants, and reports for every variant: the answer block's rank
among the unprotected blocks, and whether the scheduler's selection (same protection rule as
the engine, both arms) would keep it at 10 % and 5 %. Also the window-attention mass profile
(share on the sink block, the window block, the blocks next to them, the answer block).

    python benchmarks/diagnose_natural.py /tmp/natcap/stats.pt [--out FILE] [--experiment diagnosis]

``--experiment NAME`` folds the report into results/natural.json's ``experiments[NAME]`` (where
results/natural.md cites it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from vllm_kvevict.config import EvictionConfig  # noqa: E402
from vllm_kvevict.policies import get_policy  # noqa: E402
from vllm_kvevict.policies.base import RequestStatistics  # noqa: E402

ARMS = {"new": {}, "old": {"sink_tokens": 4, "recent_tokens": 64}}
VARIANTS = {
    "snapkv": [{}, {"pool_kernel": 1}, {"pool_kernel": 3}, {"head_reduce": "max"},
               {"pool_kernel": 1, "head_reduce": "max"}, {"window": 16}, {"window": 8},
               {"protect_window": False}],
    "hae": [{}, {"window": 16}, {"window": 8}],
    "hybridkv": [{}, {"budget": "uniform"}, {"concentration_threshold": 1.0},
                 {"concentration_threshold": 0.0},
                 {"_merge": "max"}],
    "laprox": [{}, {"pool_kernel": 1}, {"block_reduce": "sum"}],
    "h2o": [{}, {"head_reduce": "max"}],
}


def stats_of(c: dict, window: int | None = None) -> RequestStatistics:
    fields = {k: v for k, v in c.items() if k in RequestStatistics.__dataclass_fields__}
    if window is not None and window < fields["window_attn"].shape[2]:
        fields["window_attn"] = fields["window_attn"][:, :, -window:]  # rows are per query: exact
    return RequestStatistics(**fields)


def protected_mask(arm: str, budget: float, nb: int, committed: int, bs: int) -> torch.Tensor:
    """The scheduler's own protection (``adapter/budget.py``) for a prompt of ``committed``
    tokens in ``nb`` blocks, every block scored; also the number of blocks the budget keeps."""
    from vllm_kvevict.adapter.budget import request_budget

    cfg = EvictionConfig(policy="snapkv", budget=budget, floor_tokens=0, **ARMS[arm])  # the policy at its budget
    b = request_budget(cfg, committed, committed, bs)
    return torch.from_numpy(b.protected(np.arange(nb))), b.keep_blocks


def mass_profile(c: dict) -> dict:
    """Window attention per block: mean over (layer, head) of the raw mass, and of the mass
    renormalised over the blocks strictly between the sink block and the window block."""
    a = c["window_attn"].float().sum(2)  # [L, H, T] summed over the window queries
    bs = c["block_size"]
    nb = c["block_index"].numel()
    blocks = a.reshape(*a.shape[:2], nb, bs).sum(-1)  # [L, H, nb]
    raw = (blocks / blocks.sum(-1, keepdim=True)).mean((0, 1))
    inner = blocks[..., 1:-1]
    inner = (inner / inner.sum(-1, keepdim=True)).mean((0, 1))
    ans = sorted({t // bs for t in range(*c["answer_tokens"])})
    uniform = 1 / (nb - 2)
    return {"sink_block": raw[0].item(), "window_block": raw[-1].item(),
            "block_1": raw[1].item(), "block_before_window": raw[-2].item(),
            "answer_block_raw": [raw[b].item() for b in ans],
            "inner_uniform_share": uniform,
            "inner_block_1_x_uniform": inner[0].item() / uniform,
            "inner_before_window_x_uniform": inner[-1].item() / uniform,
            "inner_answer_x_uniform": [inner[b - 1].item() / uniform for b in ans if 0 < b < nb - 1],
            "inner_top5_blocks": (torch.topk(inner, 5).indices + 1).tolist()}


def hybridkv_max_merge(pol, stats: RequestStatistics) -> torch.Tensor:
    """HybridKV's prefill need per (layer, KV head), merged by max instead of its weighted
    mixture (what-if, not an option of the policy)."""
    from vllm_kvevict.policies.base import tokens_to_blocks
    from vllm_kvevict.policies.hybridkv import _rownorm

    static, _, a = pol.classify(stats)
    need_tok = torch.where(static[..., None], pol.static_token_need(a, stats.visual), a)
    need = _rownorm(tokens_to_blocks(need_tok, stats.block_size, stats.num_blocks))
    return need.amax((0, 1))


def evaluate(c: dict, policy: str, options: dict) -> dict:
    opts = {k: v for k, v in options.items() if not k.startswith("_")}
    pol = get_policy(policy, opts)
    stats = stats_of(c, options.get("window"))
    if options.get("_merge") == "max":
        scores = hybridkv_max_merge(pol, stats)
        scores[-1] = scores.max()  # the window block, as protect_window would
    else:
        scores = pol.block_scores(stats, {})
    nb, bs, t = stats.num_blocks, stats.block_size, stats.num_tokens
    ans = sorted({x // bs for x in range(*c["answer_tokens"])})
    out = {"policy": policy, "options": options}
    for arm in ARMS:
        for budget in (0.1, 0.05):
            prot, keep = protected_mask(arm, budget, nb, t, bs)
            d = pol.select(scores, block_index=stats.block_index, keep_blocks=keep,
                           protected=prot, bin_blocks=0)
            kept = set(d.keep.tolist())
            free = [b for b in range(nb) if not prot[b]]
            order = sorted(free, key=lambda b: (-scores[b].item(), b))
            out[f"{arm}@{budget}"] = {
                "answer_kept": all(b in kept for b in ans),
                "answer_rank": [order.index(b) + 1 if b in order else None for b in ans],
                "scored_kept": sorted(kept - set(torch.nonzero(prot).flatten().tolist())),
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stats")
    parser.add_argument("--out", default="")
    parser.add_argument("--experiment", default="",
                        help="fold the report into results/natural.json's experiments[NAME]")
    args = parser.parse_args()
    captured = torch.load(args.stats)
    report = {"prompts": [], "variants": []}
    for c in captured:
        report["prompts"].append({"prompt_id": c["prompt_id"], "answer_tokens": c["answer_tokens"],
                                  "num_blocks": c["block_index"].numel(),
                                  "mass": mass_profile(c)})
    for policy, variants in VARIANTS.items():
        for opts in variants:
            per = [evaluate(c, policy, opts) for c in captured]
            row = {"policy": policy, "options": opts, "n": len(per)}
            for key in (f"{a}@{b}" for a in ARMS for b in (0.1, 0.05)):
                ranks = [r[key]["answer_rank"][0] for r in per if r[key]["answer_rank"][0]]
                row[key] = {"answer_kept": sum(r[key]["answer_kept"] for r in per),
                            "median_rank": sorted(ranks)[len(ranks) // 2] if ranks else None,
                            "ranks": [r[key]["answer_rank"] for r in per],
                            "scored_kept": [r[key]["scored_kept"] for r in per]}
            report["variants"].append(row)
            print(f"{policy:9s} {json.dumps(opts):45s} " + "  ".join(
                f"{k}: kept {row[k]['answer_kept']}/{len(per)} med rank {row[k]['median_rank']}"
                for k in ("new@0.1", "old@0.1", "new@0.05")), flush=True)
    m = [p["mass"] for p in report["prompts"]]

    def avg(key):
        return sum(x[key] for x in m) / len(m)

    print("\nwindow-attention mass, mean over prompts (raw share of (layer, head)-normalised mass):")
    for key in ("sink_block", "block_1", "block_before_window", "window_block",
                "inner_block_1_x_uniform", "inner_before_window_x_uniform"):
        print(f"  {key}: {avg(key):.4f}")
    ans = [v for x in m for v in x["inner_answer_x_uniform"]]
    print(f"  inner_answer_x_uniform (mean over prompts): {sum(ans) / max(len(ans), 1):.3f}")
    print("  inner top-5 blocks per prompt:", [x["inner_top5_blocks"] for x in m])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    if args.experiment:
        import common

        report["command"] = common.command()
        common.write_json("natural.json", report, args.experiment)
    _ = math


if __name__ == "__main__":
    main()
