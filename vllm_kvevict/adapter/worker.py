"""Worker side: attend over the compacted sequence and measure what the policies need.

The scheduler keeps positional block lists; the worker sees a *compacted* view: the block row
holds only blocks in attention, the attention length is ``seq_len − E`` and new K/V go to slot
``position − E`` (E = excluded tokens of that request). RoPE keeps the original positions, so
stock attention kernels need no change. With E = 0 nothing here touches vLLM's tensors.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vllm_kvevict.adapter.protocol import PLAN_ATTR, SCORES_ATTR, BlockScores, ScoreTask, StepPlan
from vllm_kvevict.config import config_from_additional
from vllm_kvevict.policies import get_policy
from vllm_kvevict.policies.base import (
    DECODE_ATTN,
    KEY_BOUNDS,
    QUERY,
    VALUE_PROJ_NORM,
    WINDOW_ATTN,
    RequestStats,
)

logger = logging.getLogger("vllm_kvevict")

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass
class ScoredRequest:
    """One request being scored this step, resolved against the worker's batch."""

    req_id: str
    task: ScoreTask
    policy: Any
    q_start: int
    q_end: int
    block_ids: torch.Tensor  # [nb] physical ids of resident blocks, positional order
    positions: torch.Tensor  # [nb] positional block indices
    parked: torch.Tensor  # [nb] bool
    tokens_per_block: list[int]
    query_positions: torch.Tensor  # original positions of this step's query tokens
    layers: dict  # stat name -> list of per-layer tensors


class KeyLayoutError(RuntimeError):
    """The KV cache layout is not one this adapter knows how to read."""


