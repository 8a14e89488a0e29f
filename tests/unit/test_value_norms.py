"""LaProx's projected-value norms kept per KV slot, written with the token's K/V: what a
decision gathers equals the norms recomputed from the cache, over random write sequences
(slots freed and written again, rows compacted, blocks reused by another request), on the
memory vLLM was told about."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from vllm_kvevict.kernels.reference import dense_value_proj_norm

from vllm_kvevict.adapter.value_norms import ValueNormCache, kv_share

HKV, HQ, D, BS, BLOCKS = 2, 4, 8, 4, 12


def _gram(seed: int) -> torch.Tensor:
    w = torch.randn(HQ, D, 16, generator=torch.Generator().manual_seed(seed))
    return w @ w.transpose(1, 2)  # [Hq, D, D]


@settings(max_examples=40, deadline=None)
@given(steps=st.lists(st.lists(st.integers(0, BLOCKS * BS - 1), min_size=1, max_size=9,
                               unique=True), min_size=1, max_size=8),
       rows=st.lists(st.lists(st.integers(0, BLOCKS - 1), min_size=1, max_size=5, unique=True),
                     min_size=1, max_size=3),
       padded=st.integers(0, 3), seed=st.integers(0, 3))
def test_gathered_norms_equal_the_norms_recomputed_from_the_cache(steps, rows, padded, seed):
    """Each step writes values at some slots (a slot written again: its block was freed and
    reused, by this request or another one); padded tokens (slot -1) change nothing; any row of
    blocks (a compacted row, a prefix-cache hit) reads exactly the norms of the values now in
    its slots."""
    gen = torch.Generator().manual_seed(seed)
    gram = _gram(seed)
    cache = torch.zeros(BLOCKS * BS, HKV, D)  # the layer's values by slot
    norms = ValueNormCache(1, BLOCKS * BS, HQ, "cpu")
    for slots in steps:
        values = torch.randn(len(slots) + padded, HKV * D, generator=gen)
        slot_ids = torch.tensor(slots + [-1] * padded)
        cache[slot_ids[:len(slots)]] = values[:len(slots)].view(-1, HKV, D)
        norms.write(0, values, slot_ids, gram)
    for row in rows:
        block_ids = torch.tensor(row)
        n = len(row) * BS - 1  # a partly written last block
        slots = (block_ids[:, None] * BS + torch.arange(BS)).flatten()[:n]
        want = dense_value_proj_norm(cache[slots], gram)  # [Hq, T]
        torch.testing.assert_close(norms.gather(0, block_ids, n, BS), want, atol=1e-5, rtol=1e-5)


def test_a_write_reads_nothing_back():
    """Written with tensor operations only (a FULL CUDA graph captures and replays it): on the
    meta device any read-back would raise."""
    norms = ValueNormCache(1, 32, HQ, "meta")
    values = torch.empty(5, HKV * D, device="meta")
    norms.write(0, values, torch.empty(5, dtype=torch.int64, device="meta"),
                torch.empty(HQ, D, D, device="meta"))


def test_their_memory_is_taken_from_the_kv_budget():
    # 2 layers x 2 KV heads x 64 dims x (K and V) x 2 bytes per token; 2 layers x 4 heads x 4 B
    kv = 2 * 2 * 64 * 2 * 2
    share = kv_share(kv, num_layers=2, num_heads=4)
    assert share == kv / (kv + 32)
    assert ValueNormCache(2, 100, 4, "cpu").nbytes == 2 * 101 * 4 * 4


def test_the_kv_memory_vllm_sizes_the_pool_from_shrinks_by_their_share():
    from types import SimpleNamespace

    import torch as _torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_kvevict.adapter import _with_norms_memory

    spec = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=_torch.float16)
    specs = [{"layers.0.attn": spec, "layers.1.attn": spec}]
    config = SimpleNamespace(model_config=SimpleNamespace(get_num_attention_heads=lambda p: 4),
                             parallel_config=None)
    args, kwargs = _with_norms_memory(config, specs, (specs, [10**9]), {})
    per_token = 2 * spec.page_size_bytes / spec.block_size
    assert args[1] == [int(10**9 * per_token / (per_token + 2 * 4 * 4))]
    args, kwargs = _with_norms_memory(config, specs, (specs,), {"available_memory": [10**9]})
    assert kwargs["available_memory"] == [int(10**9 * per_token / (per_token + 32))]
