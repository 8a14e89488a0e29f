"""vLLM 0.32's GPU KV caches, in every ``KVCacheLayout``, read through ``PagedKV.from_vllm``.

Per layout: several layers share one backing buffer (``vllm_layer_caches``, strided as vLLM
allocates them, so ``B*`` layouts really interleave the layers), the layer under test is
filled through ``reshape_and_cache_flash`` (the torch twin of vLLM's cache write) from dense
random K/V with a shuffled block table, partial last blocks and padding slots; everything
else (the other layers, unused blocks, block tails, table padding) is NaN. Every dispatch entry
point, on both backends, must equal the torch reference on a plain contiguous ``nhd`` cache
built directly from the dense K/V, and the dense math on the dense copies. A mutant reader (the
old ``[2, num_blocks, bs, Hkv, D]`` assumption) must not.

On CPU the Triton interpreter is slow: the torch backend covers every layout, Triton two.
"""

import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from vllm_kvevict.kernels import dispatch, reference
from vllm_kvevict.kernels.paged import VLLM_KV_LAYOUTS, PagedKV, vllm_layer_caches

GPU = torch.cuda.is_available()
LAYOUTS = tuple(VLLM_KV_LAYOUTS)
# layer-interleaved and token-major inside a block / head-outermost (the two most unlike LBHNC)
TRITON_LAYOUTS = LAYOUTS if GPU else ("BLNHC", "LHBNC")
NUM_LAYERS, LAYER = 3, 1  # the middle layer: poisoned neighbours on both sides
BS, HKV, GROUP = 16, 2, 2
D = 64 if GPU else 32
LENS = (37, 5, 16, 1)  # partial, short (< window), exactly one block, one token
WINDOW = 8


