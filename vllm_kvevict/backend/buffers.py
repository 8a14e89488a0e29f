"""The persistent buffers of the fused decode statistics: one set per worker, made at startup.

Why persistent: a FULL CUDA graph replays kernel launches with the addresses they were captured
with, so everything the attention kernel reads or writes for the statistics — which rows are
scored, their parked blocks, the per-block accumulators and scratch — must live at fixed
addresses for the life of the engine. They are allocated when the model is loaded, before
vLLM profiles memory to size the KV pool, so the pool is sized without them.

Per step (``prepare``, before the forward): the scored rows and their parked blocks go to the
device in one non-blocking copy from pinned host memory, and the accumulators of the rows in
the batch are zeroed; after the forward the worker reads each scored row's ``[Hkv, n]`` slice.
A scored row's statistics slot is its batch row.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

_ACTIVE: DecodeStatBuffers | None = None


class DecodeStatBuffers:
    """Device buffers the attention kernel fills, and the pinned staging of their inputs.

    Shapes (``R`` = ``max_rows``: the most rows a (padded) batch has; ``S`` = ``max_slots``:
    the most requests scored at once; ``NB`` = blocks of one request at ``max_model_len``):
        slot ``[R]`` int32: statistics slot of each batch row, -1 = not scored;
        park_start ``[S + 1]`` int32, park_ids ``[P]`` int32: slot ``s``'s parked blocks are
            ``park_ids[park_start[s]: park_start[s + 1]]`` (``P`` = the server's bin total);
        mass, peak ``[S, Hkv, NB]`` float32: Σ and max over layers and the query heads of a
            KV group of each block's attention mass; a slot's attended blocks in row order,
            then its parked blocks;
        partials: two ``[S, NB, Hq]`` float32, the kernel's per-block scratch;
        scratch: the kernel's split scratch for any batch of up to ``R`` rows
            (``kernels.fused_decode.split_scratch``).
    """

    def __init__(self, *, max_rows: int, max_slots: int, num_heads: int, num_kv_heads: int,
                 max_blocks: int, max_parked: int, device: torch.device | str,
                 head_size: int | None = None):
        self.max_rows, self.max_slots, self.max_blocks = max_rows, max_slots, max_blocks
        i32, f32 = torch.int32, torch.float32
        n_plan = max_rows + max_slots + 1 + max(max_parked, 1)
        self.plan = torch.zeros(n_plan, dtype=i32, device=device)
        pin = torch.device(device).type == "cuda"
        self._host = torch.zeros(n_plan, dtype=i32, pin_memory=pin)
        self._host_np = self._host.numpy()
        self.slot = self.plan[:max_rows]
        self.park_start = self.plan[max_rows: max_rows + max_slots + 1]
        self.park_ids = self.plan[max_rows + max_slots + 1:]
        self.slot.fill_(-1)
        self.mass = torch.zeros(max_slots, num_kv_heads, max_blocks, dtype=f32, device=device)
        self.peak = torch.zeros_like(self.mass)
        self.partials = tuple(torch.zeros(max_slots, max_blocks, num_heads, dtype=f32,
                                          device=device) for _ in range(2))
        self.scratch: tuple[torch.Tensor, ...] = ()
        if head_size is not None:
            from vllm_kvevict.kernels.fused_decode import split_scratch

            self.scratch = split_scratch(max_rows, num_heads, num_kv_heads, head_size, device)

    @property
    def nbytes(self) -> int:
        """Device bytes held (all of them reserved before the KV pool is sized)."""
        return sum(t.numel() * t.element_size()
                   for t in (self.plan, self.mass, self.peak, *self.partials, *self.scratch))

    def bytes_per_request(self) -> int:
        """Device bytes one statistics slot holds (mass, peak and the kernel's partials)."""
        per_slot = [t[0] for t in (self.mass, self.peak, *self.partials)]
        return sum(t.numel() * t.element_size() for t in per_slot)

    def prepare(self, scored: Sequence[tuple[int, Sequence[int]]], num_rows: int) -> None:
        """Before the forward: which batch rows are scored this step and their parked blocks.

        Args:
            scored: ``(batch row, parked block ids)`` per scored decode row.
            num_rows: rows in the batch (their accumulators are zeroed).
        Raises:
            ValueError when a row or the parked blocks do not fit the buffers.
        """
        r_n, s_n = self.max_rows, self.max_slots
        host = self._host_np
        slot = host[:r_n]
        start = host[r_n: r_n + s_n + 1]
        ids = host[r_n + s_n + 1:]
        slot[:] = -1
        counts = np.zeros(s_n, dtype=np.int64)
        parked_rows = {}
        for row, parked in scored:
            if not 0 <= row < s_n:
                raise ValueError(f"batch row {row} outside the {s_n} statistics slots")
            slot[row] = row
            counts[row] = len(parked)
            parked_rows[row] = parked
        start[0] = 0
        np.cumsum(counts, out=start[1:])
        total = int(start[-1])
        if total > len(ids):
            raise ValueError(f"{total} parked blocks scored in one step, the buffers hold "
                             f"{len(ids)} (kv_eviction.recycle_bin_total_blocks)")
        for row, parked in parked_rows.items():
            ids[start[row]: start[row] + len(parked)] = parked
        end = r_n + s_n + 1 + total
        self.plan[:end].copy_(self._host[:end], non_blocking=True)
        rows = min(num_rows, s_n)
        self.mass[:rows].zero_()
        self.peak[:rows].zero_()

    def kernel_kwargs(self) -> dict:
        """The statistics arguments of ``kernels.fused_decode.fused_decode_attention``."""
        return dict(slot=self.slot, park_ids=self.park_ids, park_start=self.park_start,
                    mass=self.mass, peak=self.peak, block_partials=self.partials)

    def read(self, slot: int, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mass, peak)`` ``[Hkv, n]`` of one slot at the given columns (device gather)."""
        return self.mass[slot][:, columns], self.peak[slot][:, columns]


def max_batch_rows(vllm_config) -> int:
    """The most rows a (CUDA-graph padded) batch can have."""
    sizes = vllm_config.compilation_config.cudagraph_capture_sizes or [0]
    return max(int(vllm_config.scheduler_config.max_num_seqs), int(max(sizes)))


def allocate(vllm_config, eviction_config, device) -> DecodeStatBuffers | None:
    """The buffers for an engine whose full-attention layers run the plugin's backend (made
    active), else None. Called when the model is loaded: before vLLM profiles memory, so the
    KV pool is sized without what they hold."""
    from vllm_kvevict.backend import is_ours
    from vllm_kvevict.backend.selection import FULL_ATTENTION

    ac = vllm_config.attention_config
    if eviction_config is None or not is_ours(ac.backend_per_kind.get(FULL_ATTENTION, ac.backend)):
        return None
    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    block_size = vllm_config.cache_config.block_size
    buffers = DecodeStatBuffers(
        max_rows=max_batch_rows(vllm_config),
        max_slots=int(vllm_config.scheduler_config.max_num_seqs),
        num_heads=mc.get_num_attention_heads(pc), num_kv_heads=mc.get_num_kv_heads(pc),
        max_blocks=-(-mc.max_model_len // block_size),
        max_parked=eviction_config.recycle_bin_total_blocks, device=device,
        head_size=mc.get_head_size(),
    )
    activate(buffers)
    return buffers


def activate(buffers: DecodeStatBuffers | None) -> None:
    """Make ``buffers`` the ones this process's attention metadata hands the kernel."""
    global _ACTIVE
    _ACTIVE = buffers


def active() -> DecodeStatBuffers | None:
    return _ACTIVE
