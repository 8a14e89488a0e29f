"""LaProx's projected-value norms, written once per token when its K/V are written.

LaProx weighs the attention a token receives by ``‖v W_O^h‖₂`` per query head ``h`` (its value
as the output projection sees it), a ``D x D`` quadratic form per token and head. A token's
value never changes once written, so the norm is computed once, in the same layer call that
writes the token's K/V (the attention hooks, for every token of every request: a block may be
scored later by a request that reuses it from the prefix cache), and kept per KV-cache slot;
a decision gathers its resident blocks' slots instead of recomputing every token of the row
(before: once per scoring, i.e. the whole kept prompt again at every prefill-eviction chunk).

Memory: ``L x Hq`` float32 per pool slot, taken from the KV budget before vLLM sizes the pool
(``kv_share``: the KV pool gets ``kv / (kv + norms)`` of the memory vLLM found) and allocated
once, when the KV cache is, beside it; only on a server whose default policy reads the norms.
Elsewhere (a client choosing LaProx on another server) the norms are recomputed at scoring as
before. Written with tensor operations only (no read-back: a FULL CUDA graph that captures the
layer call replays the write); a padded token's slot (-1) writes a spare row.
"""

from __future__ import annotations

import logging

import torch

from vllm_kvevict.kernels.reference import dense_value_proj_norm

logger = logging.getLogger("vllm_kvevict")

#: bytes per token and query head of one layer
NORM_BYTES = 4


def kv_share(kv_bytes_per_token: int, num_layers: int, num_heads: int) -> float:
    """The share of the KV memory the pool keeps when the norms take their part of it."""
    norms = num_layers * num_heads * NORM_BYTES
    return kv_bytes_per_token / (kv_bytes_per_token + norms)


class ValueNormCache:
    """Per layer ``[num_slots + 1, Hq]`` float32: the norms of the token in each KV slot (the
    last row takes padded tokens' writes)."""

    def __init__(self, num_layers: int, num_slots: int, num_heads: int, device):
        self.num_slots = num_slots
        self.tables = [torch.zeros(num_slots + 1, num_heads, dtype=torch.float32, device=device)
                       for _ in range(num_layers)]
        logger.info("kv_eviction: projected-value norms of %d slots x %d layers x %d heads: "
                    "%.1f MiB", num_slots, num_layers, num_heads, self.nbytes / 2**20)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tables)

    def write(self, layer: int, values: torch.Tensor, slots: torch.Tensor,
              gram: torch.Tensor) -> None:
        """Store the norms of this step's tokens.

        Args:
            values: ``[N, Hkv * D]`` (or ``[N, Hkv, D]``) the values the layer writes.
            slots: ``[M]`` their KV-cache slots (``M <= N``; -1: a padded token).
            gram: ``[Hq, D, D]`` the layer's ``W_O^h W_O^hᵀ``.
        """
        n = min(values.shape[0], slots.shape[0])
        hq, d = gram.shape[0], gram.shape[-1]
        v = values[:n].reshape(n, -1, d)
        norms = dense_value_proj_norm(v, gram).transpose(0, 1)  # [n, Hq]
        slot = slots[:n].long()
        slot = torch.where(slot < 0, torch.full_like(slot, self.num_slots), slot)
        self.tables[layer].index_copy_(0, slot, norms.to(torch.float32).reshape(n, hq))

    def gather(self, layer: int, block_ids: torch.Tensor, num_tokens: int,
               block_size: int) -> torch.Tensor:
        """``[Hq, T]`` the norms of a row of blocks' first ``num_tokens`` tokens."""
        offsets = torch.arange(block_size, device=block_ids.device)
        slots = (block_ids.long()[:, None] * block_size + offsets).flatten()[:num_tokens]
        return self.tables[layer][slots].transpose(0, 1)
