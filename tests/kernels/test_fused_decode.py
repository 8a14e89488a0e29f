"""The attention backend's kernel (``fused_decode.py``) == its torch twin == dense attention.

Caches are vLLM 0.32's own GPU allocations (``vllm_layer_caches``: several layers in one
buffer, strided per ``KVCacheLayout``), written through the torch twin of vLLM's cache write;
every slot a kernel must not read is NaN. Rows are compacted (shuffled block ids), ragged, and
include an empty padding row (seq_len 0, as a captured CUDA-graph batch pads). Statistics go to
slots that differ from the row index, some rows unscored, some slots with parked blocks, and
two layers accumulate into the same buffers (Σ and max over layers).
"""

import pytest
import torch
import torch.nn.functional as F
from vllm_kvevict.kernels import reference
from vllm_kvevict.kernels.paged import VLLM_KV_LAYOUTS, PagedKV, vllm_layer_caches

pytestmark = pytest.mark.usefixtures("needs_triton")

GPU = torch.cuda.is_available()
if not GPU:
    # the interpreter runs float16 too (the conftest's CPU list is float32 only); bfloat16 only
    # on a GPU: the interpreter's ``tl.dot`` on bfloat16 operands is wrong (a plain 16x16
    # product comes out ~1e10 off; loads, stores and casts are right), so a bfloat16 run here
    # would test the interpreter, not the kernel
    @pytest.fixture(params=[torch.float32, torch.float16], ids=["float32", "float16"])
    def dtype(request):
        return request.param
LAYOUTS = tuple(VLLM_KV_LAYOUTS) if GPU else ("BLNHC", "LHBNC")
D = 64 if GPU else 32
HKV = 2
LENS = (37, 0, 16, 1, 70)  # partial, padding row, one full block, one token, several blocks
SLOTS = (2, -1, 0, -1, 1)  # row -> statistics slot (-1: not scored)
PARKED = (2, 0, 1)  # parked blocks per slot


