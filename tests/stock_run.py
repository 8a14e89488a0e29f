"""Run prompts through stock vLLM (plugin not loaded) and print tokens + logprobs as JSON.

Used by the engine tests as the identity reference: ``VLLM_PLUGINS=""`` loads no plugin.
"""

import json
import os
import sys

os.environ["VLLM_PLUGINS"] = ""

sys.path.insert(0, os.path.dirname(__file__))

from engine_helpers import make_llm, token_logprobs  # noqa: E402


def main() -> None:
    from vllm import SamplingParams

    spec = json.loads(sys.stdin.read())
    llm = make_llm()
    params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], logprobs=0)
    outs = llm.generate(spec["prompts"], params)
    result = [
        {"token_ids": list(o.outputs[0].token_ids), "logprobs": token_logprobs(o.outputs[0])}
        for o in outs
    ]
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
