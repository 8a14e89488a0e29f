"""The plugin's attention backend: decode attention that scores blocks in the same pass.

Why a backend of our own: the eviction policies need, at decode, how much attention each block
received. Measured beside the backend (a Python hook around ``impl.forward``), that is a second
pass over K and V on every scored step, and the step cannot replay a FULL CUDA graph (no
Python runs inside one). Here the decode attention *is* the plugin's kernel
(``kernels/fused_decode.py``): it writes the output and, for the rows the persistent per-step
``slot`` buffer flags, folds each block's attention mass into persistent accumulators — so
FULL graphs capture it and every decode step of every policy replays them.

What is whose:
* decode rows (query length 1; the builder asks vLLM to put them first in the batch): the
  plugin's kernel, statistics or not;
* prefill and chunked-prefill tokens: vLLM's own Triton unified attention, called through
  :class:`~vllm.v1.attention.backends.triton_attn.TritonAttentionImpl` on the prefill part
  of the batch (no statistics are taken there by the kernel);
* the KV-cache write, the cache layout and shape, quantisation checks: vLLM's Triton backend,
  inherited unchanged.

Features the kernel does not implement are declared unsupported (sliding window, sinks,
ALiBi, soft-capping, multimodal prefix attention, quantised caches, non-decoder attention), so
vLLM refuses the backend for such layers at startup and the plugin never selects it there
(``selection.py``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadata,
    TritonAttentionMetadataBuilder,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills

from vllm_kvevict.backend import BLOCK_SIZES, HEAD_SIZES, NAME
from vllm_kvevict.backend import buffers as stat_buffers
from vllm_kvevict.kernels.fused_decode import fused_decode_attention, num_splits_for, split_scratch


@dataclasses.dataclass
class EvictionAttentionMetadata(TritonAttentionMetadata):
    """vLLM's Triton metadata plus the decode/prefill split and the statistics buffers.

    ``prefill`` is the metadata of the batch's prefill part (rows ``num_decodes:``) for vLLM's
    unified attention, or None when every row decodes (or none does).
    """

    num_decodes: int = 0
    num_decode_tokens: int = 0
    prefill: TritonAttentionMetadata | None = None
    stats: stat_buffers.DecodeStatBuffers | None = None
    split_scratch: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


class EvictionAttentionMetadataBuilder(TritonAttentionMetadataBuilder):
    """vLLM's Triton builder; decode rows first, and the split computed once per step.

    Full CUDA graphs: uniform single-token decode batches only (those run the plugin's kernel
    for every row); mixed batches run piecewise, where the forward splits them.
    """

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    reorder_batch_threshold: int | None = 1

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1)
        self.max_rows = stat_buffers.max_batch_rows(vllm_config)
        reserved = stat_buffers.active()
        if reserved is not None and reserved.scratch:  # made at startup, before profiling
            self.split_scratch = reserved.scratch
        else:
            self.split_scratch = split_scratch(self.max_rows, self.num_heads_q,
                                               self.num_heads_kv, self.headdim, device)

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        base = super().build(common_prefix_len, common_attn_metadata, fast_build)
        nd, n_prefill, nd_tokens, _ = split_decodes_and_prefills(common_attn_metadata, 1)
        prefill = None
        if nd and n_prefill:
            prefill = dataclasses.replace(
                base,
                num_actual_tokens=base.num_actual_tokens - nd_tokens,
                query_start_loc=base.query_start_loc[nd:] - nd_tokens,
                seq_lens=base.seq_lens[nd:],
                block_table=base.block_table[nd:],
            )
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
        return EvictionAttentionMetadata(
            **fields, num_decodes=nd, num_decode_tokens=nd_tokens, prefill=prefill,
            stats=stat_buffers.active(), split_scratch=self.split_scratch,
        )


class EvictionAttentionImpl(TritonAttentionImpl):
    """Decode rows through the fused kernel, the prefill part through vLLM's Triton kernel."""

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        md = attn_metadata
        if (md is None or not isinstance(md, EvictionAttentionMetadata) or md.num_decodes == 0
                or output_scale is not None or output_block_scale is not None):
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        nd = md.num_decodes
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        out = output.view(-1, self.num_heads, self.head_size)
        extra = md.stats.kernel_kwargs() if md.stats is not None else {}
        fused_decode_attention(
            query.view(-1, self.num_heads, self.head_size)[:nd], key_cache, value_cache,
            md.block_table, md.seq_lens, out[:nd], self.scale, scratch=md.split_scratch,
            num_splits=num_splits_for(nd, self.num_kv_heads), **extra)
        if md.prefill is not None:
            t = md.num_decode_tokens
            super().forward(layer, query[t:], None, None, kv_cache, md.prefill, output[t:])
        return output


class EvictionAttentionBackend(TritonAttentionBackend):
    """Registered as ``AttentionBackendEnum.CUSTOM`` by the plugin (``register``)."""

    supported_kv_cache_dtypes: ClassVar[list] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        return NAME

    @staticmethod
    def get_impl_cls():
        return EvictionAttentionImpl

    @staticmethod
    def get_builder_cls():
        return EvictionAttentionMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list:
        return list(BLOCK_SIZES)

    @classmethod
    def supports_block_size(cls, block_size: int | None) -> bool:
        return block_size is None or block_size in BLOCK_SIZES

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return HEAD_SIZES[0] <= head_size <= HEAD_SIZES[1]

    # what the kernel does not implement: vLLM then refuses the backend for such layers
    _unsupported = classmethod(lambda cls: False)
    supports_sliding_window = supports_rswa = supports_sink = supports_mm_prefix = _unsupported
    supports_alibi_sqrt = supports_non_causal = supports_batch_invariance = _unsupported

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

