"""The plugin's attention backend against vLLM 0.32's own Triton attention, with vLLM's real
classes: the metadata builders built from a real engine config, ``CommonAttentionMetadata``
batches as the runner makes them (decode rows first), per-layer caches strided as vLLM
allocates them, and vLLM's own ``TritonAttentionImpl.forward`` / unified attention kernel as
the reference — on CPU all of it under ``TRITON_INTERPRET=1`` (vLLM's Triton modules are
re-imported with Triton enabled for this module), on a GPU natively.

The backend must (1) equal vLLM's Triton backend on the same batch — decode rows through the
plugin's kernel, the prefill part through vLLM's — within the float32 tolerance; (2) write the
decode statistics of the flagged rows, equal to the torch twin, into the persistent buffers;
(3) keep every buffer a captured CUDA graph reads at one address across steps.
"""

from __future__ import annotations

import importlib
import os
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.usefixtures("needs_triton")

GPU = torch.cuda.is_available()
BS = 32  # vLLM-CPU needs multiples of 32; one of the kernel's block sizes
_RELOAD = ("vllm.triton_utils", "vllm.v1.attention.ops.triton_unified_attention",
           "vllm.v1.attention.backends.triton_attn", "vllm_kvevict.backend.attention")


@pytest.fixture(scope="module")
def vllm_triton():
    """vLLM's Triton kernels as real (interpreted) kernels on CPU, restored afterwards."""
    if GPU:
        yield
        return
    import vllm.triton_utils.importing as importing

    before_env, before = os.environ.get("TRITON_INTERPRET"), importing.HAS_TRITON
    os.environ["TRITON_INTERPRET"] = "1"
    importing.HAS_TRITON = True
    try:
        for name in _RELOAD:
            importlib.reload(importlib.import_module(name))
        yield
    finally:
        importing.HAS_TRITON = before
        for name in _RELOAD:
            importlib.reload(importlib.import_module(name))
        if before_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before_env


