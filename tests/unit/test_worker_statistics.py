"""The worker's per-layer statistics (through ``kernels.dispatch``; the torch path on CPU) equal
the dense statistics of ``vllm_kvevict.kernels.reference`` on the request's resident tokens — read from the
CPU backend's cache (plain and transposed keys) and from vLLM 0.32's GPU caches in every
``KVCacheLayout``, allocated by vLLM's own allocation code and written by a torch twin of the
GPU backends' cache write."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from vllm_kvevict.kernels import reference as R
from vllm_kvevict.kernels.paged import cpu_kv_view
from worker_helpers import uploaded

from vllm_kvevict.adapter.scoring_batch import ScoredRequest
from vllm_kvevict.adapter.statistics import measured
from vllm_kvevict.adapter.worker import WorkerEviction
from vllm_kvevict.policies.base import STATISTICS, Schedule

HKV, D, WINDOW = 2, 16, 8
POSITIONS = [0, 1, 3, 4, 5]  # block 2 evicted: positions have a gap
PARKED = [False, False, True, False, False]
BLOCK_IDS = [7, 2, 9, 4, 11]
NUM_BLOCKS, NUM_LAYERS, LAYER = 12, 3, "model.layers.1.self_attn.attn"
GPU_LAYOUTS = ("LBHNC", "LBNHC", "LHBNC", "BLHNC", "BLNHC", "BHLNC")


def vllm_gpu_caches(layout: str, bs: int) -> dict[str, torch.Tensor]:
    """Per-layer caches made by vLLM's own code: the KV-cache config from
    ``get_kv_cache_config_from_groups`` (0.32: ``kv_cache_utils``, 0.33: ``kv_cache_planning``)
    and the views from ``allocate_kv_cache`` (what
    ``GPUModelRunner.initialize_kv_cache_tensors`` binds to each layer), every slot NaN."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec
    from vllm.v1.kv_cache_layout import KVCacheLayout
    from vllm.v1.worker.utils import allocate_kv_cache

    from vllm_kvevict.adapter.startup_checks import kv_planning_module

    get_kv_cache_config_from_groups = kv_planning_module().get_kv_cache_config_from_groups
    kv_layout = KVCacheLayout[layout]
    spec = FullAttentionSpec(block_size=bs, num_kv_heads=HKV, head_size=D, dtype=torch.float32)
    cache_config = SimpleNamespace(get_resolved_kv_cache_layout=lambda: kv_layout,
                                   num_gpu_blocks_override=None,
                                   prefix_cache_retention_interval=None)
    vllm_config = SimpleNamespace(cache_config=cache_config,
                                  attention_config=SimpleNamespace(hisparse_config=None))
    names = [f"model.layers.{i}.self_attn.attn" for i in range(NUM_LAYERS)]
    config = get_kv_cache_config_from_groups(
        vllm_config, [KVCacheGroupSpec(names, spec)], spec.page_size_bytes * NUM_LAYERS * NUM_BLOCKS)
    caches = allocate_kv_cache(config, torch.device("cpu"), kv_layout)
    for cache in caches.values():
        cache.fill_(float("nan"))
    return caches