def fill(layout, dtype, device, seed=0):
    """One layer's cache written from dense K/V, everything it must not read NaN."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-n // BS) for n in LENS]
    max_blocks = max(need) + 1  # one padding column at least
    num_blocks = sum(need) + 3  # three never-used (poisoned) blocks
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.full((len(LENS), max_blocks), int(perm[-1]), dtype=torch.int32)  # padding
    dense, slots, nxt = [], [], 0
    for r, (n, nb) in enumerate(zip(LENS, need)):
        table[r, :nb] = perm[nxt: nxt + nb].to(torch.int32)
        nxt += nb
        t = torch.arange(n)
        slots.append(table[r, t // BS].long() * BS + t % BS)
        dense.append((torch.randn(n, HKV, D, generator=gen).to(dtype),
                      torch.randn(n, HKV, D, generator=gen).to(dtype)))
    keys = torch.cat([k for k, _ in dense])
    values = torch.cat([v for _, v in dense])
    slot_mapping = torch.cat(slots)
    # padding tokens (slot -1) of a batch must be skipped by the writer
    pad = torch.randn(3, HKV, D, generator=gen).to(dtype)
    keys, values = torch.cat([keys, pad]), torch.cat([values, pad])
    slot_mapping = torch.cat([slot_mapping, torch.full((3,), -1)])

    caches = vllm_layer_caches(NUM_LAYERS, num_blocks, HKV, BS, D, layout, dtype, device)
    for cache in caches:
        cache.fill_(float("nan"))
    reference.reshape_and_cache_flash(keys.to(device), values.to(device), caches[LAYER],
                                      slot_mapping.to(device))

    # the plain contiguous nhd cache, written by direct indexing (not by the code under test)
    key_nhd = torch.full((num_blocks, BS, HKV, D), float("nan"), dtype=dtype)
    value_nhd = key_nhd.clone()
    ok = slot_mapping >= 0
    blocks, rows = slot_mapping[ok] // BS, slot_mapping[ok] % BS
    key_nhd[blocks, rows], value_nhd[blocks, rows] = keys[ok], values[ok]

    hq = HKV * GROUP
    o_proj = torch.randn(48, hq * D, generator=gen) / 8
    return SimpleNamespace(
        caches=caches, num_blocks=num_blocks,
        nhd=PagedKV(key_nhd.to(device), value_nhd.to(device)),
        dense=[(k.to(device), v.to(device)) for k, v in dense],
        table=table.to(device), seq_lens=torch.tensor(LENS, dtype=torch.int32, device=device),
        query=torch.randn(len(LENS), hq, D, generator=gen).to(device, dtype),
        q_window=torch.randn(len(LENS), hq, WINDOW, D, generator=gen).to(device, dtype),
        gram=reference.wo_gram(o_proj, hq).to(device), o_proj=o_proj.to(device),
        block_ids=table[0, :3].to(device),
        counts=torch.tensor([BS, BS, LENS[0] - 2 * BS], dtype=torch.int32, device=device),
    )


def statistics(c, kv, backend):
    """Every dispatch entry point that reads the cache, as one flat dict of tensors."""
    args = (c.table, c.seq_lens)
    if backend == "triton":
        from vllm_kvevict.kernels.fused_decode import fused_decode_attention

        out = torch.empty_like(c.query)
        fused_decode_attention(c.query, kv.key, kv.value, *args, out, D**-0.5)
    else:
        out = reference.fused_decode_attention(c.query, kv.key, kv.value, *args, D**-0.5)[0]
    win = dispatch.window_attention(c.q_window, kv, *args, backend=backend)
    kmin, kmax = dispatch.key_bounds(kv, *args, backend=backend)
    bmin, bmax = dispatch.block_key_bounds(kv, c.block_ids, c.counts, backend=backend)
    out = {"decode.output": out}
    out |= {"window.probs": win.probs, "window.block_sum": win.block_sum,
            "key_bounds.min": kmin, "key_bounds.max": kmax,
            "block_key_bounds.min": bmin, "block_key_bounds.max": bmax,
            "value_proj_norm": dispatch.value_proj_norm(c.gram, kv, *args, backend=backend)}
    return out


def wrong_reader(cache):
    """The old assumption: the layer cache is ``[2, num_blocks, bs, Hkv, D]`` (K then V)."""
    nb, hkv, bs, two_d = cache.shape
    kv = cache.reshape(2, nb, bs, hkv, two_d // 2)
    return PagedKV(kv[0], kv[1])


def differs(a, b, tol):
    return not torch.allclose(a.float(), b.float(), atol=tol.out_atol, rtol=tol.out_rtol,
                              equal_nan=True)


@pytest.mark.parametrize("layout,backend", [pytest.param(lay, "torch", id=f"{lay}-torch")
                                            for lay in LAYOUTS]
                         + [pytest.param(lay, "triton", id=f"{lay}-triton") for lay in TRITON_LAYOUTS])
def test_entry_points_read_every_vllm_layout(layout, backend, dtype, tol, device, request):
    if backend == "triton":
        request.getfixturevalue("needs_triton")
    c = fill(layout, dtype, device)
    kv = PagedKV.from_vllm(c.caches[LAYER], D)
    got = statistics(c, kv, backend)
    want = statistics(c, c.nhd, "torch")  # the references on the plain contiguous nhd cache
    for name, value in got.items():
        assert not bool(value.isnan().any()), f"{name}: read a poisoned (NaN) slot"
        if "bounds" in name:  # min/max are exact
            assert torch.equal(value, want[name]), name
        else:
            tol.close(value, want[name], msg=lambda m, name=name: f"{name}: {m}")

    # the dense math on the dense copies (no paging at all)
    scale = D**-0.5
    for r, (k, v) in enumerate(c.dense):
        n = LENS[r]
        k32, v32 = (x.float().repeat_interleave(GROUP, 1).transpose(0, 1) for x in (k, v))
        q = c.query[r].float()[:, None]  # [Hq, 1, D]
        tol.close(got["decode.output"][r].float(), F.scaled_dot_product_attention(q, k32, v32)[:, 0],
                  atol=tol.out_atol, rtol=tol.out_rtol)
        nb = -(-n // BS)
        padded = torch.full((nb * BS, HKV, D), float("inf"), device=k.device, dtype=k.dtype)
        padded[:n] = k
        assert torch.equal(got["key_bounds.min"][r, :nb], padded.view(nb, BS, HKV, D).amin(1))
        w_heads = c.o_proj.view(-1, HKV * GROUP, D)
        explicit = torch.einsum("hnd,xhd->hnx", v32, w_heads).norm(dim=-1)  # [Hq, n]
        tol.close(got["value_proj_norm"][r, :, :n], explicit, atol=1e-4, rtol=1e-4)

    # the mutant reader must be caught: its statistics differ from the truth
    bad = wrong_reader(c.caches[LAYER])
    with warnings.catch_warnings():  # it reads NaN poison: the interpreter's numpy warns
        warnings.simplefilter("ignore", RuntimeWarning)
        bad_dec = reference.fused_decode_attention(c.query, bad.key, bad.value, c.table,
                                                   c.seq_lens, scale)[0]
        bad_min, _ = dispatch.key_bounds(bad, c.table, c.seq_lens, backend=backend)
    assert differs(bad_dec, want["decode.output"], tol)
    assert differs(bad_min, want["key_bounds.min"], tol)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layers_share_one_buffer_without_overlap(layout):
    """Each layer's view is its own: written layer by layer, each gathers back exactly its K/V."""
    nb, dtype = 6, torch.float32
    caches = vllm_layer_caches(NUM_LAYERS, nb, HKV, BS, D, layout, dtype)
    assert all(c.shape == (nb, HKV, BS, 2 * D) for c in caches)
    assert len({c.untyped_storage().data_ptr() for c in caches}) == 1  # one buffer
    step = caches[1].data_ptr() - caches[0].data_ptr()
    if layout.startswith("B"):  # the layer axis sits inside the block axis: layers interleave
        assert 0 < step < caches[0].stride(0) * caches[0].element_size()
    for cache in caches:
        cache.fill_(float("nan"))
    gen = torch.Generator().manual_seed(3)
    table = torch.randperm(nb, generator=gen)[:4]
    n = 3 * BS + 5
    slots = table[torch.arange(n) // BS] * BS + torch.arange(n) % BS
    data = [(torch.randn(n, HKV, D, generator=gen), torch.randn(n, HKV, D, generator=gen))
            for _ in caches]
    for cache, (k, v) in zip(caches, data):
        reference.reshape_and_cache_flash(k, v, cache, slots)
    for cache, (k, v) in zip(caches, data):
        got_k, got_v = PagedKV.from_vllm(cache, D).gather(table, n)
        assert torch.equal(got_k, k) and torch.equal(got_v, v)
    # exactly the written slots hold numbers: nothing was written twice or outside
    written = sum(int((~c.isnan()).sum()) for c in caches)
    assert written == NUM_LAYERS * n * HKV * 2 * D
