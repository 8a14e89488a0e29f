"""Quest bounds and scores: kernel == reference, bounds really bound, incremental == batch."""

import pytest
import torch
from vllm_kvevict.kernels import reference
from vllm_kvevict.kernels.paged import PagedKV

pytestmark = pytest.mark.usefixtures("needs_triton")


def test_bounds_and_scores_match_reference(case, tol):
    from vllm_kvevict.kernels.key_bounds import paged_key_bounds, paged_quest_scores

    got = paged_key_bounds(case.key_cache, case.block_table, case.seq_lens)
    want = reference.key_bounds(case.key_cache, case.block_table, case.seq_lens)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])  # min/max are exact

    n_blocks = (case.seq_lens + case.block_size - 1) // case.block_size
    score = paged_quest_scores(case.query, *got, n_blocks)
    ref_score = reference.quest_scores(case.query, *want, n_blocks)
    tol.close(score, ref_score)

    # the score upper-bounds q·k of every real key of the block, and padding blocks are -inf
    kv = PagedKV(case.key_cache, case.value_cache)
    group = case.num_heads // case.num_kv_heads
    for r, n in enumerate(case.seq_lens.tolist()):
        k, _ = kv.gather(case.block_table[r], n)
        qk = torch.einsum("hd,thd->ht", case.query[r].float(), k.float().repeat_interleave(group, 1))
        nb = int(n_blocks[r])
        pad = torch.full((case.num_heads, nb * case.block_size - n), float("-inf"), device=qk.device)
        best = torch.cat([qk, pad], 1).view(case.num_heads, nb, -1).amax(-1)
        assert bool((score[r, :, :nb] >= best - tol.atol).all())
        assert bool(torch.isneginf(score[r, :, nb:]).all())


def test_bounds_of_given_blocks_and_incremental_update(paged_case, dtype):
    """Folding a block's keys in one at a time from the empty (+inf, -inf) bounds == batch bounds."""
    from vllm_kvevict.kernels.key_bounds import paged_block_key_bounds

    case = paged_case(16, 2, 1, 32, [40], dtype=dtype)
    ids = case.block_table[0, :3]
    counts = torch.tensor([16, 16, 8], device=ids.device)
    kmin, kmax = paged_block_key_bounds(case.key_cache, ids, counts)
    assert kmin.dtype == dtype
    lo = torch.full((3, 2, 32), float("inf"), device=ids.device, dtype=dtype)
    hi = -lo
    for t in range(16):
        rows = torch.tensor([b for b in range(3) if t < counts[b]], device=ids.device)
        reference.update_key_bounds(lo, hi, rows, case.key_cache[ids[rows].long(), t])
        if t == 7:  # the partial block is complete now, the others are not
            assert torch.equal(lo[2], kmin[2]) and not torch.equal(lo[0], kmin[0])
    assert torch.equal(lo, kmin) and torch.equal(hi, kmax)
    empty = paged_block_key_bounds(case.key_cache, ids[:1], torch.zeros(1, dtype=torch.int32))
    assert bool(torch.isposinf(empty[0]).all()) and bool(torch.isneginf(empty[1]).all())