def _scored_layer(bs, group, phase, layout, packed=False, seed=0, others=(), others_phase="decode"):
    """A KV cache holding one request's resident blocks, the step's query/key, and a worker.

    ``layout``: ``cpu``/``cpu_t`` (vLLM's CPU backend, keys plain / transposed per block) or a
    ``KVCacheLayout`` name (the GPU backends' cache). Unread slots hold NaN, so reading one
    poisons the result; on GPU layouts the other layers hold other data in the same buffer.
    """
    from vllm_kvevict.kernels.reference import reshape_and_cache_flash

    gen = torch.Generator().manual_seed(seed)
    hq = HKV * group
    n_last = bs // 2 + 1 if phase == "decode" else bs - 1
    tokens_per_block = [bs] * (len(POSITIONS) - 1) + [n_last]
    gpu = layout in GPU_LAYOUTS
    if gpu:
        caches = vllm_gpu_caches(layout, bs)
        raw = caches[LAYER]
    else:
        raw = torch.full((NUM_BLOCKS, HKV, bs, 2 * D), float("nan"))
        tiles = cpu_kv_view(raw)
    keys, values, positions, slots = [], [], [], []
    for p, bid, n in zip(POSITIONS, BLOCK_IDS, tokens_per_block):
        for o in range(n):
            k, v = torch.randn(HKV, D, generator=gen), torch.randn(HKV, D, generator=gen)
            if gpu:
                slots.append(bid * bs + o)
            elif layout == "cpu_t":
                tiles[bid, :, :bs].reshape(HKV, D, bs)[:, :, o] = k
            else:
                tiles[bid, :, o] = k
            if not gpu:
                tiles[bid, :, bs + o] = v
            keys.append(k)
            values.append(v)
            positions.append(p * bs + o)
    if gpu:  # the backends' cache write, then other data into the other layers' pages
        slot_mapping = torch.tensor([-1, *slots, -1])  # padding slots are skipped
        pad = torch.full((1, HKV, D), 1e4)
        reshape_and_cache_flash(torch.cat([pad, torch.stack(keys), pad]),
                                torch.cat([pad, torch.stack(values), pad]), raw, slot_mapping)
        for name, other in caches.items():
            if name != LAYER:
                noise = torch.randn(len(slots), HKV, D, generator=gen)
                reshape_and_cache_flash(noise, -noise, other, torch.tensor(slots))
    n_query = 1 if phase == "decode" else bs + n_last  # a prefill chunk spanning two blocks
    q_start, t = 2, len(keys)
    query = torch.randn(q_start + n_query + 1, hq, D, generator=gen)
    key = torch.randn(q_start + n_query + 1, HKV, D, generator=gen)
    key[q_start: q_start + n_query] = torch.stack(keys[t - n_query:])
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    weight = torch.randn(24, hq * D, generator=gen)
    o_proj = SimpleNamespace(weight=weight, quant_method=UnquantizedLinearMethod())
    if packed == "cpu":  # vLLM's CPU backend packs the weight for oneDNN, leaves `weight` empty
        o_proj = SimpleNamespace(
            weight=torch.empty(0), input_size_per_partition=hq * D, params_dtype=torch.float32,
            quant_method=SimpleNamespace(apply=lambda layer, x: x @ weight.t()),
        )
    elif packed == "fp8":  # a quantised method: fp8 codes stored transposed [in, out] + scale
        scale = weight.abs().amax() / 448
        codes = (weight / scale).to(torch.float8_e4m3fn).t().contiguous()
        weight = codes.t().float() * scale  # what the layer really multiplies by
        o_proj = SimpleNamespace(
            weight=codes, input_size_per_partition=hq * D, params_dtype=torch.float32,
            quant_method=SimpleNamespace(apply=lambda layer, x: x @ (codes.float() * scale)),
        )
    def get_submodule(path):
        if packed == "unnamed":  # a model whose output projection has none of the known names
            raise AttributeError(path)
        return o_proj

    worker = WorkerEviction(SimpleNamespace(
        get_model=lambda: SimpleNamespace(get_submodule=get_submodule)))
    worker.readers = {LAYER: "gpu" if gpu else "cpu"}
    sr = ScoredRequest(
        req_id="r", task=SimpleNamespace(phase=phase),
        policy=SimpleNamespace(needs=STATISTICS, schedule=Schedule(window=WINDOW)),
        q_start=q_start, q_end=q_start + n_query, block_ids=torch.tensor(BLOCK_IDS),
        positions=torch.tensor(POSITIONS), parked=torch.tensor(PARKED),
        tokens_per_block=tokens_per_block, query_positions=torch.tensor(positions[t - n_query:]),
        layers={},
    )
    # ``others``: more requests of the same step over a prefix of the same blocks, each with
    # its own newest query (index into the step's tokens): the statistics are batched
    extra = [ScoredRequest(
        req_id=f"r{i}", task=SimpleNamespace(phase=others_phase), policy=sr.policy, q_start=q,
        q_end=q + 1,
        block_ids=torch.tensor(BLOCK_IDS[:nb]), positions=torch.arange(nb),
        parked=torch.zeros(nb, dtype=torch.bool), tokens_per_block=[bs] * (nb - 1) + [last],
        query_positions=torch.tensor([0]), layers={}) for i, (q, nb, last) in enumerate(others)]
    worker.scored = [sr, *extra]
    for one in worker.scored:  # as _resolve_scored sets it (no backend of ours: hooks measure)
        one.set_hooked(s.name for s in measured(one.policy.needs, one.task.phase))
        uploaded(one)  # as the step's upload before the forward
    layer = SimpleNamespace(impl=SimpleNamespace(num_heads=hq, scale=D**-0.5, head_size=D))
    worker._measure_layer(1, LAYER, layer, query.view(len(query), -1), key.view(len(key), -1), raw)
    dense = SimpleNamespace(keys=torch.stack(keys), values=torch.stack(values),
                            positions=torch.tensor(positions), query=query, o_proj=weight)
    return (sr, *extra) if others else sr, dense


