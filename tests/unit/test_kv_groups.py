"""Which KV-cache group layouts the adapter evicts in, and which it refuses by name (vLLM's
own spec classes, no engine)."""

from __future__ import annotations

import pytest
import torch
from vllm.v1.kv_cache_interface import (
    ChunkedLocalAttentionSpec,
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    MambaSpec,
    MLAAttentionSpec,
    SlidingWindowSpec,
)

from vllm_kvevict.adapter.startup_checks import UnsupportedConfigError, check_kv_cache_config

ATTN = dict(block_size=32, num_kv_heads=1, head_size=64, dtype=torch.float32)


def full():
    return FullAttentionSpec(**ATTN)


def sliding():
    return SlidingWindowSpec(**ATTN, sliding_window=512)


def config(*specs) -> KVCacheConfig:
    groups = [KVCacheGroupSpec([f"model.layers.{i}.attn"], spec) for i, spec in enumerate(specs)]
    return KVCacheConfig(num_blocks=8, kv_cache_tensors=[], kv_cache_groups=groups)


@pytest.mark.parametrize("specs, gid", [
    ((full(),), 0),
    ((sliding(), sliding(), full()), 2),  # Gemma 3: window groups first, the full one last
    ((full(), sliding()), 0),  # GPT-OSS-style alternation
])
def test_the_full_attention_group_is_the_evicted_one(specs, gid):
    assert check_kv_cache_config(config(*specs)) == gid


@pytest.mark.parametrize("specs, named", [
    ((full(), MambaSpec(block_size=32, shapes=((4, 4),), dtypes=(torch.float32,))),
     "mamba / linear-attention layers"),
    ((full(), ChunkedLocalAttentionSpec(**ATTN, attention_chunk_size=256)),
     "chunked-local attention layers"),
    ((MLAAttentionSpec(**ATTN),), "MLA attention"),
    ((full(), full()), "2 full-attention KV-cache groups"),
    ((sliding(), sliding()), "no full-attention layers"),
])
def test_other_group_kinds_are_refused_by_name(specs, named):
    with pytest.raises(UnsupportedConfigError, match=named):
        check_kv_cache_config(config(*specs))