class WorkerEviction:
    """Per-runner eviction state; created only when the engine has a kv_eviction config."""

    def __init__(self, runner):
        self.runner = runner
        self.plan: StepPlan | None = None
        self.scored: list[ScoredRequest] = []
        self.pending_scores: dict[str, BlockScores] = {}
        self.policies: dict[tuple, Any] = {}
        self.policy_state: dict[tuple[str, int], dict] = {}
        self.key_layout: str | None = None  # "plain" | "transposed" (CPU AVX2 hosts)
        self.grams: dict[int, torch.Tensor] = {}
        self.hooked = False

    # -- step plumbing -------------------------------------------------------------------------
    def begin_step(self, scheduler_output) -> None:
        """After vLLM's _update_states: install new compacted rows."""
        self.plan = getattr(scheduler_output, PLAN_ATTR, None)
        self.scored = []
        finished = getattr(scheduler_output, "finished_req_ids", ()) or ()
        for key in [k for k in self.policy_state if k[0] in finished]:
            del self.policy_state[key]
        if not self.plan:
            return
        batch = self.runner.input_batch
        for req_id, block_ids in self.plan.rows.items():
            req_state = self.runner.requests.get(req_id)
            if req_state is None:
                continue
            req_state.block_ids[0][:] = block_ids
            row = batch.req_id_to_index.get(req_id)
            if row is not None:
                batch.block_table[0].add_row(list(block_ids), row)

    def fix_inputs(self, num_scheduled_tokens: np.ndarray) -> None:
        """After vLLM's _prepare_inputs: compacted seq_lens and slot mapping (hazard-free when
        every E is 0: then this returns before touching anything)."""
        if not self.plan:
            return
        runner = self.runner
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        req_ids = batch.req_ids[:num_reqs]
        offsets = np.array([self.plan.offsets.get(r, 0) for r in req_ids], dtype=np.int64)
        if offsets.any():
            e = torch.from_numpy(offsets)
            total = int(num_scheduled_tokens.sum())
            runner.seq_lens[:num_reqs] -= e.to(runner.seq_lens.device, runner.seq_lens.dtype)
            runner.optimistic_seq_lens_cpu[:num_reqs] -= e.to(runner.optimistic_seq_lens_cpu.dtype)
            per_token = torch.from_numpy(np.repeat(offsets, num_scheduled_tokens))
            shifted = runner.positions[:total] - per_token.to(runner.positions.device)
            batch.block_table.compute_slot_mapping(
                num_reqs, runner.query_start_loc.gpu[: num_reqs + 1], shifted
            )
        if self.plan.score:
            self._resolve_scored(req_ids)

    def _resolve_scored(self, req_ids) -> None:
        runner = self.runner
        batch = runner.input_batch
        qsl = runner.query_start_loc.np
        bs = batch.block_table[0].block_size
        table = batch.block_table[0].block_table.np
        seq_lens = runner.seq_lens.cpu() if runner.seq_lens.is_cuda else runner.seq_lens
        for row, req_id in enumerate(req_ids):
            task = self.plan.score.get(req_id)
            if task is None:
                continue
            n_row = int(batch.block_table[0].num_blocks_per_row[row])
            if n_row != len(task.kept_positions):
                logger.warning("kv_eviction: row of %s has %d blocks, plan %d; not scored",
                               req_id, n_row, len(task.kept_positions))
                continue
            seq_c = int(seq_lens[row])
            kept = [(p, int(table[row, i]), False, bs if i < n_row - 1 else seq_c - (n_row - 1) * bs)
                    for i, p in enumerate(task.kept_positions)]
            parked = [(p, bid, True, bs) for p, bid in task.parked]
            resident = sorted(kept + parked)
            q_start, q_end = int(qsl[row]), int(qsl[row + 1])
            self.scored.append(ScoredRequest(
                req_id=req_id,
                task=task,
                policy=self._policy(task),
                q_start=q_start,
                q_end=q_end,
                block_ids=torch.tensor([r[1] for r in resident], dtype=torch.int64),
                positions=torch.tensor([r[0] for r in resident], dtype=torch.int64),
                parked=torch.tensor([r[2] for r in resident], dtype=torch.bool),
                tokens_per_block=[r[3] for r in resident],
                query_positions=runner.positions[q_start:q_end].cpu(),
                layers={},
            ))
        if self.scored and not self.hooked:
            self._hook_attention()

    def _policy(self, task: ScoreTask):
        key = (task.policy, repr(sorted(task.options.items())))
        if key not in self.policies:
            self.policies[key] = get_policy(task.policy, task.options)
        return self.policies[key]

    # -- attention hook ------------------------------------------------------------------------
    def _hook_attention(self) -> None:
        ctx = self.runner.vllm_config.compilation_config.static_forward_context
        names = [n for n, layer in ctx.items() if hasattr(layer, "impl") and hasattr(layer, "kv_cache")]
        names.sort(key=lambda n: int(_LAYER_INDEX.search(n + ".").group(1)) if _LAYER_INDEX.search(n + ".") else 0)
        for index, name in enumerate(names):
            impl = ctx[name].impl
            original = impl.forward

            def forward(layer, query, key, value, kv_cache, attn_metadata, *a,
                        _orig=original, _index=index, _name=name, **kw):
                out = _orig(layer, query, key, value, kv_cache, attn_metadata, *a, **kw)
                if self.scored and attn_metadata is not None:
                    self._measure_layer(_index, _name, layer, query, key, kv_cache)
                return out

            impl.forward = forward
        self.hooked = True
        self.layer_names = names

    def _gather(self, cache: torch.Tensor, sr: ScoredRequest, layout: str) -> torch.Tensor:
        """Dense [T, Hkv, D] of the resident tokens from one half (K or V) of the CPU cache."""
        bs = cache.shape[2]
        parts = []
        for bid, n in zip(sr.block_ids.tolist(), sr.tokens_per_block):
            block = cache[bid]  # [Hkv, bs, D] as stored
            if layout == "transposed":
                block = block.reshape(block.shape[0], block.shape[2], bs).transpose(1, 2)
            parts.append(block[:, :n, :].transpose(0, 1))
        return torch.cat(parts, 0).to(torch.float32)

    def _detect_layout(self, key_cache, sr: ScoredRequest, new_key: torch.Tensor) -> str:
        """Hazard 4: the CPU backend stores keys transposed per block on some ISAs. Decide from
        a token whose key we know (the newest one), and refuse to score if neither matches."""
        bs = key_cache.shape[2]
        kept = (~sr.parked).nonzero().flatten()
        last = int(kept[-1])
        bid, off = int(sr.block_ids[last]), sr.tokens_per_block[last] - 1
        block = key_cache[bid]
        plain = block[:, off, :]
        transposed = block.reshape(block.shape[0], block.shape[2], bs)[:, :, off]
        if torch.allclose(plain.float(), new_key.float(), atol=1e-3, rtol=1e-3):
            return "plain"
        if torch.allclose(transposed.float(), new_key.float(), atol=1e-3, rtol=1e-3):
            return "transposed"
        raise KeyLayoutError(
            "kv_eviction: cannot read keys from the KV cache (neither the plain nor the "
            "per-block-transposed CPU layout matches the key just written); refusing to score"
        )

    def _split_cache(self, kv_cache: torch.Tensor):
        """(key_cache, value_cache) as [num_blocks, Hkv, bs, D] views of one layer's cache.

        CPU backend: [num_blocks, Hkv, bs, 2*D] viewed as [num_blocks, Hkv, 2*bs, D] (keys
        first, possibly transposed per block). GPU FlashAttention-style: [2, num_blocks, bs,
        Hkv, D]. Anything else is refused rather than misread.
        """
        bs = self.runner.input_batch.block_table[0].block_size
        if kv_cache.dim() == 5 and kv_cache.shape[0] == 2:
            return kv_cache[0].permute(0, 2, 1, 3), kv_cache[1].permute(0, 2, 1, 3)
        if kv_cache.dim() == 4:
            kv = kv_cache.view(kv_cache.shape[0], kv_cache.shape[1], 2 * bs, -1)
            return kv[:, :, :bs], kv[:, :, bs:]
        raise KeyLayoutError(f"kv_eviction: unsupported KV cache shape {tuple(kv_cache.shape)}")

    def _measure_layer(self, index, name, layer, query, key, kv_cache) -> None:
        key_cache, value_cache = self._split_cache(kv_cache)
        hkv, d = key_cache.shape[1], key_cache.shape[-1]
        hq = layer.impl.num_heads
        q_all = query.view(-1, hq, d)
        scale = layer.impl.scale
        for sr in self.scored:
            new_key = key.view(-1, hkv, d)[sr.q_end - 1]
            if self.key_layout is None:
                self.key_layout = self._detect_layout(key_cache, sr, new_key)
            keys = self._gather(key_cache, sr, self.key_layout)  # [T, Hkv, D]
            needs = sr.policy.needs
            group = hq // hkv
            k_q = keys.repeat_interleave(group, dim=1)  # [T, Hq, D]
            if DECODE_ATTN in needs or QUERY in needs:
                q = q_all[sr.q_end - 1].float() * scale  # [Hq, D]
                if DECODE_ATTN in needs:
                    logits = torch.einsum("hd,thd->ht", q, k_q)
                    sr.layers.setdefault(DECODE_ATTN, []).append(torch.softmax(logits, -1))
                if QUERY in needs:
                    sr.layers.setdefault(QUERY, []).append(q)
            if WINDOW_ATTN in needs and sr.task.phase == "prefill":
                w = min(sr.policy.window or 32, sr.q_end - sr.q_start)
                qw = q_all[sr.q_end - w: sr.q_end].float() * scale  # [W, Hq, D]
                logits = torch.einsum("whd,thd->hwt", qw, k_q)
                key_pos = self._token_positions(sr)
                mask = key_pos[None, :] > sr.query_positions[-w:][:, None]  # [W, T]
                logits = logits.masked_fill(mask[None], float("-inf"))
                sr.layers.setdefault(WINDOW_ATTN, []).append(torch.softmax(logits, -1))
            if VALUE_PROJ_NORM in needs:
                values = self._gather(value_cache, sr, "plain").repeat_interleave(group, dim=1)
                gram = self._gram(index, name, hq, d)
                norms = torch.einsum("thd,hde,the->ht", values, gram, values).clamp_min(0).sqrt()
                sr.layers.setdefault(VALUE_PROJ_NORM, []).append(norms)
            if KEY_BOUNDS in needs:
                kmin, kmax = self._key_bounds(keys, sr.tokens_per_block)
                sr.layers.setdefault("key_min", []).append(kmin)
                sr.layers.setdefault("key_max", []).append(kmax)

    def _token_positions(self, sr: ScoredRequest) -> torch.Tensor:
        bs = self.runner.input_batch.block_table[0].block_size
        return torch.cat([p * bs + torch.arange(n) for p, n in zip(sr.positions.tolist(), sr.tokens_per_block)])

    @staticmethod
    def _key_bounds(keys: torch.Tensor, tokens_per_block: list[int]):
        chunks = torch.split(keys, tokens_per_block, dim=0)
        kmin = torch.stack([c.amin(0) for c in chunks], dim=1)  # [Hkv, nb, D]
        kmax = torch.stack([c.amax(0) for c in chunks], dim=1)
        return kmin, kmax

    def _gram(self, index: int, name: str, hq: int, d: int) -> torch.Tensor:
        """Per-head Gram matrices G_h = W_O^h W_O^hᵀ of this layer's output projection."""
        if index not in self.grams:
            model = self.runner.get_model()
            o_proj = model.get_submodule(name.rsplit(".", 1)[0] + ".o_proj")
            w = o_proj.weight.detach().float()  # [hidden, Hq*D] (this rank's heads)
            w_heads = w.t().reshape(hq, d, -1)  # W_O^h: [D, hidden]
            self.grams[index] = torch.einsum("hdk,hek->hde", w_heads, w_heads)
        return self.grams[index]

    # -- after the forward ---------------------------------------------------------------------
    def finish_step(self) -> None:
        for sr in self.scored:
            if not sr.layers:
                continue
            stats = RequestStats(
                block_size=self.runner.input_batch.block_table[0].block_size,
                block_index=sr.positions,
                num_tokens=sum(sr.tokens_per_block),
                num_kv_heads=self.runner.model_config.get_num_kv_heads(self.runner.parallel_config),
                parked=sr.parked,
                phase=sr.task.phase,
                visual=self._visual_mask(sr),
                **{k: torch.stack(v) for k, v in sr.layers.items()},
            )
            state = self.policy_state.setdefault((sr.req_id, sr.task.generation), {})
            scores = sr.policy.block_scores(stats, state).to(torch.float32)
            scores = _all_reduce_mean(scores)
            self.pending_scores[sr.req_id] = BlockScores(
                generation=sr.task.generation,
                positions=sr.positions.tolist(),
                scores=scores.tolist(),
            )
        self.scored = []

    def _visual_mask(self, sr: ScoredRequest) -> torch.Tensor | None:
        if not sr.task.visual_spans:
            return None
        pos = self._token_positions(sr)
        mask = torch.zeros_like(pos, dtype=torch.bool)
        for offset, length in sr.task.visual_spans:
            mask |= (pos >= offset) & (pos < offset + length)
        return mask

    def attach_scores(self, output) -> None:
        if not self.pending_scores or output is None:
            return
        target = getattr(output, "_model_runner_output", output)
        if hasattr(target, "req_ids"):
            setattr(target, SCORES_ATTR, self.pending_scores)
            self.pending_scores = {}