@pytest.mark.parametrize("layout", ["cpu", "cpu_t", *GPU_LAYOUTS])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("bs", [4, 16])
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_worker_statistics_equal_dense_stats(phase, bs, group, layout):
    sr, dense = _scored_layer(bs, group, phase, layout)
    got = {k: v[0] for k, v in sr.layers.items()}
    scale = D**-0.5
    close = lambda a, b: torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)  # noqa: E731
    newest = dense.query[sr.q_end - 1]
    # decode statistics: the attended (kept) tokens in the softmax, the parked block (resident
    # index 2, full) scored against it; per block, then Σ / max over each KV group's heads
    parked = slice(2 * bs, 3 * bs)
    kept = torch.cat([dense.keys[: 2 * bs], dense.keys[3 * bs:]])
    blocks = R.dense_block_attention(newest, kept, bs, scale, dense.keys[parked])
    blocks = blocks[:, [0, 1, 4, 2, 3]].view(HKV, group, 5)  # back to resident order
    close(got["decode_mass"], blocks.sum(1))
    close(got["decode_peak"], blocks.amax(1))
    probs = R.dense_decode_attention(newest, kept, scale)  # the attended row sums to 1
    close(got["decode_mass"][:, [0, 1, 3, 4]].sum(1), torch.full((HKV,), float(group)))
    assert torch.allclose(got["decode_mass"][:, 0], probs[:, :bs].sum(1).view(HKV, group).sum(1))
    assert not ({"query", "key_min", "key_max"} & got.keys())
    if phase == "decode":
        assert "window_attn" not in got and "value_proj_norm" not in got  # prefill only
        return
    close(got["value_proj_norm"], R.dense_value_proj_norm(dense.values, R.wo_gram(dense.o_proj, HKV * group)))
    w = min(WINDOW, sr.q_end - sr.q_start)  # a short last chunk is a short window
    q_window = dense.query[sr.q_end - w: sr.q_end]
    close(got["window_attn"], R.dense_window_attention(q_window, dense.keys, scale))
    # causal by original position: query i sees exactly the keys at positions <= its own
    query_pos = sr.query_positions[-w:]
    visible = dense.positions[None, :] <= query_pos[:, None]  # [W, T]
    assert bool((got["window_attn"] > 0).eq(visible).all())


def test_value_norms_from_a_packed_o_proj_weight():
    """The CPU backend drops ``o_proj.weight`` after packing it: W_O is read back through the
    layer's own GEMM, giving the same norms as the plain weight."""
    plain, _ = _scored_layer(16, 3, "prefill", "cpu")
    packed, _ = _scored_layer(16, 3, "prefill", "cpu", packed="cpu")
    assert bool(plain.layers["value_proj_norm"][0].gt(0).all())
    assert torch.equal(packed.layers["value_proj_norm"][0], plain.layers["value_proj_norm"][0])


