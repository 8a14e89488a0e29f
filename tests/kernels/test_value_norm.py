"""Projected-value norms: kernel == Gram reference == the explicit projection ‖v W_O^h‖₂."""

import pytest
import torch
from vllm_kvevict.kernels import reference
from vllm_kvevict.kernels.paged import PagedKV

pytestmark = pytest.mark.usefixtures("needs_triton")


@pytest.mark.parametrize("head_dim", [32, 80])  # 80: not a power of two, two Gram column chunks
def test_value_norm_matches_explicit_projection(paged_case, head_dim, dtype, tol):
    from vllm_kvevict.kernels.value_norm import paged_value_proj_norm

    for block_size, group, lens in [(16, 3, [1, 37, 16]), (32, 1, [70, 5])]:
        case = paged_case(block_size, 2, group, head_dim, lens, dtype=dtype)
        dev = case.value_cache.device
        hidden = 48
        o_proj = (torch.randn(hidden, case.num_heads * head_dim, generator=case.gen) / 8).to(dev)
        gram = reference.wo_gram(o_proj, case.num_heads)
        got = paged_value_proj_norm(gram, case.value_cache, case.block_table, case.seq_lens)
        want = reference.value_proj_norm(gram, case.value_cache, case.block_table, case.seq_lens)
        tol.close(got, want)

        kv = PagedKV(case.key_cache, case.value_cache)
        w_heads = o_proj.view(hidden, case.num_heads, head_dim)  # W_O^h = w_heads[:, h].T
        for r, n in enumerate(lens):
            _, v = kv.gather(case.block_table[r], n)
            v = v.float().repeat_interleave(group, 1)  # [n, Hq, D], the cache's values in float32
            explicit = torch.einsum("thd,xhd->htx", v, w_heads).norm(dim=-1)  # [Hq, n]
            torch.testing.assert_close(got[r, :, :n], explicit, atol=1e-4, rtol=1e-4)
            assert bool((got[r, :, n:] == 0).all())
