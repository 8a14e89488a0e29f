"""The question probe: the prompt's tail, run once early, scores the prompt's middle chunks.

With prefill eviction a long prompt is evicted chunk by chunk, and a windowed policy scores
each chunk by the attention of that chunk's own last queries: the question, at the prompt's
end, is not computed yet, so a fact that does not stand out from its neighbours is ranked away
before anything asks for it (measured: needle in varied text at 25 %, 12 of 12 with the whole
prompt in the pool, 0 of 12 evicting chunk by chunk).

The tail is known at admission. So the scheduler adds a hidden *probe* request beside the long
one: the prompt's first block (the attention sink, and the chat template's opening) followed
by its last ``window`` tokens, one token to generate, its own prefix-cache salt. It is
computed with the first chunk; the workers keep its last ``window`` queries of every layer,
turned by RoPE to the positions the tail has in the real prompt (RoPE is a rotation by
position, so turning a query computed at position ``p`` by ``Δ`` gives it at ``p + Δ``:
checked numerically per layer before use), and every middle chunk's decision ranks the
resident blocks by those queries' attention (softmax over every resident token) instead of the
chunk's own. The last chunk is scored by the real question as before. The probe's output never
reaches the client; its blocks go back to the pool when it finishes, a step after it started.

Readings we had to choose:
- *What the tail attends to in the probe*: the first block and itself, not the document (that
  is what is not computed yet). Its queries are those of the question read without the
  document: what the question asks, not yet where the answer is.
- *Models*: refused where positions are not one integer per token (M-RoPE; multimodal prompts
  are scored by their chunks' own queries), and where a layer's rotation does not compose
  (scaled caches such as YaRN's): the workers check each layer once.
- *Cost*: one extra forward of ``block_size + window`` tokens per long request, and on the
  workers ``L x Hq x window x D`` query values per long request until its prompt is computed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from vllm_kvevict.adapter.protocol import ProbeTask

logger = logging.getLogger("vllm_kvevict")

#: the probe requests' prefix-cache salt: their blocks never match a real prompt's
PROBE_SALT = "vllm-kvevict-question-probe"
PROBE_SUFFIX = "::kvevict-probe"


@dataclass
class _Probe:
    parent: str
    task: ProbeTask
    prompt_len: int  # the probe's own prompt


class QuestionProbes:
    """The scheduler's probe requests: made at admission, hidden from the outputs."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.by_probe: dict[str, _Probe] = {}
        self.of_parent: dict[str, str] = {}

    def make(self, request, window: int):
        """A probe request for ``request`` (a vLLM ``Request``), or None when its prompt has no
        middle to score (tail and first block overlap) or is multimodal.

        Args:
            window: the tail's length, the policy's observation window.
        """
        from vllm.sampling_params import SamplingParams
        from vllm.v1.request import Request

        prompt = request.prompt_token_ids
        bs = self.block_size
        if (prompt is None or getattr(request, "mm_features", None) or window < 1
                or len(prompt) - window < 2 * bs):
            return None
        tokens = list(prompt[:bs]) + list(prompt[-window:])
        probe = Request(
            request_id=request.request_id + PROBE_SUFFIX,
            prompt_token_ids=tokens,
            sampling_params=SamplingParams(max_tokens=1, temperature=0.0),
            pooling_params=None,
            client_index=request.client_index,
            arrival_time=request.arrival_time,
            lora_request=request.lora_request,
            cache_salt=PROBE_SALT,
            priority=request.priority,
            block_hasher=request._block_hasher,
        )
        task = ProbeTask(parent=request.request_id, shift=len(prompt) - window - bs,
                         window=window)
        self.by_probe[probe.request_id] = _Probe(request.request_id, task, len(tokens))
        self.of_parent[request.request_id] = probe.request_id
        return probe

    def task(self, request, num_tokens: int) -> ProbeTask | None:
        """The probe's task in the step that computes its last tokens (its parent still
        running), else None."""
        probe = self.by_probe.get(request.request_id)
        if probe is None or request.num_computed_tokens < probe.prompt_len:
            return None
        if request.num_computed_tokens - num_tokens > probe.prompt_len - probe.task.window:
            return None  # its prompt was split over steps: part of the tail's queries are gone
        return probe.task

    def is_probe(self, req_id: str) -> bool:
        return req_id in self.by_probe

    def hide(self, outputs: dict) -> dict:
        """Remove the probes from a step's ``{client: EngineCoreOutputs}`` (they finish there:
        one token) and forget the finished ones."""
        if not self.by_probe:
            return outputs
        for eco in outputs.values():
            kept = []
            for out in eco.outputs:
                if out.request_id in self.by_probe:
                    if out.finish_reason is not None:
                        self._forget(out.request_id)
                else:
                    kept.append(out)
            eco.outputs = kept
            if eco.finished_requests:
                eco.finished_requests = {r for r in eco.finished_requests
                                         if not r.endswith(PROBE_SUFFIX)}
        return outputs

    def parent_gone(self, parent: str) -> str | None:
        """The parent finished or was aborted: the id of its probe if it has not run yet (the
        caller aborts it), else None."""
        probe_id = self.of_parent.pop(parent, None)
        if probe_id is None or probe_id not in self.by_probe:
            return None
        return probe_id

    def _forget(self, probe_id: str) -> None:
        probe = self.by_probe.pop(probe_id, None)
        if probe is not None and self.of_parent.get(probe.parent) == probe_id:
            del self.of_parent[probe.parent]

    def forget(self, probe_id: str) -> None:
        self._forget(probe_id)


# -- worker side ---------------------------------------------------------------------------------
def find_rotary(model, layer_name: str):
    """The rotary embedding of the attention module that owns ``layer_name`` (``...attn``)."""
    parent = layer_name.rsplit(".", 1)[0]
    try:
        module = model.get_submodule(parent)
    except AttributeError:
        return None
    return getattr(module, "rotary_emb", None)


def rotation_composes(rotary, head_size: int, num_heads: int, device) -> bool:
    """Turning a query already at position ``p`` by ``d`` equals placing it at ``p + d``: true
    of plain RoPE (and Llama 3's frequency scaling), not of M-RoPE or caches that scale the
    magnitude (YaRN). Checked numerically on this layer's own rotary embedding."""
    if rotary is None or not hasattr(rotary, "forward_native") or hasattr(rotary, "mrope_section"):
        return False
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, num_heads * head_size, generator=gen).to(device)
    p = torch.tensor([0, 5, 17], device=device)
    d = torch.tensor([9, 9, 40], device=device)
    try:
        turned, _ = rotary.forward_native(d, rotary.forward_native(p, q.clone())[0])
        direct, _ = rotary.forward_native(p + d, q.clone())
    except Exception:  # noqa: BLE001 - any failure means "cannot use it"
        return False
    return torch.allclose(turned.float(), direct.float(), atol=1e-2, rtol=1e-2)


def turn_queries(rotary, queries: torch.Tensor, shift: int) -> torch.Tensor:
    """``[W, Hq, D]`` queries computed at positions ``p`` -> at ``p + shift``."""
    w, hq, d = queries.shape
    positions = torch.full((w,), shift, dtype=torch.long, device=queries.device)
    turned, _ = rotary.forward_native(positions, queries.reshape(w, hq * d).clone())
    return turned.view(w, hq, d)