def test_value_norms_from_a_quantised_o_proj():
    """An FP8 ``o_proj`` stores transposed codes and a scale: read as a plain weight they are
    the wrong shape and values; the norms must use the dequantised weight the layer applies."""
    sr, dense = _scored_layer(16, 3, "prefill", "LBNHC", packed="fp8")
    want = R.dense_value_proj_norm(dense.values, R.wo_gram(dense.o_proj, HKV * 3))
    torch.testing.assert_close(sr.layers["value_proj_norm"][0], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", GPU_LAYOUTS)
def test_old_readers_of_a_gpu_cache_fail(layout, monkeypatch):
    """Mutants: reading a GPU cache the way the worker did before (the CPU backend's tile
    view for any 4-D cache, or a ``[2, num_blocks, bs, Hkv, D]`` K/V pair) must not pass."""
    from vllm_kvevict.kernels.paged import PagedKV

    from vllm_kvevict.adapter import worker as W
    from vllm_kvevict.adapter.layer_hooks import KeyLayoutError

    sr, dense = _scored_layer(16, 1, "decode", layout)
    want = sr.layers["decode_mass"][0]
    as_cpu = lambda self, kv, key, reader, d: W.WorkerEviction._paged_kv(self, kv, key, "cpu", d)  # noqa: E731
    as_pair = lambda self, kv, key, reader, d: PagedKV(  # noqa: E731
        *kv.reshape(2, kv.shape[0], kv.shape[2], kv.shape[1], d).unbind(0))
    for mutant in (as_cpu, as_pair):
        monkeypatch.setattr(W.WorkerEviction, "_paged_kv", mutant)
        try:
            got, _ = _scored_layer(16, 1, "decode", layout)
        except (KeyLayoutError, ValueError, RuntimeError):
            continue  # refused: also a failure of the mutant
        assert not torch.allclose(got.layers["decode_mass"][0], want, equal_nan=True)


@pytest.mark.parametrize("layout", GPU_LAYOUTS)
def test_kernel_layout_replica_equals_vllm_allocation(layout):
    """``kernels.paged.vllm_layer_caches`` (what tests/kernels and gpu_check.sh use on a GPU
    without vLLM) has exactly the shapes and strides of vLLM's own allocation."""
    from vllm.v1.kv_cache_layout import KVCacheLayout
    from vllm_kvevict.kernels.paged import VLLM_KV_LAYOUTS, vllm_layer_caches

    assert VLLM_KV_LAYOUTS == {m.name: m.value for m in KVCacheLayout}
    real = vllm_gpu_caches(layout, 16)
    replica = vllm_layer_caches(NUM_LAYERS, NUM_BLOCKS, HKV, 16, D, layout, torch.float32)
    for (name, cache), mine in zip(sorted(real.items()), replica):
        assert cache.shape == mine.shape and cache.stride() == mine.stride(), name
        assert cache.storage_offset() == mine.storage_offset(), name


def test_an_unnamed_output_projection_is_not_measured_rather_than_failing_the_step():
    sr, _ = _scored_layer(16, 1, "prefill", "LBNHC", packed="unnamed")
    assert "value_proj_norm" not in sr.layers and "decode_mass" in sr.layers


@pytest.mark.parametrize("layout", ["cpu", "LBNHC"])
def test_requests_of_one_step_are_measured_together_as_alone(layout, monkeypatch):
    """One launch of each prefill statistic (window attention with padded windows of
    different lengths, value norms) for all scored requests (rows of different lengths,
    padded block table) gives each request what it gets in a smaller batch or alone; so does
    the per-request decode twin."""
    from vllm_kvevict.kernels import dispatch

    calls = []
    for name in ("value_proj_norm", "window_attention"):
        real = getattr(dispatch, name)
        monkeypatch.setattr(dispatch, name, lambda *a, _real=real, _n=name, **k: (
            calls.append(_n), _real(*a, **k))[1])
    others = [(0, 2, 5), (1, 3, 16), (0, 1, 1)]  # (newest query index, blocks, tokens in last)
    (first, *rest), _ = _scored_layer(16, 3, "prefill", layout, others=others,
                                      others_phase="prefill")
    assert sorted(calls) == ["value_proj_norm", "window_attention"]  # 4 requests, one each
    for i, sr in enumerate(rest):
        (_, alone), _ = _scored_layer(16, 3, "prefill", layout, others=[others[i]],
                                      others_phase="prefill")
        assert sr.layers.keys() == alone.layers.keys()
        for stat in sr.layers:
            assert torch.equal(sr.layers[stat][0], alone.layers[stat][0]), stat
    solo, _ = _scored_layer(16, 3, "prefill", layout)
    for stat in first.layers:
        assert torch.equal(first.layers[stat][0], solo.layers[stat][0]), stat


def test_a_batch_mixes_requests_with_and_without_their_own_window():
    """A middle chunk scored by its question probe measures no window of its own (window 0)
    but shares the value-norm batch with requests that do: the batch pads its row (length 0)
    instead of failing."""
    from vllm_kvevict.adapter.scoring_batch import ScoringBatch
    from vllm_kvevict.adapter.statistics import PROBE_WINDOW
    from vllm_kvevict.policies.base import VALUE_PROJ_NORM, WINDOW_ATTN

    def request(name, hooked):
        sr = ScoredRequest(
            req_id=name, task=SimpleNamespace(phase="prefill"),
            policy=SimpleNamespace(needs=STATISTICS, schedule=Schedule(window=4)), q_start=0, q_end=8,
            block_ids=torch.tensor([3, 5]), positions=torch.arange(2),
            parked=torch.zeros(2, dtype=torch.bool), tokens_per_block=[4, 4],
            query_positions=torch.arange(8), layers={})
        sr.set_hooked(hooked)
        return uploaded(sr)

    own = request("own", {WINDOW_ATTN, VALUE_PROJ_NORM})
    probed = request("probed", {PROBE_WINDOW, VALUE_PROJ_NORM})
    assert (own.window, probed.window) == (4, 0)
    batch = ScoringBatch.of((own, probed))
    assert batch.window_lens.tolist() == [4, 0]
    assert batch.window_index[0].tolist() == [4, 5, 6, 7]
    assert batch.seq_lens.tolist() == [8, 8]
