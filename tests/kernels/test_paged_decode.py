"""Fused paged decode kernel == torch reference == dense softmax attention."""

import pytest
import torch
import torch.nn.functional as F
from vllm_kvevict.kernels import reference
from vllm_kvevict.kernels.paged import PagedKV

pytestmark = pytest.mark.usefixtures("needs_triton")


def dense_attention(case):
    """Plain softmax attention per request on gathered K/V (torch SDPA, no paging code)."""
    kv = PagedKV(case.key_cache, case.value_cache)
    outs = []
    for r, n in enumerate(case.seq_lens.tolist()):
        k, v = kv.gather(case.block_table[r], n)
        g = case.num_heads // case.num_kv_heads
        k, v = (x.float().repeat_interleave(g, 1).transpose(0, 1) for x in (k, v))  # [Hq, n, D]
        q = case.query[r].float()[:, None, :]  # [Hq, 1, D]
        outs.append(F.scaled_dot_product_attention(q, k, v)[:, 0])
    return torch.stack(outs)


@pytest.mark.parametrize("blocks_per_split", [None, 1, 3])
def test_decode_matches_reference_and_dense(case, blocks_per_split, tol):
    from vllm_kvevict.kernels.paged_decode import paged_decode_attention

    got = paged_decode_attention(case.query, case.key_cache, case.value_cache, case.block_table,
                                 case.seq_lens, token_probs=True, blocks_per_split=blocks_per_split)
    want = reference.decode_attention(case.query, case.key_cache, case.value_cache,
                                      case.block_table, case.seq_lens)
    assert got.output.dtype == case.query.dtype
    for name in want._fields:
        tol.close(getattr(got, name), getattr(want, name), msg=lambda m, name=name: f"{name}: {m}")
    # float32 dense attention on the same (possibly half-precision) values
    tol.close(got.output.float(), dense_attention(case), atol=tol.out_atol, rtol=tol.out_rtol)


def test_decode_block_stats_are_the_probabilities_summed(case, tol):
    """Independent of the reference: mass sums to one per query head, Σp² <= Σp, zeros past the end."""
    from vllm_kvevict.kernels.paged_decode import paged_decode_attention

    got = paged_decode_attention(case.query, case.key_cache, case.value_cache, case.block_table,
                                 case.seq_lens, token_probs=True)
    r_n, hq, max_t = got.token_probs.shape
    bs, g = case.block_size, case.num_heads // case.num_kv_heads
    per_block = got.token_probs.view(r_n, hq, -1, bs)
    torch.testing.assert_close(got.block_mass_q, per_block.sum(-1).transpose(1, 2), atol=tol.atol, rtol=0)
    torch.testing.assert_close(got.block_sq_q, (per_block**2).sum(-1).transpose(1, 2), atol=tol.atol, rtol=0)
    torch.testing.assert_close(got.block_mass_q.sum(1), torch.ones(r_n, hq, device=got.output.device))
    torch.testing.assert_close(got.block_mass.sum(1), torch.full((r_n, case.num_kv_heads), float(g),
                                                                 device=got.output.device))
    assert bool((got.block_sq <= got.block_mass + 1e-7).all())
    n_blocks = (case.seq_lens + bs - 1) // bs
    past = torch.arange(got.block_mass.shape[1], device=n_blocks.device)[None, :] >= n_blocks[:, None]
    assert bool(past.any()) and bool((got.block_mass[past] == 0).all())


def test_stats_off_gives_the_same_output(case):
    from vllm_kvevict.kernels.paged_decode import paged_decode_attention

    args = (case.query, case.key_cache, case.value_cache, case.block_table, case.seq_lens)
    fused = paged_decode_attention(*args)
    plain = paged_decode_attention(*args, stats=False)
    assert plain.block_mass.numel() == 0 and plain.token_probs is None
    torch.testing.assert_close(plain.output, fused.output, atol=0, rtol=0)


def test_decode_empty_request_and_scale(paged_case, dtype, tol):
    """A zero-length row yields zeros (not NaN); a custom softmax scale is honoured."""
    from vllm_kvevict.kernels.paged_decode import paged_decode_attention

    case = paged_case(16, 1, 3, 32, [0, 23], dtype=dtype)
    args = (case.query, case.key_cache, case.value_cache, case.block_table, case.seq_lens, 0.3)
    got = paged_decode_attention(*args)
    want = reference.decode_attention(*args)
    assert bool((got.output[0] == 0).all()) and bool((got.block_mass[0] == 0).all())
    tol.close(got.output, want.output)
    tol.close(got.block_sq_q, want.block_sq_q)


def test_decode_half_precision_cache(paged_case):
    """fp16 caches/queries: computed in float32 from the same fp16 values as the reference."""
    from vllm_kvevict.kernels.paged_decode import paged_decode_attention

    case = paged_case(16, 2, 3, 32, [33, 9], dtype=torch.float16)
    args = (case.query, case.key_cache, case.value_cache, case.block_table, case.seq_lens)
    got, want = paged_decode_attention(*args), reference.decode_attention(*args)
    assert got.output.dtype == torch.float16
    torch.testing.assert_close(got.output, want.output, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(got.block_mass, want.block_mass, atol=1e-5, rtol=1e-5)
