"""The paged references (the kernels' inputs) equal the dense references on gathered copies:
block tables, partial last blocks, padding entries and causal offsets handled right."""

import pytest
import torch
import torch.nn.functional as F
from vllm_kvevict.kernels import reference
from vllm_kvevict.kernels import reference as R
from vllm_kvevict.kernels.paged import PagedKV

pytestmark = pytest.mark.parametrize("dtype", [torch.float32], ids=["float32"])  # references only
ATOL = 1e-6


def test_paged_references_equal_dense_references(case):
    kv = PagedKV(case.key_cache, case.value_cache)
    bs, hq, d = case.block_size, case.num_heads, case.head_dim
    scale = d**-0.5
    window = 4
    q_window = torch.randn(len(case.seq_lens), hq, window, d, generator=case.gen).to(kv.key.device)
    o_proj = torch.randn(24, hq * d, generator=case.gen).to(kv.key.device)
    gram = reference.wo_gram(o_proj, hq)

    args = (case.block_table, case.seq_lens)
    out, mass, peak = reference.fused_decode_attention(
        case.query, kv.key, kv.value, *args, scale, slot=torch.arange(len(case.seq_lens)),
        park_ids=torch.zeros(1, dtype=torch.int32), park_start=torch.zeros(len(case.seq_lens) + 1),
        num_slots=len(case.seq_lens), nb_stats=case.block_table.shape[1])
    win = reference.window_attention(q_window, kv.key, *args)
    kmin, kmax = reference.key_bounds(kv.key, *args)
    n_blocks = (case.seq_lens + bs - 1) // bs
    quest = reference.quest_scores(case.query, kmin, kmax, n_blocks)
    vnorm = reference.value_proj_norm(gram, kv.value, *args)
    for r, n in enumerate(case.seq_lens.tolist()):
        k, v = kv.gather(case.block_table[r], n)
        nb = int(n_blocks[r])
        close = lambda a, b: torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5)  # noqa: E731
        probs = R.dense_decode_attention(case.query[r], k, scale)  # [Hq, n]
        per_block = F.pad(probs, (0, -n % bs)).view(hq, -1, bs).sum(-1)  # [Hq, nb]
        grouped = per_block.view(case.num_kv_heads, -1, per_block.shape[-1])
        close(mass[r, :, :per_block.shape[-1]], grouped.sum(1))
        close(peak[r, :, :per_block.shape[-1]], grouped.amax(1))
        v_q = v.float().repeat_interleave(hq // case.num_kv_heads, 1)  # [n, Hq, D]
        close(out[r].float(), torch.einsum("ht,thd->hd", probs, v_q))
        if n >= window:  # (shorter prompts: zero rows, checked by the kernel tests)
            close(win.probs[r, :, :, :n], R.dense_window_attention(q_window[r].transpose(0, 1), k, scale))
        dense_min, dense_max = R.dense_key_bounds(k, bs)  # [Hkv, nb, D]
        close(kmin[r, :nb].transpose(0, 1).float(), dense_min)
        close(kmax[r, :nb].transpose(0, 1).float(), dense_max)
        close(quest[r, :, :nb], R.quest_block_bounds(case.query[r], dense_min, dense_max))
        close(vnorm[r, :, :n], R.dense_value_proj_norm(v, gram))