def _all_reduce_mean(scores: torch.Tensor) -> torch.Tensor:
    """Hazard 5: each TP rank measured only its own heads; only rank 0's output reaches the
    scheduler, so average the block scores over the TP group first."""
    try:
        from vllm.distributed import (
            get_tensor_model_parallel_world_size,
            tensor_model_parallel_all_reduce,
        )
    except ImportError:  # pragma: no cover
        return scores
    world = get_tensor_model_parallel_world_size()
    if world <= 1:
        return scores
    return tensor_model_parallel_all_reduce(scores) / world


# -- class-level patches, inert unless the runner's engine has a kv_eviction config ------------
def _eviction(runner) -> WorkerEviction | None:
    state = runner.__dict__.get("_kvevict")
    if state is None:
        config = config_from_additional(getattr(runner.vllm_config, "additional_config", None))
        state = WorkerEviction(runner) if config is not None else False
        runner.__dict__["_kvevict"] = state
    return state or None


def install_runner_hooks() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner, "_kvevict_hooked", False):
        return
    update_states = GPUModelRunner._update_states
    prepare_inputs = GPUModelRunner._prepare_inputs
    execute_model = GPUModelRunner.execute_model
    sample_tokens = GPUModelRunner.sample_tokens

    def _update_states_hook(self, scheduler_output, *a, **k):
        result = update_states(self, scheduler_output, *a, **k)
        ev = _eviction(self)
        if ev is not None:
            ev.begin_step(scheduler_output)
        return result

    def _prepare_inputs_hook(self, scheduler_output, num_scheduled_tokens, *a, **k):
        result = prepare_inputs(self, scheduler_output, num_scheduled_tokens, *a, **k)
        ev = _eviction(self)
        if ev is not None:
            ev.fix_inputs(num_scheduled_tokens)
        return result

    def execute_model_hook(self, *a, **k):
        output = execute_model(self, *a, **k)
        ev = _eviction(self)
        if ev is not None:
            ev.finish_step()
            ev.attach_scores(output)
        return output

    def sample_tokens_hook(self, *a, **k):
        output = sample_tokens(self, *a, **k)
        ev = _eviction(self)
        if ev is not None:
            ev.attach_scores(output)
        return output

    GPUModelRunner._update_states = _update_states_hook
    GPUModelRunner._prepare_inputs = _prepare_inputs_hook
    GPUModelRunner.execute_model = execute_model_hook
    GPUModelRunner.sample_tokens = sample_tokens_hook
    GPUModelRunner._kvevict_hooked = True
