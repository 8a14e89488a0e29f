"""Observation-window kernel == torch reference; rows are causal softmaxes."""

import pytest
import torch
from vllm_kvevict.kernels import reference

pytestmark = pytest.mark.usefixtures("needs_triton")


@pytest.mark.parametrize("window", [8, 20])
def test_window_matches_reference(case, window, tol):
    from vllm_kvevict.kernels.window_attention import paged_window_attention

    q = torch.randn(len(case.seq_lens), case.num_heads, window, case.head_dim, generator=case.gen)
    q = q.to(case.key_cache.device, case.key_cache.dtype)
    got = paged_window_attention(q, case.key_cache, case.block_table, case.seq_lens)
    want = reference.window_attention(q, case.key_cache, case.block_table, case.seq_lens)
    tol.close(got.probs, want.probs)
    tol.close(got.block_sum, want.block_sum)

    # rows sum to 1 from the prompt start on, are 0 before it (every config has a request
    # shorter than the window), and never look ahead
    lens = case.seq_lens.tolist()
    for r, n in enumerate(lens):
        pos = torch.arange(n - window, n)
        expect = (pos >= 0).float()[None].expand(case.num_heads, -1).to(q.device)
        torch.testing.assert_close(got.probs[r].sum(-1), expect, atol=tol.atol, rtol=0)
        ahead = torch.arange(got.probs.shape[-1])[None, :] > pos[:, None]
        assert bool((got.probs[r][:, ahead.to(q.device)] == 0).all())


def test_window_without_probs(paged_case, dtype, tol):
    from vllm_kvevict.kernels.window_attention import paged_window_attention

    case = paged_case(16, 2, 3, 32, [30, 17], dtype=dtype)
    q = torch.randn(2, case.num_heads, 4, 32, generator=case.gen).to(case.key_cache.device, dtype)
    full = paged_window_attention(q, case.key_cache, case.block_table, case.seq_lens, 0.2)
    sums = paged_window_attention(q, case.key_cache, case.block_table, case.seq_lens, 0.2, probs=False)
    assert sums.probs is None
    torch.testing.assert_close(sums.block_sum, full.block_sum, atol=0, rtol=0)
    want = reference.window_attention(q, case.key_cache, case.block_table, case.seq_lens, 0.2)
    tol.close(full.probs, want.probs)


def test_padded_windows_of_several_requests_in_one_launch(paged_case, dtype, tol):
    """One launch for every request of a step, each with its own window (the tile's last
    ``window_lens[r]`` queries, right-aligned), the GQA group in one tile: each row equals the
    same request alone with its own window; the padding rows are zero."""
    from vllm_kvevict.kernels.window_attention import paged_window_attention

    case = paged_case(16, 2, 4, 32, [40, 9, 33], dtype=dtype)
    width = 8
    q = torch.randn(3, case.num_heads, width, 32, generator=case.gen).to(case.key_cache.device, dtype)
    lens = torch.tensor([8, 3, 5], dtype=torch.int32, device=q.device)
    got = paged_window_attention(q, case.key_cache, case.block_table, case.seq_lens,
                                 window_lens=lens)
    for r, w in enumerate(lens.tolist()):
        alone = paged_window_attention(q[r:r + 1, :, width - w:], case.key_cache,
                                       case.block_table[r:r + 1], case.seq_lens[r:r + 1])
        tol.close(got.probs[r, :, width - w:], alone.probs[0])
        tol.close(got.block_sum[r], alone.block_sum[0])
        assert bool((got.probs[r, :, : width - w] == 0).all())
    want = reference.window_attention(q, case.key_cache, case.block_table, case.seq_lens,
                                      window_lens=lens)
    tol.close(got.probs, want.probs)
    tol.close(got.block_sum, want.block_sum)


def test_probe_queries_see_every_key(paged_case, dtype, tol):
    """``causal=False`` (the question probe's queries, from outside the row): each query's
    softmax runs over the row's every key and only those (a partial last block's unused tail
    stays hidden), as the reference computes it."""
    from vllm_kvevict.kernels.window_attention import paged_window_attention

    case = paged_case(16, 2, 4, 32, [40, 9, 33], dtype=dtype)
    q = torch.randn(3, case.num_heads, 6, 32, generator=case.gen).to(case.key_cache.device, dtype)
    got = paged_window_attention(q, case.key_cache, case.block_table, case.seq_lens, causal=False)
    want = reference.window_attention(q, case.key_cache, case.block_table, case.seq_lens,
                                      causal=False)
    tol.close(got.probs, want.probs)
    tol.close(got.block_sum, want.block_sum)
    for r, n in enumerate(case.seq_lens.tolist()):
        torch.testing.assert_close(got.probs[r, ..., :n].sum(-1),
                                   torch.ones(case.num_heads, 6, device=q.device),
                                   atol=tol.atol, rtol=0)
        assert bool((got.probs[r, ..., n:] == 0).all())
        # every key, the row's last ones included (a causal window hides them from early queries)
        assert bool((got.probs[r, :, 0, n - 1] > 0).all())
