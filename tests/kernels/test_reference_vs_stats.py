"""The paged references equal the dense statistics in ``vllm_kvevict.stats`` on gathered copies."""

import pytest
import torch
from vllm_kvevict.kernels import reference
from vllm_kvevict.kernels.paged import PagedKV

stats = pytest.importorskip("vllm_kvevict.stats")
pytestmark = pytest.mark.parametrize("dtype", [torch.float32], ids=["float32"])  # references only
ATOL = 1e-6


def test_paged_references_equal_dense_stats(case):
    kv = PagedKV(case.key_cache, case.value_cache)
    bs, hq, d = case.block_size, case.num_heads, case.head_dim
    scale = d**-0.5
    window = 4
    q_window = torch.randn(len(case.seq_lens), hq, window, d, generator=case.gen).to(kv.key.device)
    o_proj = torch.randn(24, hq * d, generator=case.gen).to(kv.key.device)
    gram = reference.wo_gram(o_proj, hq)
    torch.testing.assert_close(gram, stats.wo_gram(o_proj, hq), atol=0, rtol=0)

    args = (case.block_table, case.seq_lens)
    dec = reference.decode_attention(case.query, kv.key, kv.value, *args)
    win = reference.window_attention(q_window, kv.key, *args)
    kmin, kmax = reference.key_bounds(kv.key, *args)
    n_blocks = (case.seq_lens + bs - 1) // bs
    quest = reference.quest_scores(case.query, kmin, kmax, n_blocks)
    vnorm = reference.value_proj_norm(gram, kv.value, *args)
    for r, n in enumerate(case.seq_lens.tolist()):
        k, v = kv.gather(case.block_table[r], n)
        nb = int(n_blocks[r])
        close = lambda a, b: torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5)  # noqa: E731
        close(dec.token_probs[r, :, :n], stats.decode_attention(case.query[r], k, scale))
        if n >= window:  # stats.window_attention requires the whole window inside the prompt
            close(win.probs[r, :, :, :n], stats.window_attention(q_window[r].transpose(0, 1), k, scale))
        dense_min, dense_max = stats.key_bounds(k, bs)  # [Hkv, nb, D]
        close(kmin[r, :nb].transpose(0, 1).float(), dense_min)
        close(kmax[r, :nb].transpose(0, 1).float(), dense_max)
        close(quest[r, :, :nb], stats.quest_block_bounds(case.query[r], dense_min, dense_max))
        close(vnorm[r, :, :n], stats.value_proj_norm(v, gram))
