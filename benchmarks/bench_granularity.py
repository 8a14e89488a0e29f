"""What token granularity would buy: each policy's prefill decision applied per 32-token block,
per 16-token block (one kept set for every layer and head, as a paged engine must keep it) or per
token with a uniform count per (layer, KV head) (what compacting kept tokens inside the paged
cache could give), in one transformers reference, same prompts and budgets.

Protocol, per prompt (SmolLM2-135M float32, eager attention, no engine):

1. prefill with the full cache. The statistics the engine measures at prefill are taken from
   that pass with the repository's reference formulas (``vllm_kvevict.kernels.reference``): the
   softmax attention of the last 32 prompt queries ``[L, Hq, 32, T]`` and the projected-value
   norms ``‖v W_O^h‖`` ``[L, Hq, T]``. The first answer token comes from the prefill, as in the
   engine (eviction acts after the step that scored it).
2. each policy's ``block_scores`` and ``select`` decide once, with the scheduler's protection
   rule (``EvictionConfig.protection``, default protection) in the unit of the granularity:
   * ``block32`` / ``block16``: statistics handed over with that block size; the excluded
     blocks' tokens are hidden from every layer and head;
   * ``token``: block size 1, one kept set for all layers and heads (granularity alone);
   * ``token/head``: the policy is run on each (layer, KV head) alone with block size 1 (its
     statistics sliced to that layer and the query heads of that group), so every (layer, KV
     head) keeps its own best ``ceil(budget * T)`` tokens, protection included: what compacting
     kept tokens inside the paged cache could give (a uniform count per (layer, KV head)).
3. greedy decoding (10 tokens) with the excluded keys masked per (layer, query head); correct
   iff the first number written is the answer (tasks.is_correct).

Only the first decision is applied (no re-decision during the 10 answer tokens): the same
protocol for every granularity. The ``block32`` cells are what the engine does; compare them
with ``natural.json`` / ``quality.json`` as a check of the reference.

    python benchmarks/bench_granularity.py                         # natural 1536 x 12 + quick
    python benchmarks/bench_granularity.py --natural 1536:12 --profile "" --policies laprox
    python benchmarks/bench_granularity.py --resume      # add the prompts not yet in the file

Writes ``results/granularity.json`` (rows + summary) and prints the table.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402

#: name -> (tokens per unit, one kept set per (layer, KV head)?)
GRANULARITIES = {"block32": (32, False), "block16": (16, False), "token": (1, False),
                 "token/head": (1, True)}
BUDGETS = (0.25, 0.1, 0.05)
WINDOW = 32


class Reference:
    """SmolLM2 in transformers with its attention replaced by an exact eager twin that (a)
    records the prefill statistics and (b) adds a per-(layer, query head) key mask."""

    def __init__(self):
        from transformers import AutoModelForCausalLM
        from transformers.models.llama import modeling_llama
        from vllm_kvevict.kernels.reference import wo_gram

        from vllm_kvevict.models import model_path

        self.model = AutoModelForCausalLM.from_pretrained(
            str(model_path()), dtype=torch.float32, attn_implementation="eager").eval()
        cfg = self.model.config
        self.layers, self.hq, self.hkv = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
        self.eos = cfg.eos_token_id
        self.grams = [wo_gram(layer.self_attn.o_proj.weight.detach(), self.hq)
                      for layer in self.model.model.layers]
        self.repeat_kv = modeling_llama.repeat_kv
        self.capture: dict | None = None
        self.hidden: torch.Tensor | None = None  # [L, Hq, T0] bool keys hidden from decode
        modeling_llama.eager_attention_forward = self._attention

    def _attention(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **_):
        from vllm_kvevict.kernels.reference import dense_value_proj_norm

        layer = module.layer_idx
        groups = self.hq // self.hkv
        k, v = self.repeat_kv(key, groups), self.repeat_kv(value, groups)
        logits = torch.matmul(query, k.transpose(2, 3)) * scaling  # [1, Hq, Q, K]
        q_len, k_len = logits.shape[-2:]
        if attention_mask is not None:
            logits = logits + attention_mask[..., :k_len]
        elif q_len > 1:
            causal = torch.ones(q_len, k_len, dtype=torch.bool).triu(k_len - q_len + 1)
            logits = logits.masked_fill(causal, float("-inf"))
        if self.hidden is not None:
            t0 = self.hidden.shape[-1]
            logits[..., :t0] = logits[..., :t0].masked_fill(self.hidden[layer][None, :, None, :],
                                                            float("-inf"))
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        if self.capture is not None:
            self.capture["window_attn"][layer] = probs[0, :, -WINDOW:, :].clone()
            self.capture["value_proj_norm"][layer] = dense_value_proj_norm(
                value[0].transpose(0, 1), self.grams[layer])
        return torch.matmul(probs, v).transpose(1, 2).contiguous(), None

    @torch.no_grad()
    def prefill(self, token_ids: list[int]):
        self.capture = {"window_attn": [None] * self.layers, "value_proj_norm": [None] * self.layers}
        out = self.model(input_ids=torch.tensor([token_ids]), use_cache=True)
        stats = {k: torch.stack(v) for k, v in self.capture.items()}
        self.capture = None
        return out.past_key_values, int(out.logits[0, -1].argmax()), stats

    @torch.no_grad()
    def decode(self, cache, first: int, hidden: torch.Tensor | None, max_tokens: int) -> list[int]:
        """Greedy tokens after the prompt; ``hidden`` [L, Hkv, T] bool; the cache is restored."""
        t0 = cache.get_seq_length()
        self.hidden = None if hidden is None else hidden.repeat_interleave(self.hq // self.hkv, 1)
        tokens = [first]
        try:
            while len(tokens) < max_tokens and tokens[-1] != self.eos:
                out = self.model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache,
                                 use_cache=True)
                tokens.append(int(out.logits[0, -1].argmax()))
        finally:
            self.hidden = None
            grown = cache.get_seq_length() - t0
            if grown:  # crop(-n) drops the answer's n tokens (crop(0) would drop everything)
                cache.crop(-grown)
        return tokens


def request_stats(stats: dict, block_size: int, layers=slice(None), heads=slice(None),
                  num_kv_heads: int = 1):
    from vllm_kvevict.policies.base import RequestStatistics

    window, vnorm = stats["window_attn"][layers, heads], stats["value_proj_norm"][layers, heads]
    t = window.shape[-1]
    nb = math.ceil(t / block_size)
    return RequestStatistics(block_size=block_size, block_index=torch.arange(nb), num_tokens=t,
                        num_kv_heads=num_kv_heads, parked=torch.zeros(nb, dtype=torch.bool),
                        phase="prefill", window_attn=window, value_proj_norm=vnorm)


def kept_tokens(policy, scores: torch.Tensor, budget: float, num_tokens: int, block_size: int):
    """[T] bool kept by the first decision over these block scores."""
    from diagnose_natural import protected_mask  # the scheduler's rule, default protection

    protected, keep = protected_mask("new", budget, math.ceil(num_tokens / block_size),
                                     num_tokens, block_size)
    d = policy.select(scores, block_index=torch.arange(scores.numel()), keep_blocks=keep,
                      protected=protected, bin_blocks=0)
    blocks = torch.zeros(scores.numel(), dtype=torch.bool)
    blocks[d.keep] = True
    return blocks.repeat_interleave(block_size)[:num_tokens]


def decisions(name: str, stats: dict, hkv: int, budgets) -> dict[tuple[str, float], torch.Tensor]:
    """{(granularity, budget): kept [L, Hkv, T] bool} of one policy (scores once per granularity)."""
    from vllm_kvevict.policies import get_policy

    policy = get_policy(name, {})
    n_layers, hq, _, t = stats["window_attn"].shape
    g = hq // hkv
    out = {}
    for gran, (bs, per_head) in GRANULARITIES.items():
        if not per_head:
            scores = policy.block_scores(request_stats(stats, bs, num_kv_heads=hkv), {})
            for b in budgets:
                out[gran, b] = kept_tokens(policy, scores, b, t, bs).expand(n_layers, hkv, t)
            continue
        per_head = [[policy.block_scores(
            request_stats(stats, 1, slice(li, li + 1), slice(kv * g, (kv + 1) * g)), {})
            for kv in range(hkv)] for li in range(n_layers)]
        for b in budgets:
            out[gran, b] = torch.stack([torch.stack([kept_tokens(policy, s, b, t, 1) for s in row])
                                        for row in per_head])
    return out


def evaluate(ref: Reference, sample, policies, budgets) -> list[dict]:
    from tasks import extract_answer, is_correct, tokenizer

    tok = tokenizer()
    cache, first, stats = ref.prefill(sample.token_ids)
    t = len(sample.token_ids)
    span = answer_span(sample)
    base = {"prompt_id": sample.seed, "task": sample.task, "context_tokens": t, "depth": sample.depth,
            "answer": sample.answer}

    def row(policy, gran, budget, hidden):
        text = tok.decode(ref.decode(cache, first, hidden, common.MAX_TOKENS))
        r = {**base, "policy": policy, "granularity": gran, "budget": budget, "output": text,
             "extracted": extract_answer(text), "correct": is_correct(text, sample.answer)}
        if hidden is not None:
            kept = ~hidden
            r["kept_fraction"] = kept.float().mean().item()
            if span is not None:  # share of (layer, KV head) keeping every answer token
                r["answer_kept_share"] = kept[..., span[0]:span[1]].all(-1).float().mean().item()
        return r

    rows = [row(common.FULL, "-", 1.0, None)]
    for name in policies:
        for (gran, budget), kept in decisions(name, stats, ref.hkv, budgets).items():
            rows.append(row(name, gran, budget, ~kept))
    return rows


def answer_span(sample) -> tuple[int, int] | None:
    if sample.task != "natural":
        return None
    from bench_natural import answer_span as span

    return span(sample)


def summarize(rows: list[dict]) -> list[dict]:
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["policy"], r["budget"], r["granularity"]), []).append(r)
    out = []
    for (policy, budget, gran), rs in cells.items():
        c, n = sum(r["correct"] for r in rs), len(rs)
        lo, hi = common.wilson(c, n)
        share = [r["answer_kept_share"] for r in rs if "answer_kept_share" in r]
        out.append({"policy": policy, "budget": budget, "granularity": gran, "correct": c, "n": n,
                    "ci_low": lo, "ci_high": hi,
                    "kept_fraction": sum(r.get("kept_fraction", 1.0) for r in rs) / n,
                    "natural_answer_kept_share": sum(share) / len(share) if share else None})
    return out


def table(summary: list[dict], policies, budgets) -> str:
    by = {(s["policy"], s["budget"], s["granularity"]): s for s in summary}
    header = ["policy"] + [f"{b:.0%} {g}" for b in budgets for g in GRANULARITIES]
    lines = []
    full = by.get((common.FULL, 1.0, "-"))
    if full:
        lines.append(["full cache", f"{full['correct']}/{full['n']}"] + [""] * (len(header) - 2))
    for p in policies:
        cells = []
        for b in budgets:
            for g in GRANULARITIES:
                s = by.get((p, b, g))
                cells.append(f"{s['correct']}/{s['n']} [{s['ci_low']:.2f}, {s['ci_high']:.2f}]"
                             if s else "")
        lines.append([p] + cells)
    return common.markdown_table(header, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--natural", default="1536:12", help="CTX:PROMPTS[,CTX:PROMPTS] ('' = none)")
    parser.add_argument("--profile", default="quick", choices=["", *sorted(common.PROFILES)],
                        help="also the templated prompts of that bench_quality profile")
    parser.add_argument("--policies", default="",
                        help="comma-separated registered policies (default: every compared "
                        "method, common.compared_policies())")
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--out", default="granularity.json")
    parser.add_argument("--resume", action="store_true",
                        help="keep the prompts already in --out, measure only the others")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from bench_natural import depths
    from tasks import make_samples

    policies = common.check_policies(args.policies) or common.compared_policies()
    budgets = [float(b) for b in args.budgets.split(",")]
    samples = []
    for part in filter(None, args.natural.split(",")):
        ctx, n = (int(x) for x in part.split(":"))
        samples += make_samples("natural", ctx, depths(n), 1, common.SEED)
    if args.profile:
        samples += common.profile_samples(common.PROFILES[args.profile])
    started = time.perf_counter()
    rows: list[dict] = []
    result = {"command": common.command(), "protocol": __doc__.split("Protocol, per prompt")[1]
              .split("    python")[0].strip(), "natural": args.natural, "profile": args.profile,
              "policies": policies, "budgets": budgets, "granularities": GRANULARITIES,
              "versions": common.versions(), "machine": common.machine()}
    path = common.RESULTS / args.out
    if args.resume and path.exists():  # keep the prompts already measured, add the others
        import json

        old = json.loads(path.read_text())
        rows = old["rows"]
        result["command"] = f"{old['command']} + {result['command']}"
    done = {r["prompt_id"] for r in rows}
    todo = [s for s in samples if s.seed not in done]
    ref = Reference() if todo else None
    for i, s in enumerate(todo):
        rows += evaluate(ref, s, policies, budgets)
        result.update(rows=rows, summary=summarize(rows), elapsed_s=time.perf_counter() - started)
        common.write_json(args.out, result)
        print(f"  {i + 1}/{len(todo)} prompts ({s.task} {s.context_tokens}), "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    result.update(rows=rows, summary=summarize(rows), prompts_done=len({r["prompt_id"] for r in rows}))
    for label, keep in (("natural", lambda r: r["task"] == "natural"),
                        ("templated", lambda r: r["task"] != "natural"), ("all", lambda r: True)):
        part = [r for r in rows if keep(r)]
        if part:
            result[f"summary_{label}"] = summarize(part)
            print(f"\n{label} ({len({r['prompt_id'] for r in part})} prompts)")
            print(table(result[f"summary_{label}"], policies, budgets))
    common.write_json(args.out, result)


if __name__ == "__main__":
    main()