@pytest.fixture(scope="module")
def engine_config():
    """A real ``VllmConfig`` (SmolLM2-135M: 9 query heads, 3 KV heads, head size 64)."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_kvevict.models import model_path

    args = EngineArgs(model=str(model_path("smollm2")), block_size=BS, max_model_len=512,
                      max_num_seqs=8, dtype="float32")
    return args.create_engine_config()


def _builders(vllm_config, device):
    from vllm.v1.attention.backends.triton_attn import TritonAttentionMetadataBuilder
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_kvevict.backend.attention import EvictionAttentionMetadataBuilder

    mc = vllm_config.model_config
    spec = FullAttentionSpec(block_size=BS, num_kv_heads=mc.get_total_num_kv_heads(),
                             head_size=mc.get_head_size(), dtype=torch.float32)
    return (TritonAttentionMetadataBuilder(spec, ["l0"], vllm_config, device),
            EvictionAttentionMetadataBuilder(spec, ["l0"], vllm_config, device))


#: (query tokens, tokens in the cache after this step) per row, decode rows first as the
#: builder's reorder_batch_threshold = 1 makes vLLM order them; a 1-token chunk is a decode
MIXED = [(1, 70), (1, 33), (1, 1), (5, 40), (3, 3)]
DECODES = [(1, 70), (1, 33), (1, 96), (1, 5)]
PREFILLS = [(5, 40), (3, 3)]


def _batch(rows, hkv, d, layout, device, seed=0):
    """Caches, a common metadata, the step's queries and a layer for ``rows``."""
    from vllm.v1.attention.backend import CommonAttentionMetadata
    from vllm_kvevict.kernels.paged import vllm_layer_caches

    gen = torch.Generator().manual_seed(seed)
    need = [-(-n // BS) for _, n in rows]
    num_blocks = sum(need) + 4
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.zeros(len(rows), max(need) + 1, dtype=torch.int32)
    nxt = 0
    for r, nb in enumerate(need):
        table[r, :nb] = perm[nxt: nxt + nb].to(torch.int32)
        nxt += nb
    caches = vllm_layer_caches(2, num_blocks, hkv, BS, d, layout, torch.float32, device)
    layer_cache = caches[1]
    layer_cache.copy_(torch.randn(layer_cache.shape, generator=gen))
    caches[0].fill_(float("nan"))  # the other layer's pages: never read
    q_lens = torch.tensor([q for q, _ in rows], dtype=torch.int32)
    qsl = torch.zeros(len(rows) + 1, dtype=torch.int32)
    qsl[1:] = q_lens.cumsum(0)
    seq_lens = torch.tensor([n for _, n in rows], dtype=torch.int32)
    tokens = int(qsl[-1])
    cm = CommonAttentionMetadata(
        query_start_loc=qsl.to(device), query_start_loc_cpu=qsl, seq_lens=seq_lens.to(device),
        seq_lens_cpu_upper_bound=seq_lens, num_reqs=len(rows), num_actual_tokens=tokens,
        max_query_len=int(q_lens.max()), max_seq_len=int(seq_lens.max()),
        block_table_tensor=table.to(device),
        slot_mapping=torch.zeros(tokens, dtype=torch.int64, device=device),
    )
    return cm, layer_cache, gen, table


def _impls(vllm_config):
    from vllm.v1.attention.backends.triton_attn import TritonAttentionImpl

    from vllm_kvevict.backend.attention import EvictionAttentionImpl

    mc = vllm_config.model_config
    pc = vllm_config.parallel_config
    kwargs = dict(num_heads=mc.get_num_attention_heads(pc), head_size=mc.get_head_size(),
                  scale=mc.get_head_size() ** -0.5, num_kv_heads=mc.get_num_kv_heads(pc),
                  alibi_slopes=None, sliding_window=None, kv_cache_dtype="auto")
    layer = SimpleNamespace(_k_scale=torch.ones(1), _v_scale=torch.ones(1), _q_scale=torch.ones(1),
                            _k_scale_float=1.0, _v_scale_float=1.0)
    return TritonAttentionImpl(**kwargs), EvictionAttentionImpl(**kwargs), layer, kwargs


def _run(impl, layer, builder, cm, cache, query):
    md = builder.build(0, cm)
    out = torch.full_like(query, float("nan"))
    impl.forward(layer, query, None, None, cache, md, out)
    return out, md


@pytest.mark.parametrize("rows", [MIXED, DECODES, PREFILLS], ids=["mixed", "decode", "prefill"])
@pytest.mark.parametrize("layout", ["LBHNC", "BLNHC"])
def test_backend_equals_vllm_triton_attention(vllm_triton, engine_config, rows, layout, device):
    from vllm_kvevict.backend import buffers

    stock_builder, our_builder = _builders(engine_config, device)
    stock, ours, layer, kw = _impls(engine_config)
    cm, cache, gen, _ = _batch(rows, kw["num_kv_heads"], kw["head_size"], layout, device)
    query = torch.randn(cm.num_actual_tokens, kw["num_heads"], kw["head_size"], generator=gen
                        ).to(device)
    buffers.activate(None)
    want, _ = _run(stock, layer, stock_builder, cm, cache, query)
    got, md = _run(ours, layer, our_builder, cm, cache, query)
    decodes = sum(q == 1 for q, _ in rows)
    assert md.num_decodes == decodes and (md.prefill is None) == (decodes in (0, len(rows)))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    if decodes == 0:  # nothing for the plugin's kernel: vLLM's own path, bit for bit
        assert torch.equal(got, want)


def test_backend_writes_the_flagged_rows_statistics(vllm_triton, engine_config, device):
    """Rows 0, 1 and 3 of a mixed batch flagged, row 0 with two parked blocks (row 3 is a
    prefill row: the kernel serves decode rows only and must leave its slot alone); two
    layers accumulate; the twin gives the same Σ and max."""
    from vllm_kvevict.kernels import reference
    from vllm_kvevict.kernels.paged import PagedKV

    from vllm_kvevict.backend import buffers

    _, our_builder = _builders(engine_config, device)
    _, ours, layer, kw = _impls(engine_config)
    hq, hkv, d = kw["num_heads"], kw["num_kv_heads"], kw["head_size"]
    cm, cache, gen, table = _batch(MIXED, hkv, d, "LBNHC", device)
    parked = [int(b) for b in table[4, :1]] + [int(table[3, 1])]  # other rows' full blocks
    stats = buffers.DecodeStatBuffers(max_rows=8, max_slots=8, num_heads=hq, num_kv_heads=hkv,
                                      max_blocks=16, max_parked=8, device=device)
    buffers.activate(stats)
    try:
        stats.mass.fill_(123.0)  # stale values of an earlier step: prepare must zero them
        addresses = [t.data_ptr() for t in (stats.plan, stats.mass, stats.peak, *stats.partials)]
        stats.prepare([(0, parked), (1, []), (3, [])], num_rows=len(MIXED))
        queries = [torch.randn(cm.num_actual_tokens, hq, d, generator=gen).to(device)
                   for _ in range(2)]
        for q in queries:
            _run(ours, layer, our_builder, cm, cache, q)
        kv = PagedKV.from_vllm(cache, d)
        want_mass = want_peak = None
        slot = torch.tensor([0, 1, -1], dtype=torch.int32)
        start = torch.tensor([0, len(parked), len(parked)], dtype=torch.int32)
        for q in queries:
            _, m, p = reference.fused_decode_attention(
                q[:3], kv.key, kv.value, cm.block_table_tensor, cm.seq_lens, d**-0.5, slot,
                torch.tensor(parked, dtype=torch.int32), start, num_slots=2, nb_stats=16)
            want_mass = m if want_mass is None else want_mass + m
            want_peak = p if want_peak is None else torch.maximum(want_peak, p)
        torch.testing.assert_close(stats.mass[:2], want_mass, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stats.peak[:2], want_peak, atol=1e-5, rtol=1e-5)
        assert bool((stats.mass[2:len(MIXED)] == 0).all())  # unscored rows: zeroed, untouched
        n0 = -(-MIXED[0][1] // BS)
        torch.testing.assert_close(stats.mass[0, :, :n0].sum(-1),  # 2 layers x 3 heads per group
                                   torch.full((hkv,), 2.0 * hq / hkv, device=device))
        assert bool((stats.mass[0, :, n0: n0 + len(parked)] > 0).all())
        # a new step: rows flagged anew, nothing stale, every buffer at the same address
        stats.prepare([(2, [])], num_rows=len(MIXED))
        assert stats.slot[:4].tolist() == [-1, -1, 2, -1]
        assert bool((stats.mass[:len(MIXED)] == 0).all())
        assert addresses == [t.data_ptr() for t in (stats.plan, stats.mass, stats.peak,
                                                    *stats.partials)]
    finally:
        buffers.activate(None)


def test_builder_buffers_are_persistent_and_capture_is_all_decode(vllm_triton, engine_config,
                                                                 device):
    """What a FULL CUDA graph captures must be what later steps use: the split scratch and the
    statistics buffers are the same tensors in every step's metadata, and the capture batch
    (uniform single-token decode) is all the plugin's kernel (no prefill part)."""
    from vllm.v1.attention.backend import AttentionCGSupport

    from vllm_kvevict.backend import buffers
    from vllm_kvevict.backend.attention import EvictionAttentionMetadataBuilder

    assert EvictionAttentionMetadataBuilder._cudagraph_support == \
        AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    from vllm_kvevict.backend.attention import EvictionAttentionBackend as Backend

    # what the kernel lacks is declared, so vLLM refuses the backend for such layers
    assert not any(getattr(Backend, f"supports_{what}")() for what in (
        "sliding_window", "rswa", "sink", "mm_prefix", "alibi_sqrt", "non_causal"))
    assert Backend.supports_attn_type("decoder") and not Backend.supports_attn_type("encoder")
    assert Backend.supports_head_size(64) and not Backend.supports_head_size(512)
    _, builder = _builders(engine_config, device)
    assert builder.reorder_batch_threshold == 1
    stats = buffers.DecodeStatBuffers(max_rows=8, max_slots=8, num_heads=9, num_kv_heads=3,
                                      max_blocks=16, max_parked=4, device=device)
    buffers.activate(stats)
    try:
        first = builder.build(0, _batch(MIXED, 3, 64, "LBHNC", device)[0])
        second = builder.build(0, _batch(DECODES, 3, 64, "LBHNC", device, seed=1)[0])
        captured = builder.build_for_cudagraph_capture(_batch(DECODES, 3, 64, "LBHNC", device)[0])
        for md in (first, second, captured):
            assert md.stats is stats
            assert [t.data_ptr() for t in md.split_scratch] == \
                [t.data_ptr() for t in builder.split_scratch]
        assert captured.num_decodes == len(DECODES) and captured.prefill is None
        assert first.prefill.query_start_loc.tolist() == [0, 5, 8]
        assert first.prefill.seq_lens.tolist() == [40, 3]
    finally:
        buffers.activate(None)


def test_worst_case_buffers_and_no_allocation_on_the_decode_hot_path(vllm_triton, engine_config,
                                                                     device):
    """Everything the statistics need is made once, at its worst case (every one of
    ``max_num_seqs`` rows scored, ``max_model_len`` tokens each, the bin full), with its size
    known up front; a scored decode step — the flags upload, the metadata build, the
    attention of every layer, the worker's read — allocates no tensor."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    from vllm_kvevict.backend import buffers
    from vllm_kvevict.config import parse_config

    class Allocations(TorchDispatchMode):
        FACTORIES = {"empty", "empty_strided", "zeros", "ones", "full", "empty_like",
                     "zeros_like", "ones_like", "full_like", "new_empty", "new_zeros",
                     "new_full", "new_ones", "arange", "scalar_tensor", "clone"}

        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            # the Triton interpreter copies every kernel argument to numpy and back (CPU only;
            # a compiled launch allocates nothing): those are not the plugin's allocations
            interpreted = any("triton/runtime/interpreter" in frame.filename
                              for frame in traceback.extract_stack(limit=12))
            if func.overloadpacket.__name__ in self.FACTORIES and not interpreted:
                self.seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    config = parse_config({"policy": "h2o", "budget": 0.25, "recycle_bin_total_blocks": 8})
    mc, sc = engine_config.model_config, engine_config.scheduler_config
    stats = buffers.allocate(engine_config, config, device)  # what the load_model hook makes
    try:
        assert stats is None  # not selected for this config: nothing reserved
        engine_config.attention_config.backend_per_kind = {"full_attention": _custom()}
        stats = buffers.allocate(engine_config, config, device)
        rows, slots = buffers.max_batch_rows(engine_config), sc.max_num_seqs
        nb = -(-mc.max_model_len // BS)
        hq, hkv, d = 9, 3, 64
        assert stats.mass.shape == stats.peak.shape == (slots, hkv, nb)
        assert all(p.shape == (slots, nb, hq) for p in stats.partials)
        assert stats.park_ids.numel() == 8 and stats.slot.numel() == rows
        assert stats.bytes_per_request() == (2 * hkv * nb + 2 * nb * hq) * 4
        assert stats.nbytes >= slots * stats.bytes_per_request() + sum(
            t.numel() * 4 for t in stats.scratch)
        _, builder = _builders(engine_config, device)
        assert [t.data_ptr() for t in builder.split_scratch] == \
            [t.data_ptr() for t in stats.scratch]  # the reserved scratch, not a new one
        _, ours, layer, kw = _impls(engine_config)
        full = [(1, mc.max_model_len)] * slots  # every row decoding at max_model_len
        cm, cache, gen, table = _batch(full, hkv, d, "LBHNC", device)
        query = torch.randn(cm.num_actual_tokens, hq, d, generator=gen).to(device)
        out = torch.empty_like(query)
        columns = torch.arange(nb, device=device)
        scored = [(r, []) for r in range(slots)]
        with Allocations() as mode:
            stats.prepare(scored, num_rows=slots)
            md = builder.build(0, cm)
            for _ in range(2):  # two layers
                ours.forward(layer, query, None, None, cache, md, out)
            for r in range(slots):
                stats.read(r, columns)
        assert mode.seen == [], mode.seen
        # each row: 2 layers x 9 query heads of attention over its nb blocks
        assert stats.mass[:slots].sum((1, 2)).tolist() == pytest.approx([2.0 * hq] * slots,
                                                                        rel=1e-4)
    finally:
        buffers.activate(None)
        engine_config.attention_config.backend_per_kind = {}


def _custom():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vllm_kvevict.backend import register

    register()
    return AttentionBackendEnum.CUSTOM
