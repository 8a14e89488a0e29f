"""Run prompts through stock vLLM (plugin not loaded) and print tokens + logprobs as JSON.

Used by the engine tests as the identity reference: ``VLLM_PLUGINS=""`` loads no plugin. The
prompts go in as one ``LLM.generate`` batch, in order, like the plugin side's, so both engines
see the same batch composition step by step (the float sums of a step depend on it).

stdin: ``{"prompts": [...], "max_tokens": n, "logprobs": k, "ignore_eos": b, "engine": {...}}``
(``logprobs`` default 0, ``ignore_eos`` default false, ``engine``: further ``make_llm`` keyword
arguments, e.g. ``{"model": <folder>, "enable_prefix_caching": true}``). A prompt is a string or
``{"prompt": str, "images": [n, seed]}``: ``seeded_images(n, seed)`` recreated here, so the
pixels equal the test's without shipping them.
stdout: ``RESULT [{"token_ids", "logprobs" (sampled token's), "top" ([{token id: logprob}] per
position: the top ``k`` and the sampled token, as vLLM returns them), "num_cached_tokens",
"prompt_token_ids", "plugin_loaded" (whether the plugin's adapter was imported: must be
false)}]``.
"""

import json
import os
import sys

os.environ["VLLM_PLUGINS"] = ""

sys.path.insert(0, os.path.dirname(__file__))

from engine_helpers import make_llm, seeded_images, token_logprobs, top_logprobs  # noqa: E402


def _prompt(spec):
    if isinstance(spec, str):
        return spec
    n, seed = spec["images"]
    return {"prompt": spec["prompt"], "multi_modal_data": {"image": seeded_images(n, seed)}}


def main() -> None:
    from vllm import SamplingParams

    spec = json.loads(sys.stdin.read())
    llm = make_llm(**spec.get("engine", {}))
    params = SamplingParams(
        temperature=0, max_tokens=spec["max_tokens"], logprobs=spec.get("logprobs", 0),
        ignore_eos=spec.get("ignore_eos", False),
    )
    outs = llm.generate([_prompt(p) for p in spec["prompts"]], params)
    plugin_loaded = "vllm_kvevict.adapter" in sys.modules
    result = [
        {
            "token_ids": list(o.outputs[0].token_ids),
            "logprobs": token_logprobs(o.outputs[0]),
            "top": [{str(t): lp for t, lp in pos.items()} for pos in top_logprobs(o.outputs[0])],
            "num_cached_tokens": o.num_cached_tokens,
            "prompt_token_ids": list(o.prompt_token_ids),
            "plugin_loaded": plugin_loaded,
        }
        for o in outs
    ]
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
