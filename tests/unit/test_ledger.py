"""Property test of the scheduler-side accounting on vLLM's real block pool and manager."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_kvevict.adapter.ledger import BlockLedger

BS = 4
NUM_BLOCKS = 64


def make_manager():
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
        KVCacheTensor,
    )

    spec = FullAttentionSpec(block_size=BS, num_kv_heads=1, head_size=8, dtype=torch.float32)
    config = KVCacheConfig(
        num_blocks=NUM_BLOCKS,
        kv_cache_tensors=[KVCacheTensor(size=spec.page_size_bytes * NUM_BLOCKS, layers=["l0"],
                                       layer_stride=0, block_stride=spec.page_size_bytes)],
        kv_cache_groups=[KVCacheGroupSpec(["l0"], spec)],
    )
    kvm = KVCacheManager(config, max_model_len=NUM_BLOCKS * BS, scheduler_block_size=BS,
                         hash_block_size=BS, enable_caching=False)
    return kvm.coordinator.single_type_managers[0]


OPS = st.lists(
    st.tuples(
        st.sampled_from(["add", "grow", "release", "park", "restore", "finish", "preempt"]),
        st.integers(0, 3),  # request
        st.lists(st.integers(0, 15), max_size=4),  # positions
        st.integers(1, 12),  # tokens
    ),
    max_size=60,
)


def held(manager, null):
    ids = [b.block_id for blocks in manager.req_to_blocks.values() for b in blocks if b is not null]
    return ids


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_random_sequences_never_leak_or_double_free(ops):
    manager = make_manager()
    pool = manager.block_pool
    ledger = BlockLedger(manager, bin_capacity=6)
    null = pool.null_block
    initial_free = pool.get_num_free_blocks()
    tokens: dict[str, int] = {}
    for op, r, positions, n in ops:
        req = f"r{r}"
        if op == "add" and req not in tokens:
            if pool.get_num_free_blocks() * BS >= n + BS:
                manager.allocate_new_blocks(req, n, n)
                tokens[req] = n
        elif req not in tokens:
            continue
        elif op == "grow":
            need = -(-(tokens[req] + n) // BS) - len(manager.req_to_blocks[req])
            if need <= pool.get_num_free_blocks():
                tokens[req] += n
                manager.allocate_new_blocks(req, tokens[req], tokens[req])
        elif op in ("release", "park", "restore"):
            full = tokens[req] // BS
            valid = [p for p in positions if p < full]
            if op == "release":
                ledger.release(req, valid, tokens[req])
            elif op == "park":
                free_spots = ledger.bin_capacity - ledger.num_parked_total()
                blocks = manager.req_to_blocks[req]
                valid = [p for p in dict.fromkeys(valid)
                         if blocks[p] is not null and p not in ledger.state(req).parked][:free_spots]
                ledger.park(req, valid, tokens[req])
            else:
                ledger.restore(req, valid)
        elif op in ("finish", "preempt"):
            manager.free(req)
            ledger.forget(req)
            del tokens[req]
        # invariants after every operation
        ids = held(manager, null)
        assert len(ids) == len(set(ids)), "a block is held twice"
        assert pool.get_num_free_blocks() + len(ids) == initial_free, "a block leaked"
        assert ledger.num_parked_total() <= ledger.bin_capacity
        # the running counters and masks agree with a scan of vLLM's lists
        assert ledger.num_parked_total() == sum(len(rb.parked) for rb in ledger.requests.values())
        for rid in tokens:
            scan = [i for i, b in enumerate(manager.req_to_blocks[rid]) if b is not null]
            assert ledger.resident_positions(rid) == scan
        for rid, rb in ledger.requests.items():
            blocks = manager.req_to_blocks.get(rid, [])
            assert all(blocks[p] is not null for p in rb.parked)
            assert all(blocks[p] is null for p in rb.released)
            row, positions = ledger.compacted_row(rid)
            attended = [(i, b.block_id) for i, b in enumerate(blocks)
                        if b is not null and i not in rb.parked]
            assert list(zip(positions, row)) == attended  # the cached ids too
            assert len(row) * BS + ledger.offset_tokens(rid) == len(blocks) * BS
            assert ledger.offset_tokens(rid) == (len(rb.parked) + len(rb.released)) * BS
    for req in list(tokens):
        manager.free(req)
        ledger.forget(req)
    assert pool.get_num_free_blocks() == initial_free


def test_only_full_committed_blocks_can_leave_attention():
    manager = make_manager()
    ledger = BlockLedger(manager, bin_capacity=4)
    manager.allocate_new_blocks("a", 10, 10)  # blocks 0,1 full; block 2 holds 2 tokens
    with pytest.raises(ValueError, match="not a full committed block"):
        ledger.release("a", [2], committed_tokens=10)
    with pytest.raises(ValueError, match="not a full committed block"):
        ledger.park("a", [1], committed_tokens=7)
    assert ledger.release("a", [1], committed_tokens=10) == [1]
    assert ledger.release("a", [1, 0], committed_tokens=10) == [0]  # 1 is already released


def test_poison_boundary_is_the_first_exclusion():
    manager = make_manager()
    ledger = BlockLedger(manager, bin_capacity=4)
    manager.allocate_new_blocks("a", 20, 20)
    assert ledger.cacheable_tokens("a", 20) == 20
    ledger.park("a", [1], committed_tokens=14)
    ledger.release("a", [2], committed_tokens=19)
    assert ledger.cacheable_tokens("a", 20) == 12  # floor(14 / 4) blocks stay cacheable


@given(st.lists(st.sets(st.integers(0, 600), max_size=40), min_size=1, max_size=12))
def test_eviction_log_round_trips_each_change_of_the_excluded_set(sets):
    from vllm_kvevict.adapter.ledger import EvictionLog

    log, expected = EvictionLog(), []
    for step, positions in enumerate(sets):
        mask = np.zeros(601 + step, dtype=bool)  # the list grows; trailing zeros change nothing
        mask[list(positions)] = True
        log.record(step * 16, mask)
        if not expected or expected[-1][1] != frozenset(positions):
            expected.append((step * 16, frozenset(positions)))
    assert list(log) == expected and log[-1] == expected[-1] and len(log) == len(expected)


def test_row_check_catches_a_block_replaced_behind_the_ledger(monkeypatch):
    """Compacted rows read block ids from a per-request cache; the tests' row check
    (``KVEVICT_CHECK_ROWS``, on for every engine test) compares each row with vLLM's list."""
    manager = make_manager()
    ledger = BlockLedger(manager, bin_capacity=4)
    ledger.check_rows = True
    manager.allocate_new_blocks("a", 16, 16)
    ledger.release("a", [1], committed_tokens=16)
    assert ledger.compacted_row("a")[1] == [0, 2, 3]
    other = manager.block_pool.get_new_blocks(1)[0]
    manager.req_to_blocks["a"][2] = other  # what a copy-on-write after admission would do
    with pytest.raises(AssertionError, match="cached block ids"):
        ledger.compacted_row("a")
