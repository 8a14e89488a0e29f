"""Worker side: attend over the compacted sequence and measure what the policies need.

The scheduler keeps positional block lists; the worker sees a *compacted* view: the block row
holds only blocks in attention, the attention length is ``seq_len − E`` and new K/V go to slot
``position − E`` (E = excluded tokens of that request). RoPE keeps the original positions, so
stock attention kernels need no change. With E = 0 nothing here touches vLLM's tensors.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vllm_kvevict.adapter.protocol import PLAN_ATTR, SCORES_ATTR, BlockScores, ScoreTask, StepPlan
from vllm_kvevict.config import config_from_additional
from vllm_kvevict.kernels import dispatch
from vllm_kvevict.kernels.paged import PagedKV, cpu_kv_view, detect_cpu_key_layout
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
    """One request being scored this step, resolved against the worker's batch.

    Its resident blocks (kept and parked, positional order) form one block-table row whose
    only partial block is the last: the statistics read it like any paged request.
    """

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
    device: torch.device | str = "cpu"  # of the KV cache
    num_tokens: int = field(init=False)
    block_table: torch.Tensor = field(init=False)  # [1, nb] int32 on ``device``
    seq_lens: torch.Tensor = field(init=False)  # [1] int32 on ``device``

    def __post_init__(self):
        self.num_tokens = sum(self.tokens_per_block)
        self.block_table = self.block_ids.to(self.device, torch.int32)[None]
        self.seq_lens = torch.tensor([self.num_tokens], dtype=torch.int32, device=self.device)

    def record(self, stat: str, value: torch.Tensor) -> None:
        self.layers.setdefault(stat, []).append(value)


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
        self.key_layout: str | None = None  # CPU backend: "cpu" or "cpu_t" (AVX2 hosts)
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
            sr = ScoredRequest(
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
                device=runner.device,
            )
            # The statistics read the resident blocks as one paged row and mask causally by row
            # index: that is masking by original position only if the step's query tokens are
            # the row's last tokens (then row order is position order, the queries included).
            tail = self._token_positions(sr)[-(q_end - q_start):]
            if not torch.equal(tail, sr.query_positions.long()):
                logger.warning("kv_eviction: resident blocks of %s do not end with this step's "
                               "tokens; not scored", req_id)
                continue
            self.scored.append(sr)
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

    def _paged_kv(self, kv_cache: torch.Tensor, key: torch.Tensor) -> PagedKV:
        """One layer's cache as logical ``[num_blocks, block_size, Hkv, D]`` key/value views.

        GPU FlashAttention-style: ``[2, num_blocks, bs, Hkv, D]``. CPU backend: ``[num_blocks,
        Hkv, bs, 2*D]``, keys possibly transposed per block (hazard 4: the layout is detected
        once, from the newest key just written). Anything else is refused rather than misread.
        """
        if kv_cache.dim() == 5 and kv_cache.shape[0] == 2:
            return PagedKV(kv_cache[0], kv_cache[1])
        if kv_cache.dim() != 4:
            raise KeyLayoutError(f"kv_eviction: unsupported KV cache shape {tuple(kv_cache.shape)}")
        view = cpu_kv_view(kv_cache)  # [num_blocks, Hkv, 2*bs, D]
        if self.key_layout is None:
            sr = self.scored[0]
            new_key = key.view(-1, view.shape[1], view.shape[3])[sr.q_end - 1]
            self.key_layout = self._detect_layout(view, sr, new_key)
        return PagedKV.from_cpu(view, self.key_layout)

    @staticmethod
    def _detect_layout(kv_view: torch.Tensor, sr: ScoredRequest, new_key: torch.Tensor) -> str:
        """``cpu`` or ``cpu_t``: the CPU layout in which the newest token's slot holds ``new_key``.

        ``kv_view`` is the ``[num_blocks, Hkv, 2*bs, D]`` view. Refuses to score when neither
        (or both) layouts match.
        """
        bs = kv_view.shape[2] // 2
        slot = int(sr.block_ids[-1]) * bs + sr.tokens_per_block[-1] - 1
        try:
            return detect_cpu_key_layout(kv_view, new_key, slot)
        except ValueError as exc:
            raise KeyLayoutError(f"kv_eviction: cannot read keys from the KV cache: {exc}") from exc

    def _measure_layer(self, index, name, layer, query, key, kv_cache) -> None:
        """Record this layer's statistics of every scored request (one ``dispatch`` call each:
        the Triton kernels on NVIDIA GPUs, their torch references elsewhere)."""
        kv = self._paged_kv(kv_cache, key)
        hq, scale = layer.impl.num_heads, layer.impl.scale
        q_all = query.view(-1, hq, kv.head_dim)
        for sr in self.scored:
            needs, row, n = sr.policy.needs, (sr.block_table, sr.seq_lens), sr.num_tokens
            newest = q_all[sr.q_end - 1: sr.q_end]  # [1, Hq, D]
            if DECODE_ATTN in needs:
                probs = dispatch.decode_attention(newest, kv, *row, scale, token_probs=True).token_probs
                sr.record(DECODE_ATTN, probs[0, :, :n])  # [Hq, T]
            if QUERY in needs:
                sr.record(QUERY, newest[0].float() * scale)
            if WINDOW_ATTN in needs and sr.task.phase == "prefill":
                # the window queries are the row's last tokens (checked in _resolve_scored)
                w = min(sr.policy.window or 32, sr.q_end - sr.q_start)
                q_window = q_all[sr.q_end - w: sr.q_end].transpose(0, 1)[None]  # [1, Hq, W, D]
                probs = dispatch.window_attention(q_window, kv, *row, scale).probs
                sr.record(WINDOW_ATTN, probs[0, :, :, :n])  # [Hq, W, T]
            if VALUE_PROJ_NORM in needs:
                norms = dispatch.value_proj_norm(self._gram(index, name, hq), kv, *row)
                sr.record(VALUE_PROJ_NORM, norms[0, :, :n])  # [Hq, T]
            if KEY_BOUNDS in needs:
                kmin, kmax = dispatch.key_bounds(kv, *row)  # [1, nb, Hkv, D] each
                sr.record("key_min", kmin[0].transpose(0, 1).float())  # [Hkv, nb, D]
                sr.record("key_max", kmax[0].transpose(0, 1).float())

    def _token_positions(self, sr: ScoredRequest) -> torch.Tensor:
        bs = self.runner.input_batch.block_table[0].block_size
        return torch.cat([p * bs + torch.arange(n) for p, n in zip(sr.positions.tolist(), sr.tokens_per_block)])

    def _gram(self, index: int, name: str, hq: int) -> torch.Tensor:
        """Per-head Gram matrices G_h = W_O^h W_O^hᵀ of this layer's output projection."""
        if index not in self.grams:
            model = self.runner.get_model()
            o_proj = model.get_submodule(name.rsplit(".", 1)[0] + ".o_proj")
            # [hidden, Hq*D]: this rank's heads
            self.grams[index] = dispatch.wo_gram(_linear_weight(o_proj), hq)
        return self.grams[index]

    # -- after the forward ---------------------------------------------------------------------
    def finish_step(self) -> None:
        for sr in self.scored:
            if not sr.layers and sr.policy.needs:
                continue  # the attention hooks did not run for it: nothing measured
            stats = RequestStats(
                block_size=self.runner.input_batch.block_table[0].block_size,
                block_index=sr.positions,
                num_tokens=sum(sr.tokens_per_block),
                num_kv_heads=self.runner.model_config.get_num_kv_heads(self.runner.parallel_config),
                parked=sr.parked,
                phase=sr.task.phase,
                visual=self._visual_mask(sr),
                **{k: torch.stack(v).cpu() for k, v in sr.layers.items()},
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


def _linear_weight(linear) -> torch.Tensor:
    """``[out, in]`` weight of a vLLM linear layer (this rank's shard).

    The CPU backend packs linear weights for its GEMM library and leaves ``weight`` empty; the
    weight is then read back by applying the layer's own GEMM (no bias, no TP all-reduce) to
    the identity: row ``i`` of ``I · Wᵀ`` is column ``i`` of ``W``, exactly.
    """
    weight = linear.weight.detach()
    if weight.dim() == 2 and weight.numel():
        return weight
    eye = torch.eye(linear.input_size_per_partition, dtype=linear.params_dtype,
                    device=weight.device)
    return linear.quant_method.apply(linear, eye).t()


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
