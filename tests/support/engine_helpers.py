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
        args["additional_config"] = without_floor(additional_config)
    return LLM(**args)


def without_floor(additional_config: dict) -> dict:
    """``floor_tokens: 0`` unless the config sets it. The engine tests and the benchmarks
    measure the eviction mechanism and the policies at a budget on prompts of 0.3k-6k tokens,
    which the default floor (256 tokens, for short chats) would partly or wholly exempt;
    ``test_floor.py`` and ``bench_floor.py`` exercise the floor itself."""
    kv = additional_config.get("kv_eviction")
    if not isinstance(kv, dict) or "floor_tokens" in kv:
        return additional_config
    return {**additional_config, "kv_eviction": {**kv, "floor_tokens": 0}}


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


def sampling(kv=None, max_tokens: int = 16, logprobs: int = 0, **kwargs):
    """Greedy ``SamplingParams`` with per-request ``kv_eviction`` options (None: the server's)."""
    from vllm import SamplingParams

    extra = {"kv_eviction": kv} if kv is not None else None
    return SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=logprobs,
                          extra_args=extra, **kwargs)


def finished_log(llm, request_id: str) -> list:
    """The scheduler's eviction log of a finished request, ``[]`` if it evicted nothing (vLLM
    suffixes the ids it uses internally)."""
    logs = scheduler(llm).kv_book.finished_logs
    matches = [v for k, v in logs.items() if k == request_id or k.startswith(f"{request_id}-")]
    return matches[-1] if matches else []


def eviction_report(output) -> dict:
    """The plugin's per-request report on a finished ``RequestOutput``."""
    params = output.kv_transfer_params or {}
    assert "kv_eviction" in params, f"no eviction report on request {output.request_id}"
    return params["kv_eviction"]


def logprob_deltas(ref, start: int, completion) -> list[float]:
    """Per generated token: |reference logprob − vLLM's| of the token vLLM sampled; ``ref`` is
    ``[positions, vocab]`` over prompt + completion, ``start`` the last prompt position."""
    got = token_logprobs(completion)
    return [abs(ref[start + i, t].item() - got[i]) for i, t in enumerate(completion.token_ids)]


def token_logprobs(completion) -> list[float]:
    """Log-probability of each sampled token."""
    return [lp[tok].logprob for tok, lp in zip(completion.token_ids, completion.logprobs)]


def top_logprobs(completion) -> list[dict[int, float]]:
    """Per position, every logprob vLLM returned (the top ``logprobs`` and the sampled token)."""
    return [{tok: lp.logprob for tok, lp in pos.items()} for pos in completion.logprobs]


def seeded_images(n: int, seed: int = 0):
    """``n`` seeded RGB noise images of assorted sizes (all resized to 256x256 by the processor
    of ``smollm2-vlm``); the same ``(n, seed)`` gives the same pixels in any process."""
    import numpy as np
    from PIL import Image

    rs = np.random.RandomState(seed)
    sizes = [(240, 320), (256, 256), (300, 200), (128, 192)]
    return [Image.fromarray(rs.randint(0, 256, (*sizes[i % 4], 3), dtype=np.uint8))
            for i in range(n)]


def attention_mask(n: int, excluded, dtype):
    """``[1, 1, n, n]`` additive mask: causal, and the query at position ``p`` cannot see the key
    positions ``excluded(p)`` (``finfo.min`` where hidden, 0 where seen)."""
    import torch

    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    for q in range(n):
        hidden = excluded(q)
        if hidden:
            allowed[q, sorted(hidden)] = False
    mask = torch.zeros(1, 1, n, n, dtype=dtype)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


class HFReference:
    """SmolLM2 in transformers (float32, eager attention) with an explicit attention mask.

    ``excluded(p)`` gives the key positions hidden from the query at position ``p``; RoPE keeps
    the original positions, exactly like the plugin's compacted view.
    """

    model_name = "smollm2"

    def __init__(self, dtype: str = "float32"):
        import torch

        from vllm_kvevict.models import model_path

        self.torch = torch
        self.dtype = getattr(torch, dtype)
        self.folder = str(model_path(self.model_name))
        self.model = self._model_class().from_pretrained(
            self.folder, dtype=self.dtype, attn_implementation="eager"
        ).eval()

    @staticmethod
    def _model_class():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def logprobs(self, token_ids: list[int], excluded, **inputs):
        """``[len(token_ids), vocab]`` log-probabilities of the next token at each position;
        ``inputs``: further model inputs (the pixel values of an image prompt)."""
        torch = self.torch
        n = len(token_ids)
        with torch.no_grad():
            logits = self.model(
                input_ids=torch.tensor([token_ids]),
                attention_mask=self.mask(n, excluded),
                position_ids=torch.arange(n)[None],
                **inputs,
            ).logits[0]
        return torch.log_softmax(logits.to(self.dtype), -1)

    def mask(self, n: int, excluded):
        return attention_mask(n, excluded, self.dtype)


