"""Multimodal retrieval at tight budgets: requests that are mostly images, the answer in a text
note between them, on ``smollm2-vlm`` (SmolLM2-135M's trained text model, untrained vision tower).

The vision tower is untrained, so nothing can be asked *about* an image; what is measured is
whether a policy keeps the text the answer needs when most of the KV cache is visual. Each
prompt: ``--images`` seeded noise pictures (64 image tokens each, plus 3 wrapper tokens), each
followed by a short ordinary note; one note, after image ``depth * images``, holds a 5-digit
access code; the question comes last. A visual-aware policy (HAE: visual blocks leave first;
HybridKV: text prior) should keep the note where text-agnostic ones (SnapKV, H2O, StreamingLLM,
LaProx) must find it among image blocks.

Per request the eviction report gives the evicted tokens by modality, so the kept fraction of
visual and of text tokens is measured, not inferred.

    python benchmarks/bench_multimodal.py                       # quick: 12 prompts, 3 budgets
    python benchmarks/bench_multimodal.py --prompts 24 --images 12

Writes ``results/multimodal.json`` (rows + summary) and ``results/multimodal.png``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests", "support"))  # engine_helpers

import common  # noqa: E402

BUDGETS = (0.5, 0.25, 0.1)
NOTES = (
    "The museum opens at nine and closes at five.",
    "Our team met on Tuesday to plan the spring fair.",
    "The bakery on the corner sells fresh bread every morning.",
    "Please bring a coat, the evenings are cold here.",
    "The train to the coast leaves from platform two.",
    "Tickets for the concert sold out within an hour.",
    "The garden behind the library has a small pond.",
    "Lunch will be served in the main hall at noon.",
    "The bridge was repainted last summer.",
    "Visitors may park behind the town hall.",
    "The old clock in the square still keeps good time.",
    "Our neighbours grow tomatoes and beans in their yard.",
)
FACT = "The access code for the storage room is {code}."
QUESTION = " What is the access code for the storage room? The access code is"


#: how vLLM's (and transformers') Idefics3 processor expands one ``<image>`` of smollm2-vlm
IMAGE_EXPANSION = "<fake_token_around_image><global-img>" + "<image>" * 64 + "<fake_token_around_image>"
PAD = " -"


def align_images(prompt: str, block_size: int = 32) -> str:
    """Pad the text before each ``<image>`` (with ``PAD``) so its 64 image tokens start at a
    block boundary: each picture then fills exactly two all-image blocks and every other block
    is all text (the wrappers are text tokens)."""
    from transformers import AutoTokenizer

    from vllm_kvevict.models import model_path

    tok = AutoTokenizer.from_pretrained(str(model_path("smollm2-vlm")))
    image_id = tok.convert_tokens_to_ids("<image>")
    pieces = prompt.split("<image>")
    done = pieces[0]
    for k, rest in enumerate(pieces[1:]):
        for _ in range(4 * block_size):
            ids = tok(done.replace("<image>", IMAGE_EXPANSION) + IMAGE_EXPANSION,
                      add_special_tokens=False).input_ids
            first = len(ids) - 1 - 64  # the first of the 64 <image> tokens of this picture
            if ids[first] == image_id and first % block_size == 0:
                break
            done += PAD
        else:
            raise RuntimeError(f"could not align picture {k + 1}")
        done += "<image>" + rest
    return done


def make_prompt(index: int, n_images: int, depth: float, seed: int = common.SEED,
                aligned: bool = False):
    """(prompt text with ``<image>`` placeholders, images, answer); ``aligned``: every picture
    in its own two all-image blocks (:func:`align_images`)."""
    import numpy as np
    from PIL import Image

    rng = random.Random(f"mm:{index}:{n_images}:{depth}:{seed}")
    code = str(rng.randint(10000, 99999))
    notes = [rng.choice(NOTES) for _ in range(n_images)]
    at = min(int(depth * n_images), n_images - 1)
    notes[at] = FACT.format(code=code)
    rs = np.random.RandomState(rng.randrange(2 ** 31))
    pictures = [Image.fromarray(rs.randint(0, 256, (256, 256, 3), dtype=np.uint8))
                for _ in range(n_images)]
    body = "".join(f"Picture {i + 1}: <image> {note} " for i, note in enumerate(notes))
    prompt = "Here are some pictures with notes. " + body + QUESTION
    return (align_images(prompt) if aligned else prompt), pictures, code


def build_llm():
    from engine_helpers import make_llm

    from vllm_kvevict.models import model_path

    return make_llm({"kv_eviction": {"policy": "streamingllm", "budget": 0.5}},
                    model=str(model_path("smollm2-vlm")), max_model_len=8192, max_num_seqs=32,
                    enable_prefix_caching=True, enable_chunked_prefill=False,
                    max_num_batched_tokens=8192)


def block_kinds(ids: list[int], image_token_id: int, block_size: int = 32) -> dict[str, int]:
    """Prompt blocks made only of image tokens, only of other tokens, or mixed (which every
    decision treats as text)."""
    kinds = {"image": 0, "mixed": 0, "text": 0}
    for b in range(0, len(ids), block_size):
        n = sum(t == image_token_id for t in ids[b:b + block_size])
        kinds["image" if n == len(ids[b:b + block_size]) else "text" if n == 0 else "mixed"] += 1
    return kinds


def run(llm, jobs: list[dict], image_token_id: int) -> None:
    from tasks import extract_answer, is_correct
    from vllm import SamplingParams

    prompts = [{"prompt": j["prompt"], "multi_modal_data": {"image": j["images"]}} for j in jobs]
    params = [SamplingParams(temperature=0, max_tokens=common.MAX_TOKENS,
                             extra_args={"kv_eviction": j["kv"]}) for j in jobs]
    for j, out in zip(jobs, llm.generate(prompts, params, use_tqdm=False)):
        text = out.outputs[0].text
        ids = out.prompt_token_ids
        visual = sum(t == image_token_id for t in ids)
        rep = (out.kv_transfer_params or {}).get("kv_eviction") or {}
        total = rep.get("total_tokens", len(ids))
        j.update(output=text, extracted=extract_answer(text), correct=is_correct(text, j["answer"]),
                 prompt_tokens=len(ids), visual_tokens=visual,
                 blocks=block_kinds(ids, image_token_id),
                 visual_kept=1 - rep.get("visual_evicted_tokens", 0) / max(visual, 1),
                 text_kept=1 - rep.get("text_evicted_tokens", 0) / max(total - visual, 1),
                 kept=1 - rep.get("evicted_tokens", 0) / max(total, 1))


def summarize(rows: list[dict]) -> list[dict]:
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["policy"], r["budget"]), []).append(r)
    out = []
    for (policy, budget), rs in cells.items():
        c, n = sum(r["correct"] for r in rs), len(rs)
        lo, hi = common.wilson(c, n)
        means = {k: sum(r[k] for r in rs) / n for k in ("kept", "visual_kept", "text_kept")}
        out.append({"policy": policy, "budget": budget, "correct": c, "n": n, "accuracy": c / n,
                    "ci_low": lo, "ci_high": hi, **means})
    return sorted(out, key=lambda s: (s["policy"] != common.FULL, s["policy"], -s["budget"]))


def plot(summary: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    full = next((s for s in summary if s["policy"] == common.FULL), None)
    if full:
        ax.axhline(full["accuracy"], color="k", ls=":", label="full cache")
    for policy in sorted({s["policy"] for s in summary} - {common.FULL}):
        pts = sorted((s["budget"], s["accuracy"]) for s in summary if s["policy"] == policy)
        ax.plot(*zip(*pts), marker="o", label=policy)
    ax.set_xscale("log")
    ax.set_xticks([b for b, _ in pts], [f"{b:.0%}" for b, _ in pts])
    ax.set_xlabel("KV budget")
    ax.set_ylabel("accuracy")
    ax.set_title("image-heavy prompts, answer in a text note")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--images", type=int, default=10, help="pictures per prompt")
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    parser.add_argument("--policies", default="",
                        help="comma-separated registered policies (default: every compared "
                        "method, common.compared_policies())")
    parser.add_argument("--aligned", action="store_true",
                        help="pad so every picture fills two all-image blocks (no mixed blocks)")
    parser.add_argument("--out", default=None,
                        help="default multimodal.json (--aligned: multimodal_aligned.json)")
    args = parser.parse_args()
    import json

    common.engine_env()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    from vllm_kvevict.models import model_path

    out = args.out or ("multimodal_aligned.json" if args.aligned else "multimodal.json")
    budgets = [float(b) for b in args.budgets.split(",")]
    policies = common.check_policies(args.policies) or common.compared_policies()
    image_token_id = json.loads((model_path("smollm2-vlm") / "config.json").read_text())["image_token_id"]
    started = time.perf_counter()
    llm = build_llm()
    timing = {"engine_start": time.perf_counter() - started}
    depths = [round(0.05 + 0.9 * i / max(args.prompts - 1, 1), 4) for i in range(args.prompts)]
    rows: list[dict] = []
    for i, depth in enumerate(depths):
        prompt, pictures, code = make_prompt(i, args.images, depth, aligned=args.aligned)
        base = {"prompt_index": i, "depth": depth, "answer": code, "prompt": prompt, "images": pictures}
        jobs = [{**base, "policy": common.FULL, "budget": 1.0, "kv": {"policy": "none"}}]
        jobs += [{**base, "policy": p, "budget": b, "kv": {"policy": p, "budget": b}}
                 for p in policies for b in budgets]
        llm.reset_prefix_cache()
        run(llm, jobs, image_token_id)
        rows += [{k: v for k, v in j.items() if k not in ("images", "prompt", "kv")} for j in jobs]
        print(f"  prompt {i + 1}/{len(depths)}: {time.perf_counter() - started:.0f} s", flush=True)
    timing["total"] = time.perf_counter() - started
    summary = summarize(rows)
    result = {"command": common.command(), "model": "smollm2-vlm (untrained vision tower)",
              "images_per_prompt": args.images, "prompts": args.prompts, "budgets": budgets,
              "policies": policies, "aligned": args.aligned,
              "example_prompt": make_prompt(0, args.images, depths[0], aligned=args.aligned)[0],
              "engine": "block 32, max_model_len 8192, prefix caching (reset per prompt), no "
                        "chunked prefill, greedy, max_tokens 10, float32",
              "versions": common.versions(), "machine": common.machine(), "timing_s": timing,
              "blocks_per_prompt": [r["blocks"] for r in rows if r["policy"] == common.FULL],
              "rows": rows, "summary": summary}
    common.write_json(out, result)
    plot(summary, common.RESULTS / out.replace(".json", ".png"))
    print(common.markdown_table(
        ["policy", "budget", "correct/n", "95 % CI", "kept", "visual kept", "text kept"],
        [[s["policy"], f"{s['budget']:.0%}", f"{s['correct']}/{s['n']}",
          f"{s['ci_low']:.2f}-{s['ci_high']:.2f}", f"{s['kept']:.2f}", f"{s['visual_kept']:.2f}",
          f"{s['text_kept']:.2f}"] for s in summary]))
    print(f"total {timing['total']:.0f} s")


if __name__ == "__main__":
    main()
