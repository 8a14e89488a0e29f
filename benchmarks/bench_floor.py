"""The floor (``floor_tokens``): what it keeps of short requests, what it costs long ones.

Mixed chat traffic on one engine whose default is a 25 % budget: short questions (the demo's
"What is the capital of France?" and others, 40-60 tokens with the chat template), chats that
carry a fact in a few notes (≈ 130-700 tokens) and a pass-key prompt (≈ 1.2k tokens). Each
runs with the full cache (``budget: 1.0``) and at 25 % with each floor, per request
(``kv_eviction.floor_tokens``), for each policy. Reported per request class and floor:

* ``same``: answers equal to the full cache's answer (greedy, same text);
* ``right``: answers containing the expected word;
* ``kept``: KV tokens in attention at the end over all tokens (from each request's
  ``kv_eviction`` report) — what the floor costs in memory against the bare budget.

    python benchmarks/bench_floor.py          # ≈ 3 min on 2 cores

Writes ``results/floor.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests", "support"))  # engine_helpers

import common  # noqa: E402

FLOORS = (0, 128, 256, 512)
#: the policies of the published run (results/floor.json), checked against the registry
POLICIES = ("hae", "laprox", "snapkv")
BUDGET = 0.25
SHORT = [  # (question, a word a right answer contains)
    ("What is the capital of France?", "paris"),
    ("What is the capital of Italy?", "rome"),
    ("What is the largest planet in our solar system?", "jupiter"),
    ("Who wrote Romeo and Juliet?", "shakespeare"),
    ("What is the chemical symbol for gold?", "au"),
    ("How many days are there in a week?", "7|seven"),
    ("What color is the sky on a clear day?", "blue"),
    ("What is the freezing point of water in degrees Celsius?", "0|zero"),
]
NOTES = ("The office opens at nine. Lunch is served at noon in the cafeteria. The printer on "
         "the second floor is broken. Parking is free for visitors. ")
FACTS = [("room", "The team meeting is in room {v}.", "Which room is the team meeting in?"),
         ("code", "The door code is {v}.", "What is the door code?")]


def prompts() -> list[dict]:
    """Chat requests: short questions, notes with one fact (3 lengths), one pass key."""
    jobs = [{"kind": "short", "messages": [{"role": "user", "content": q}], "expect": a}
            for q, a in SHORT]
    for repeats in (2, 8, 20):
        for i, (_, fact, question) in enumerate(FACTS):
            value = str(314 + 97 * repeats + i)
            half = NOTES * (repeats // 2)
            text = f"Notes:\n{half}{fact.format(v=value)} {half}\n{question}"
            jobs.append({"kind": f"notes x{repeats}", "expect": value,
                         "messages": [{"role": "user", "content": text}]})
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. "
    key = "71432"
    jobs.append({"kind": "pass key", "expect": key, "messages": [{"role": "user", "content": (
        filler * 20 + f"The pass key is {key}. Remember it. " + filler * 20
        + "What is the pass key?")}]})
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", default=",".join(POLICIES))
    args = parser.parse_args()
    policies = common.check_policies(args.policies)
    common.engine_env()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import re

    from engine_helpers import make_llm, shutdown
    from vllm import SamplingParams

    started = time.perf_counter()
    llm = make_llm({"kv_eviction": {"policy": "hae", "budget": BUDGET, "interval": 4,
                                    "floor_tokens": 256}})
    jobs = prompts()
    runs = [("full", None, {"budget": 1.0})]
    for policy in policies:
        runs += [(policy, f, {"policy": policy, "budget": BUDGET, "floor_tokens": f})
                 for f in FLOORS]
    rows = []
    answers: dict[int, str] = {}
    for name, floor, kv in runs:
        params = SamplingParams(temperature=0, max_tokens=16, extra_args={"kv_eviction": kv})
        outs = llm.chat([j["messages"] for j in jobs], params, use_tqdm=False)
        for i, (job, out) in enumerate(zip(jobs, outs)):
            text = out.outputs[0].text
            report = (out.kv_transfer_params or {}).get("kv_eviction") or {}
            if name == "full":
                answers[i] = text
            rows.append({
                "policy": name, "floor_tokens": floor, "kind": job["kind"],
                "prompt_tokens": len(out.prompt_token_ids), "answer": text,
                "same": text == answers[i],
                "right": re.search(rf"\b({job['expect']})\b", text.lower()) is not None,
                "total_tokens": report.get("total_tokens", 0),
                "attended_tokens": report.get("attended_tokens", 0),
            })
    shutdown(llm)
    summary = summarize(rows)
    for line in summary:
        print(line)
    common.write_json("floor.json", {"budget": BUDGET, "floors": FLOORS, "rows": rows,
                                "summary": summary, "seconds": time.perf_counter() - started,
                                "machine": common.machine(), "versions": common.versions(),
                                "command": common.command()})


def summarize(rows: list[dict]) -> list[str]:
    """One line per (policy, floor, request kind): same / right / kept."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["policy"], r["floor_tokens"], r["kind"]), []).append(r)
    lines = []
    for (policy, floor, kind), rs in groups.items():
        total = sum(r["total_tokens"] for r in rs) or 1
        lines.append(
            f"{policy:8s} floor {str(floor):>4s} {kind:10s} "
            f"({min(r['prompt_tokens'] for r in rs)}-{max(r['prompt_tokens'] for r in rs)} "
            f"tokens): same {sum(r['same'] for r in rs)}/{len(rs)}, "
            f"right {sum(r['right'] for r in rs)}/{len(rs)}, "
            f"kept {sum(r['attended_tokens'] for r in rs) / total:.0%}")
    return lines


if __name__ == "__main__":
    main()