def build(layout, dtype, block_size, group, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in LENS]
    n_park = sum(PARKED)
    num_blocks = sum(need) + n_park + 3  # 3 never-used, poisoned
    max_blocks = max(need) + 2
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.full((len(LENS), max_blocks), int(perm[-1]), dtype=torch.int32)
    slots, nxt = [], 0
    for r, (n, nb) in enumerate(zip(LENS, need)):
        table[r, :nb] = perm[nxt: nxt + nb].to(torch.int32)
        nxt += nb
        t = torch.arange(n)
        slots.append(table[r, t // block_size].long() * block_size + t % block_size)
    park_ids = perm[nxt: nxt + sum(PARKED)].to(torch.int32)  # slot s's: after slots < s
    for blk in park_ids.tolist():
        slots.append(blk * block_size + torch.arange(block_size))
    park_start = torch.tensor([0, *torch.tensor(PARKED).cumsum(0).tolist()], dtype=torch.int32)
    slot_mapping = torch.cat(slots)
    keys = torch.randn(len(slot_mapping), HKV, D, generator=gen).to(dtype)
    values = torch.randn(len(slot_mapping), HKV, D, generator=gen).to(dtype)
    caches = vllm_layer_caches(3, num_blocks, HKV, block_size, D, layout, dtype, device)
    for cache in caches:
        cache.fill_(float("nan"))
    for layer in (0, 2):  # two layers under test, the middle one poisoned
        reference.reshape_and_cache_flash((keys * (layer + 1)).to(device), values.to(device),
                                          caches[layer], slot_mapping.to(device))
    hq = HKV * group
    return dict(
        caches=caches, table=table.to(device),
        seq_lens=torch.tensor(LENS, dtype=torch.int32, device=device),
        slot=torch.tensor(SLOTS, dtype=torch.int32, device=device),
        park_ids=torch.cat([park_ids, perm[-1:].to(torch.int32)]).to(device),  # + a poisoned one
        park_start=park_start.to(device),
        queries=[torch.randn(len(LENS), hq, D, generator=gen).to(device, dtype) for _ in range(2)],
        nb=max_blocks + max(PARKED),
    )


def run_kernel(c, *, rescale=True, num_splits=None):
    from vllm_kvevict.kernels.fused_decode import fused_decode_attention

    hq = c["queries"][0].shape[1]
    dev = c["table"].device
    mass = torch.zeros(len(PARKED), HKV, c["nb"], device=dev)
    peak = torch.zeros_like(mass)
    outs = []
    for layer, q in zip((0, 2), c["queries"]):
        kv = PagedKV.from_vllm(c["caches"][layer], D)
        out = torch.full_like(q, float("nan"))
        fused_decode_attention(q, kv.key, kv.value, c["table"], c["seq_lens"], out, D**-0.5,
                               slot=c["slot"], park_ids=c["park_ids"],
                               park_start=c["park_start"], mass=mass, peak=peak,
                               num_splits=num_splits, rescale=rescale)
        outs.append(out)
        assert hq == q.shape[1]
    return outs, mass, peak


def run_reference(c):
    mass = peak = None
    outs = []
    for layer, q in zip((0, 2), c["queries"]):
        kv = PagedKV.from_vllm(c["caches"][layer], D)
        out, m, p = reference.fused_decode_attention(
            q, kv.key, kv.value, c["table"], c["seq_lens"], D**-0.5, c["slot"], c["park_ids"],
            c["park_start"], num_slots=len(PARKED), nb_stats=c["nb"])
        outs.append(out)
        mass = m if mass is None else mass + m
        peak = p if peak is None else torch.maximum(peak, p)
    return outs, mass, peak


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("block_size,group", [(16, 1), (16, 4), (32, 8)])
def test_kernel_equals_reference_on_vllm_layouts(layout, block_size, group, dtype, tol, device):
    c = build(layout, dtype, block_size, group, device)
    outs, mass, peak = run_kernel(c)
    want_outs, want_mass, want_peak = run_reference(c)
    for got, want in zip(outs, want_outs):  # the padding row's output: zeros, never NaN
        tol.close(got, want)
    tol.close(mass, want_mass)
    tol.close(peak, want_peak)
    # independent of the twin: dense SDPA on the same half-precision values (first layer)
    kv = PagedKV.from_vllm(c["caches"][0], D)
    for r, n in enumerate(LENS):
        if n == 0:
            continue
        k, v = (x.float().repeat_interleave(group, 1).transpose(0, 1)
                for x in kv.gather(c["table"][r], n))
        q = c["queries"][0][r].float()[:, None, :]
        tol.close(outs[0][r].float(), F.scaled_dot_product_attention(q, k, v)[:, 0],
                  atol=tol.out_atol, rtol=tol.out_rtol)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_statistics_are_the_softmax_mass_per_block(num_splits, device):
    """Without the twin: a scored row's attended blocks hold Σ_layers Σ_group = 2·G per KV head,
    the peak never exceeds 1, unscored slots and the tail past a row stay 0."""
    group = 4
    c = build("LBHNC", torch.float32, 16, group, device)
    _, mass, peak = run_kernel(c, num_splits=num_splits)
    for n, s in zip(LENS, SLOTS):
        if s < 0:
            continue
        nb = -(-n // 16)
        torch.testing.assert_close(mass[s, :, :nb].sum(-1), torch.full((HKV,), 2.0 * group,
                                                                       device=mass.device))
        assert bool((peak[s, :, :nb] <= 1 + 1e-6).all()) and bool((peak[s, :, :nb] > 0).all())
        end = nb + PARKED[s]
        assert bool((mass[s, :, end:] == 0).all()) and bool((mass[s, :, nb:end] > 0).all())


def test_mutant_without_the_final_rescale_is_caught(device):
    """The side output left as the per-block partials (not rescaled by the final softmax max and
    denominator) must fail the comparison the test above makes."""
    c = build("LBHNC", torch.float32, 16, 4, device)
    _, mass, _ = run_kernel(c, rescale=False)
    _, want_mass, _ = run_reference(c)
    assert not torch.allclose(mass, want_mass, atol=1e-3, rtol=1e-3)


def test_statistics_off_writes_the_same_output(dtype, device):
    from vllm_kvevict.kernels.fused_decode import fused_decode_attention

    c = build("LBHNC", dtype, 16, 4, device)
    with_stats, _, _ = run_kernel(c)
    kv = PagedKV.from_vllm(c["caches"][0], D)
    out = torch.empty_like(c["queries"][0])
    fused_decode_attention(c["queries"][0], kv.key, kv.value, c["table"], c["seq_lens"], out,
                           D**-0.5)
    torch.testing.assert_close(out, with_stats[0], atol=0, rtol=0)
