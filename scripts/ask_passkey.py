"""Ask a running server for a pass key hidden mid-way in a ~600-token prompt, and a short chat
question (OpenAI client). Exits 1 unless both are answered: the pass key with its prompt
evicted to the budget, the chat (≈ 40 tokens, under the floor) with nothing evicted."""

import argparse
import re
import sys
import urllib.request

from openai import OpenAI

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--key", default="71432")
    args = parser.parse_args()
    base = f"http://127.0.0.1:{args.port}"
    client = OpenAI(base_url=f"{base}/v1", api_key="none")
    prompt = (FILLER * 12 + f" The pass key is {args.key}. Remember it. {args.key} is the pass key. "
              + FILLER * 12 + " What is the pass key? The pass key is")
    done = client.completions.create(model="smollm2", prompt=prompt, max_tokens=16, temperature=0)
    answer = done.choices[0].text
    print(f"[demo] /v1/completions ({done.usage.prompt_tokens} prompt tokens): {answer!r}"
          f"\n       evicted: {_evicted(done)}")
    chat = client.chat.completions.create(
        model="smollm2", max_tokens=12, temperature=0,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    reply = chat.choices[0].message.content or ""
    print(f"[demo] /v1/chat/completions ({chat.usage.prompt_tokens} prompt tokens): {reply!r}"
          f"\n       evicted: {_evicted(chat)}")
    metrics = urllib.request.urlopen(f"{base}/metrics").read().decode()
    evicted = [ln for ln in metrics.splitlines()  # counters and gauges, not the histogram
               if ln.startswith("vllm_kvevict_") and "decision_seconds" not in ln]
    print("[demo] eviction metrics:\n  " + "\n  ".join(evicted or ["(none exported)"]))
    ok = re.search(args.key, answer) is not None
    print(f"[demo] pass key {'retrieved' if ok else 'NOT retrieved'} with a 25% KV budget")
    chat_ok = "paris" in reply.lower()
    print(f"[demo] chat {'answered' if chat_ok else 'NOT answered'}: short requests keep every "
          "token up to --kv-eviction-floor-tokens (256)")
    if not (ok and chat_ok):
        sys.exit(1)


def _evicted(response) -> str:
    """The request's own eviction report (``kv_transfer_params.kv_eviction``)."""
    report = ((getattr(response, "model_extra", None) or {}).get("kv_transfer_params") or {}
              ).get("kv_eviction") or {}
    if not report:
        return "(no report)"
    return (f"{report['evicted_tokens']} of {report['total_tokens']} tokens "
            f"({report['policy']})")


if __name__ == "__main__":
    main()
