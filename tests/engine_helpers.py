"""Shared helpers for engine tests: one vLLM engine per module, a HF float32 reference."""

from __future__ import annotations

import contextlib
import gc
import os

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# engine core in this process, so tests can read the scheduler's state
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BLOCK_SIZE = 32
FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. "
    "There and back again. "
)


def passkey_prompt(key: str = "71432", repeats: int = 12, depth: float = 0.5) -> str:
    """A single-fact retrieval prompt: the key sits at ``depth`` of the filler."""
    before = int(repeats * 2 * depth)
    after = repeats * 2 - before
    return (
        FILLER * before
        + f" The pass key is {key}. Remember it. {key} is the pass key. "
        + FILLER * after
        + " What is the pass key? The pass key is"
    )


def make_llm(additional_config=None, **kwargs):
    from vllm import LLM

    from vllm_kvevict.models import model_path

    args = dict(
        model=str(model_path()),
        block_size=BLOCK_SIZE,
        max_model_len=4096,
        enforce_eager=True,
        seed=0,
        dtype="float32",
        max_num_seqs=16,
    )
    args.update(kwargs)
    if additional_config is not None:
        args["additional_config"] = additional_config
    return LLM(**args)


def engine_core(llm):
    """The in-process EngineCore (needs VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    client = llm.llm_engine.engine_core
    return client.engine_core


def scheduler(llm):
    return engine_core(llm).scheduler


@contextlib.contextmanager
def recorded_preemptions(sched):
    """Record the ids of requests the scheduler preempts inside the block."""
    preempted: list[str] = []
    original = sched._preempt_request

    def record(request, *a, **k):
        preempted.append(request.request_id)
        return original(request, *a, **k)

    sched._preempt_request = record
    try:
        yield preempted
    finally:
        sched._preempt_request = original


def shutdown(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    del llm
    gc.collect()


def token_logprobs(completion) -> list[float]:
    """Log-probability of each sampled token."""
    return [lp[tok].logprob for tok, lp in zip(completion.token_ids, completion.logprobs)]


def top_logprobs(completion) -> list[dict[int, float]]:
    """Per position, every logprob vLLM returned (the top ``logprobs`` and the sampled token)."""
    return [{tok: lp.logprob for tok, lp in pos.items()} for pos in completion.logprobs]


class HFReference:
    """SmolLM2 in transformers (float32, eager attention) with an explicit attention mask.

    ``excluded(p)`` gives the key positions hidden from the query at position ``p``; RoPE keeps
    the original positions, exactly like the plugin's compacted view.
    """

    def __init__(self, dtype: str = "float32"):
        import torch
        from transformers import AutoModelForCausalLM

        from vllm_kvevict.models import model_path

        self.torch = torch
        self.dtype = getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(
            str(model_path()), dtype=self.dtype, attn_implementation="eager"
        ).eval()

    def logprobs(self, token_ids: list[int], excluded):
        torch = self.torch
        n = len(token_ids)
        allowed = torch.ones(n, n, dtype=torch.bool).tril()
        for q in range(n):
            hidden = excluded(q)
            if hidden:
                allowed[q, sorted(hidden)] = False
        mask = torch.zeros(1, 1, n, n, dtype=self.dtype)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        with torch.no_grad():
            logits = self.model(
                input_ids=torch.tensor([token_ids]),
                attention_mask=mask,
                position_ids=torch.arange(n)[None],
            ).logits[0]
        return torch.log_softmax(logits.to(self.dtype), -1)


def excluded_from_log(log, block_size: int = BLOCK_SIZE):
    """Turn the scheduler's [(from_token, excluded block positions)] into excluded(p)."""

    def excluded(p: int) -> set[int]:
        current: frozenset = frozenset()
        for start, blocks in log:
            if start <= p:
                current = blocks
        return {b * block_size + i for b in current for i in range(block_size)}

    return excluded