def sliding_window_mask(n: int, window: int, dtype):
    """``[1, 1, n, n]`` additive causal mask over the last ``window`` positions (the query's
    own included): a sliding-window layer's attention."""
    import torch

    q, k = torch.arange(n)[:, None], torch.arange(n)[None]
    allowed = (k <= q) & (q - k < window)
    return torch.zeros(1, 1, n, n, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)


class HFGemma3Reference(HFReference):
    """Gemma-3-270M in transformers (``Gemma3ForCausalLM``, eager attention). Its layers take
    a mask per layer kind: ``excluded`` hides keys from the full-attention layers only (where
    the plugin evicts); the sliding-window layers get their plain window (``masked_sliding``:
    hide them there too, to show a test tells the two apart)."""

    model_name = "gemma3"

    def __init__(self, dtype: str = "float32", masked_sliding: bool = False):
        super().__init__(dtype)
        self.masked_sliding = masked_sliding

    def mask(self, n: int, excluded):
        full = attention_mask(n, excluded, self.dtype)
        window = sliding_window_mask(n, self.model.config.sliding_window, self.dtype)
        sliding = self.torch.minimum(full, window) if self.masked_sliding else window
        return {"full_attention": full, "sliding_attention": sliding}


class HFVLMReference(HFReference):
    """``smollm2-vlm`` in transformers (``Idefics3ForConditionalGeneration``, eager attention):
    the same 4-D mask reaches its Llama text model (a 4-D mask is used as given); the vision
    tower and connector see every patch, as in vLLM. ``encode`` runs the folder's processor, as
    vLLM does, so a prompt's token ids and pixel values are vLLM's."""

    model_name = "smollm2-vlm"

    def __init__(self, dtype: str = "float32"):
        from transformers import AutoProcessor

        super().__init__(dtype)
        self.processor = AutoProcessor.from_pretrained(self.folder)

    @staticmethod
    def _model_class():
        from transformers import Idefics3ForConditionalGeneration

        return Idefics3ForConditionalGeneration

    def encode(self, prompt: str, images) -> tuple[list[int], dict]:
        """The prompt's token ids (each ``<image>`` expanded) and its pixel inputs."""
        enc = self.processor(text=prompt, images=[list(images)], return_tensors="pt")
        pixels = {"pixel_values": enc["pixel_values"].to(self.dtype),
                  "pixel_attention_mask": enc["pixel_attention_mask"]}
        return enc["input_ids"][0].tolist(), pixels


def excluded_from_log(log, block_size: int = BLOCK_SIZE):
    """Turn the scheduler's [(from_token, excluded block positions)] into excluded(p)."""

    def excluded(p: int) -> set[int]:
        current: frozenset = frozenset()
        for start, blocks in log:
            if start <= p:
                current = blocks
        return {b * block_size + i for b in current for i in range(block_size)}

    return excluded


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``vllm serve ARGS`` through the plugin's CLI in its own process (engine core in its own
    process too, as in production), healthy when the constructor returns; a context manager
    that stops it. ``args``: what follows ``serve`` (model first), host and port added."""

    def __init__(self, args: list[str], kv_cache_gb: str = "1", timeout: float = 300):
        import subprocess
        import sys
        import tempfile
        import time
        import urllib.error
        import urllib.request

        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="kvevict-serve-", suffix=".log",
                                               delete=False)
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": kv_cache_gb}
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm_kvevict.cli", "serve", *args,
             "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT, env=env,
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.tail()}")
            try:
                urllib.request.urlopen(f"{self.base}/health", timeout=2)
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(1)
        self.stop()
        raise RuntimeError(f"server did not become healthy:\n{self.tail()}")

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def tail(self, n: int = 60) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return "".join(f.readlines()[-n:])

    def stop(self) -> None:
        import subprocess

        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        import json
        import urllib.error
        import urllib.request

        req = urllib.request.Request(f"{self.base}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=300) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Samples by name (labels dropped, values summed), those starting with ``prefix``."""
        import urllib.request

        text = urllib.request.urlopen(f"{self.base}/metrics", timeout=10).read().decode()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#") and line.startswith(prefix):
                name = line.split("{")[0].split(" ")[0]
                values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[-1])
        return values

    def rss_mb(self) -> float:
        import psutil

        procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        return sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20


def stock_run(spec: dict) -> list[dict]:
    """Run ``spec`` (see ``stock_run.py``) through stock vLLM in a subprocess: plugin not loaded,
    engine core in process, this environment otherwise."""
    import json
    import subprocess
    import sys

    stock = subprocess.run(
        [sys.executable, os.path.join(os.path.dirname(__file__), "stock_run.py")],
        input=json.dumps(spec), capture_output=True, text=True, timeout=600,
        env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
    )
    line = [ln for ln in stock.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, stock.stderr[-3000:]
    return json.loads(line[-1][len("RESULT "):])
