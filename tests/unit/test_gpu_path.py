"""The NVIDIA path, on CPU, through the same code and vLLM 0.32's own GPU classes.

Each test here guards one GPU hazard read from vLLM 0.32's sources and fails without its
guard: attention layers the statistics cannot read are refused at startup by name; Model
Runner V2 (vLLM's default wherever Triton runs) is pinned off; steps that measure attention
statistics never replay a full CUDA graph (no Python runs inside one); statistics that were
asked for and not measured are reported, never dropped silently; TP block scores are reduced
on the KV cache's device in one all-reduce. (The KV layouts: tests/unit/test_worker_statistics.py.)
"""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from worker_helpers import uploaded

from vllm_kvevict.adapter import scoring_batch
from vllm_kvevict.adapter import worker as W
from vllm_kvevict.adapter.startup_checks import (
    UnsupportedConfigError,
    check_attention_layers,
    check_engine_config,
)

BS, HQ, HKV, D = 16, 4, 2, 16


# -- startup refusals -----------------------------------------------------------------------
def _layer(backend="TRITON_ATTN", attn_type="decoder", kernel_block=BS, **impl_kwargs):
    """An attention layer as ``static_forward_context`` holds it, with vLLM's real impl."""
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend, FlashAttentionImpl
    from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend, TritonAttentionImpl

    classes = {"TRITON_ATTN": (TritonAttentionBackend, TritonAttentionImpl),
               "FLASH_ATTN": (FlashAttentionBackend, FlashAttentionImpl)}
    if backend in classes:
        backend_cls, impl_cls = classes[backend]
    else:  # backends whose modules need GPU-only packages here: name + defaults only
        backend_cls = SimpleNamespace(get_name=lambda: backend, is_mla=lambda: False)
        impl_cls = classes["TRITON_ATTN"][1]
    args = dict(num_heads=HQ, head_size=D, scale=D**-0.5, num_kv_heads=HKV, alibi_slopes=None,
                sliding_window=None, kv_cache_dtype="auto")
    args.update(impl_kwargs)
    return SimpleNamespace(attn_backend=backend_cls, impl=impl_cls(**args), attn_type=attn_type,
                           kv_cache=torch.zeros(4, HKV, kernel_block, 2 * D))


@pytest.mark.parametrize("backend", ["FLASH_ATTN", "FLASHINFER", "TRITON_ATTN"])
@pytest.mark.parametrize("layout", ["LBHNC", "LBNHC", "LHBNC", "BLHNC", "BLNHC", "BHLNC"])
def test_gpu_backends_and_layouts_are_read_as_gpu_caches(backend, layout):
    readers = check_attention_layers({"l0": _layer(backend), "l1": _layer(backend)}, layout, BS)
    assert readers == {"l0": "gpu", "l1": "gpu"}


@pytest.mark.parametrize("kwargs, named", [
    (dict(kv_cache_dtype="fp8"), "quantised KV cache (fp8)"),
    (dict(alibi_slopes=[0.5, 0.25, 0.125, 0.0625]), "ALiBi"),
    (dict(logits_soft_cap=30.0), "logit soft-capping"),
    (dict(sinks=torch.zeros(HQ)), "attention sinks"),
    (dict(sliding_window=128), "sliding-window"),
    (dict(attn_type="encoder_decoder"), "encoder_decoder attention layers"),
    (dict(kernel_block=BS // 2), f"kernel blocks of {BS // 2} tokens"),
    (dict(backend="FLEX_ATTENTION"), "attention backend FLEX_ATTENTION"),
])
def test_unreadable_attention_is_refused_by_name(kwargs, named):
    layer_kwargs = {k: kwargs.pop(k) for k in ("backend", "attn_type", "kernel_block") if k in kwargs}
    bad = _layer(**layer_kwargs, **kwargs)
    with pytest.raises(UnsupportedConfigError, match="kv_eviction cannot read") as err:
        check_attention_layers({"l0": _layer(), "l1": bad}, "LBNHC", BS)
    assert named in str(err.value)


@pytest.mark.parametrize("block_size, head_size, named", [
    (48, D, "--block-size 48"), (8, D, "--block-size 8"), (BS, 512, "head size 512 > 256")])
def test_what_the_triton_kernels_cannot_take_is_refused_at_startup(block_size, head_size, named):
    """vLLM's GPU backends accept any multiple of 16 (FLASH_ATTN, TRITON_ATTN) and head sizes
    up to 512 (FA4); the statistics kernels would raise mid-serving on those."""
    layer = _layer(kernel_block=block_size, head_size=head_size)
    layer.kv_cache = torch.zeros(4, HKV, block_size, 2 * head_size)
    with pytest.raises(UnsupportedConfigError, match=named):
        check_attention_layers({"l0": layer}, "LBNHC", block_size)


def test_cpu_backend_only_in_its_own_layout():
    cpu = _layer()
    cpu.attn_backend = SimpleNamespace(get_name=lambda: "CPU_ATTN", is_mla=lambda: False)
    assert check_attention_layers({"l0": cpu}, "LBHNC", BS) == {"l0": "cpu"}
    with pytest.raises(UnsupportedConfigError, match="layout LBNHC with CPU_ATTN"):
        check_attention_layers({"l0": cpu}, "LBNHC", BS)


def _engine_config(**cache):
    model = SimpleNamespace(uses_mrope=False, use_mla=cache.pop("use_mla", False))
    return SimpleNamespace(
        speculative_config=None, model_config=model,
        parallel_config=SimpleNamespace(pipeline_parallel_size=1, decode_context_parallel_size=1,
                                        enable_dbo=cache.get("dbo", False)),
        cache_config=SimpleNamespace(cache_dtype=cache.get("cache_dtype", "auto")),
        use_v2_model_runner=cache.get("v2", False),
    )


@pytest.mark.parametrize("field, named", [
    (dict(cache_dtype="fp8_e4m3"), "quantised KV cache --kv-cache-dtype fp8_e4m3"),
    (dict(use_mla=True), "MLA attention"),
    (dict(v2=True), "Model Runner V2"),
    (dict(dbo=True), "dual-batch overlap (--enable-dbo"),
])
def test_engine_config_refusals(field, named, monkeypatch):
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    check_engine_config(_engine_config())  # control: the same config without the feature
    with pytest.raises(UnsupportedConfigError, match="kv_eviction cannot run with") as err:
        check_engine_config(_engine_config(**field))
    assert named in str(err.value)


@pytest.fixture(scope="module")
def smollm2():
    from vllm_kvevict.models import model_path

    return str(model_path("smollm2"))


def _v2_on_a_gpu_node(monkeypatch, smollm2, additional_config):
    """vLLM's config as on an NVIDIA node, where Triton has a backend (``HAS_TRITON``): no
    VLLM_USE_V2_MODEL_RUNNER set, so vLLM 0.32 picks Model Runner V2 by default."""
    import vllm.config.vllm as config_module
    from vllm.engine.arg_utils import EngineArgs

    import vllm_kvevict

    vllm_kvevict.register()
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "unset-below")
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER")  # restored (absent) at teardown
    monkeypatch.setattr(config_module, "HAS_TRITON", True)
    args = EngineArgs(model=smollm2, block_size=32, max_model_len=2048,
                      additional_config=additional_config)
    return args.create_engine_config()


def test_model_runner_v2_is_pinned_off(monkeypatch, smollm2):
    stock = _v2_on_a_gpu_node(monkeypatch, smollm2, {})
    assert stock.use_v2_model_runner, "control: vLLM's default would be the V2 runner here"
    monkeypatch.undo()
    ours = _v2_on_a_gpu_node(monkeypatch, smollm2, {"kv_eviction": {"policy": "h2o"}})
    assert not ours.use_v2_model_runner
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"  # inherited by the worker processes


# -- CUDA graphs ----------------------------------------------------------------------------
def _dispatcher(mode_name: str):
    """vLLM's real dispatcher with the keys an NVIDIA engine captures for ``mode_name``."""
    from vllm.config import CompilationConfig, CompilationMode, CUDAGraphMode
    from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher

    mode = CUDAGraphMode[mode_name]
    compilation = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=mode,
                                    cudagraph_capture_sizes=[1, 2, 4, 8],
                                    use_inductor_graph_partition=False)
    compilation.set_splitting_ops_for_v1(all2all_backend="naive")  # attention split out
    compilation.max_cudagraph_capture_size = 8
    vllm_config = SimpleNamespace(compilation_config=compilation, num_speculative_tokens=0,
                                  lora_config=None, speculative_config=None,
                                  parallel_config=SimpleNamespace(data_parallel_size=1),
                                  scheduler_config=SimpleNamespace(max_num_seqs=8),
                                  model_config=SimpleNamespace(is_encoder_decoder=False))
    dispatcher = CudagraphDispatcher(vllm_config)
    dispatcher.initialize_cudagraph_keys(mode, uniform_decode_query_len=1)
    return dispatcher, vllm_config


def _runner(dispatcher, vllm_config, scored, group_lens=None):
    """Just what ``GPUModelRunner._determine_batch_execution_and_padding`` reads."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    runner = SimpleNamespace(
        _is_uniform_decode=GPUModelRunner._is_uniform_decode, uniform_decode_query_len=1,
        model_config=vllm_config.model_config, cudagraph_dispatcher=dispatcher,
        input_batch=SimpleNamespace(lora_id_to_lora_request={}),
        vllm_config=SimpleNamespace(parallel_config=vllm_config.parallel_config,
                                    observability_config=SimpleNamespace(cudagraph_metrics=False)),
    )
    ev = W.WorkerEviction(runner)
    ev.scored = scored
    ev.group_lens = group_lens
    runner.__dict__["_kvevict"] = ev
    return runner


def _scored(needs, phase="decode", in_backend=False):
    """A scored request as ``_resolve_scored`` leaves it; ``in_backend``: a decode row of the
    plugin's attention backend (its kernel measures the decode statistics)."""
    from vllm_kvevict.adapter.statistics import measured

    return SimpleNamespace(policy=SimpleNamespace(needs=frozenset(needs)),
                           task=SimpleNamespace(phase=phase), layers={},
                           hooked=frozenset(s.name for s in measured(needs, phase, in_backend)))


@pytest.mark.parametrize("mode, scoring_mode", [
    ("FULL_AND_PIECEWISE", "PIECEWISE"), ("FULL_DECODE_ONLY", "NONE"), ("FULL", "NONE"),
    ("PIECEWISE", "PIECEWISE"),
])
def test_steps_that_measure_never_replay_a_full_graph(mode, scoring_mode):
    """A uniform decode batch of 4 (what replays a FULL graph on NVIDIA): with a request that
    needs decode attention scored in this step it gets ``scoring_mode``; without one, or with a
    statistic-free policy (StreamingLLM), it keeps vLLM's choice."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_kvevict.adapter import install, scoring_cudagraph_mode

    install()
    dispatcher, vllm_config = _dispatcher(mode)
    decode = dict(num_tokens=4, num_reqs=4, num_scheduled_tokens_np=torch.ones(4).numpy(),
                  max_num_scheduled_tokens=1)
    step = GPUModelRunner._determine_batch_execution_and_padding
    stock = step(_runner(dispatcher, vllm_config, []), **decode)[0]
    assert stock.name == ("PIECEWISE" if mode == "PIECEWISE" else "FULL")
    assert step(_runner(dispatcher, vllm_config, [_scored(["decode_attn"])]), **decode)[0].name \
        == scoring_mode
    assert step(_runner(dispatcher, vllm_config, [_scored([])]), **decode)[0] == stock
    # the plugin's attention backend: every policy's decode scoring keeps the FULL graph
    from vllm_kvevict.policies import NONE, available_policies, get_policy

    for name in (p for p in available_policies() if p != NONE):
        scored = [_scored(get_policy(name, {}).needs, in_backend=True) for _ in range(4)]
        assert step(_runner(dispatcher, vllm_config, scored), **decode)[0] == stock, name
    # a windowed policy scoring at decode measures nothing in attention: graphs stay
    assert step(_runner(dispatcher, vllm_config, [_scored(["window_attn"])]), **decode)[0] == stock
    assert scoring_cudagraph_mode(vllm_config.compilation_config).name == scoring_mode
    assert "dispatch" not in vars(dispatcher)  # the dispatcher is left as vLLM made it


@pytest.mark.parametrize("mode, eager_mode", [
    ("FULL_AND_PIECEWISE", "PIECEWISE"), ("FULL_DECODE_ONLY", "NONE"), ("PIECEWISE", "PIECEWISE"),
])
def test_hybrid_steps_with_compaction_never_replay_a_full_graph(mode, eager_mode):
    """A hybrid model's full group attends over lengths its own metadata build supplies (a
    full graph would replay the shared, uncompacted ones): a step where some E > 0 gets no
    full graph even when nothing is scored; a step without compaction keeps vLLM's choice."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_kvevict.adapter import install

    install()
    dispatcher, vllm_config = _dispatcher(mode)
    decode = dict(num_tokens=4, num_reqs=4, num_scheduled_tokens_np=torch.ones(4).numpy(),
                  max_num_scheduled_tokens=1)
    step = GPUModelRunner._determine_batch_execution_and_padding
    lens = (torch.full((4,), 90, dtype=torch.int32), torch.full((4,), 90, dtype=torch.int32))
    stock = step(_runner(dispatcher, vllm_config, []), **decode)[0]
    assert step(_runner(dispatcher, vllm_config, [], group_lens=lens), **decode)[0].name == eager_mode
    assert stock.name == ("PIECEWISE" if mode == "PIECEWISE" else "FULL")


def test_hybrid_full_group_metadata_gets_its_own_lengths():
    """The full group's builder sees ``seq_lens − E`` (device lengths, CPU upper bound and
    maximum); the step's shared metadata, which the sliding-window groups copy, is unchanged;
    a step without compaction passes vLLM's metadata through as is."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    seq_lens = torch.tensor([700, 40, 0], dtype=torch.int32)  # 2 requests, 1 padded row
    shared = CommonAttentionMetadata(
        query_start_loc=torch.tensor([0, 1, 2, 2]), query_start_loc_cpu=torch.tensor([0, 1, 2, 2]),
        seq_lens=seq_lens, seq_lens_cpu_upper_bound=seq_lens.clone(), num_reqs=3,
        num_actual_tokens=2, max_query_len=1, max_seq_len=700,
        block_table_tensor=torch.zeros(3, 22, dtype=torch.int32),
        slot_mapping=torch.zeros(2, dtype=torch.int64),
    )
    built = []
    group = SimpleNamespace(build_metadata=lambda cm, ubatch_idx=0, **kw: built.append(cm) or cm)
    ev = W.WorkerEviction(runner=None)
    ev._wrap_metadata(group)
    ev._wrap_metadata(group)  # idempotent: wrapped once
    group.build_metadata(shared)
    assert built[-1] is shared
    compact = torch.tensor([700 - 512, 40, 0], dtype=torch.int32)
    ev.group_lens = (compact, compact.clone())
    cm = group.build_metadata(shared, 0)
    assert cm.seq_lens.tolist() == [188, 40, 0] and cm.seq_lens_cpu_upper_bound.tolist() == [188, 40, 0]
    assert cm.max_seq_len == 188 and cm.block_table_tensor is shared.block_table_tensor
    assert shared.seq_lens.tolist() == [700, 40, 0] and shared.max_seq_len == 700
    assert len(built) == 2


@pytest.mark.parametrize("level", ["O0", "O1", "O2", "O3"])
def test_scoring_mode_for_vllm_default_optimization_levels(level):
    """What the NVIDIA platform configures at each -O level (vLLM's own table) and the mode
    scoring steps then run in: never a full graph."""
    from vllm.config import CUDAGraphMode
    from vllm.config.vllm import OPTIMIZATION_LEVEL_TO_CONFIG, OptimizationLevel

    from vllm_kvevict.adapter import scoring_cudagraph_mode

    mode = OPTIMIZATION_LEVEL_TO_CONFIG[OptimizationLevel[level]]["compilation_config"][
        "cudagraph_mode"]
    scoring = scoring_cudagraph_mode(SimpleNamespace(cudagraph_mode=mode))
    assert not scoring.has_full_cudagraphs()
    assert scoring == (CUDAGraphMode.NONE if mode == CUDAGraphMode.NONE else CUDAGraphMode.PIECEWISE)


def test_a_full_only_mode_is_honoured_with_a_warning(caplog):
    from vllm.config import CUDAGraphMode

    from vllm_kvevict.adapter import log_cudagraph_plan

    with caplog.at_level(logging.INFO, logger="vllm_kvevict"):
        log_cudagraph_plan(SimpleNamespace(cudagraph_mode=CUDAGraphMode.FULL_DECODE_ONLY))
    assert "run eagerly" in caplog.text


# -- never silent ---------------------------------------------------------------------------
def _worker_after_a_step(layers_measured: bool):
    ev = W.WorkerEviction(SimpleNamespace(
        device=torch.device("cpu"), input_batch=SimpleNamespace(block_table=[SimpleNamespace(block_size=BS)]),
        model_config=SimpleNamespace(get_num_kv_heads=lambda _: HKV,
                                     get_num_attention_heads=lambda _: HQ), parallel_config=None))
    ev.layer_names = ["model.layers.0.attn", "model.layers.1.attn"]
    from vllm_kvevict.policies import get_policy

    sr = SimpleNamespace(req_id="r1", policy=get_policy("h2o", {}),
                         task=SimpleNamespace(phase="decode", generation=0, visual_spans=[],
                                              policy="h2o"),
                         positions=torch.arange(3), parked=torch.zeros(3, dtype=torch.bool),
                         num_tokens=3 * BS - 5, device="cpu", layers={}, slot=None,
                         hooked=frozenset({"decode_attn"}),
                         device_views=lambda: [torch.arange(3), torch.zeros(3, dtype=torch.int64),
                                               torch.arange(3)])
    if layers_measured:
        mass = torch.softmax(torch.randn(HKV, 3), -1) * (HQ // HKV)
        sr.layers["decode_mass"] = [mass, mass]
        sr.layers["decode_peak"] = [mass, mass]
    ev.scored = [sr]
    ev.plan = SimpleNamespace(score={"r1": sr.task})
    ev.finish_step()
    output = SimpleNamespace(req_ids=["r1"])
    ev.attach_scores(output)
    return output


def test_unmeasured_statistics_are_reported(caplog):
    from vllm_kvevict.adapter.protocol import SCORES_ATTR, SKIPPED_ATTR

    measured = _worker_after_a_step(True)
    assert set(getattr(measured, SCORES_ATTR)) == {"r1"} and not hasattr(measured, SKIPPED_ATTR)
    # host arrays, one score per resident block in positional order (what the scheduler takes)
    sent = getattr(measured, SCORES_ATTR)["r1"]
    assert sent.positions.tolist() == [0, 1, 2] and sent.scores.dtype == np.float32
    assert sent.scores.shape == (3,) and np.isfinite(sent.scores).all()
    with caplog.at_level(logging.WARNING, logger="vllm_kvevict"):
        missed = _worker_after_a_step(False)  # e.g. a full CUDA graph replayed
    assert getattr(missed, SKIPPED_ATTR) == {"r1": "h2o"} and not hasattr(missed, SCORES_ATTR)
    assert "decode_mass, decode_peak not measured" in caplog.text


def test_scheduler_counts_and_exports_skipped_scoring(tmp_path, monkeypatch):
    from vllm_kvevict.adapter.protocol import SKIPPED_ATTR
    from vllm_kvevict.adapter.scheduler import EvictingScheduler
    from vllm_kvevict.metrics import METRICS_DIR_ENV, EvictionCollector, EvictionMetrics

    monkeypatch.setenv(METRICS_DIR_ENV, str(tmp_path))
    sched = SimpleNamespace(kv_metrics=EvictionMetrics(), kv_requests={})
    output = SimpleNamespace(**{SKIPPED_ATTR: {"r1": "h2o", "r2": "h2o"}})
    EvictingScheduler._take_worker_output(sched, output)
    assert sched.kv_metrics.totals.scoring_skipped == 2
    sched.kv_metrics.publish()
    families = {f.name: f for f in EvictionCollector(str(tmp_path)).collect()}
    sample = families["vllm_kvevict_scoring_skipped"].samples[0]
    assert sample.name == "vllm_kvevict_scoring_skipped_total"
    assert sample.labels == {"policy": "h2o"} and sample.value == 2


# -- tensor parallelism ---------------------------------------------------------------------
def test_scores_reach_the_communicator_on_the_kv_cache_device(monkeypatch):
    """pynccl all-reduces tensors on its own CUDA device only: the block scores must be moved
    to the KV cache's device before the reduction (here "meta" stands in for cuda:0)."""
    import vllm.distributed

    seen = []

    def all_reduce(t):
        seen.append(t.device)
        return torch.cat([torch.tensor([2.0, 4.0, 6.0]), torch.tensor([2.0])])  # 2 ranks' sum

    monkeypatch.setattr(scoring_batch, "_tp_world_size", lambda: 2)
    monkeypatch.setattr(vllm.distributed, "tensor_model_parallel_all_reduce", all_reduce)
    scores, ok = scoring_batch._all_reduce_mean([torch.tensor([1.0, 2.0, 3.0])], [3],
                                                device=torch.device("meta"))
    assert seen == [torch.device("meta")]
    assert [s.tolist() for s in scores] == [[1.0, 2.0, 3.0]] and ok == [True]


def _tp_rank(rank: int, world: int, port: int, queue) -> None:
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed.parallel_state import (
        init_distributed_environment,
        initialize_model_parallel,
    )

    try:
        with set_current_vllm_config(VllmConfig()):
            init_distributed_environment(world_size=world, rank=rank, local_rank=rank,
                                         backend="gloo",
                                         distributed_init_method=f"tcp://127.0.0.1:{port}")
            initialize_model_parallel(tensor_model_parallel_size=world)
            mine = [torch.tensor([1.0, 2.0]) * (rank + 1),
                    None if rank == 1 else torch.tensor([5.0])]
            queue.put((rank, scoring_batch._all_reduce_mean(mine, [2, 1], device=torch.device("cpu"))))
    except Exception as exc:  # reported to the test instead of a silent hang
        queue.put((rank, repr(exc)))


def test_tp_mean_through_vllm_group_coordinator():
    """Two real processes, vLLM's TP group on gloo (what vLLM-CPU's TP runs on): scores are
    averaged over the ranks; a request one rank did not measure is dropped on both."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_tp_rank, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    for rank in (0, 1):
        assert not isinstance(results[rank], str), results[rank]
        scores, measured = results[rank]
        assert scores[0].tolist() == [1.5, 3.0] and measured == [True, False]


# -- compacted inputs inside captured graphs ------------------------------------------------
def test_compaction_edits_the_runner_buffers_in_place():
    """A replayed CUDA graph reads the runner's persistent buffers (seq_lens, the block
    table's slot mapping) at the addresses it was captured with, and FlashInfer plans from
    ``optimistic_seq_lens_cpu``: the compacted lengths and slots must be written into those
    same tensors, every row but the compacted ones untouched."""
    from vllm.platforms import current_platform
    from vllm.v1.worker.block_table import MultiGroupBlockTable

    from vllm_kvevict.adapter.protocol import StepPlan

    current_platform.register_triton_kernel_overrides()  # the slot-mapping kernel, on CPU

    table = MultiGroupBlockTable(max_num_reqs=4, max_num_batched_tokens=64, pin_memory=False,
                                 device=torch.device("cpu"), block_sizes=[BS], max_num_blocks=[8])
    rows = {"a": [5, 7, 2], "b": [1, 3]}  # "a": its block at position 1 was evicted (E = BS)
    for i, ids in enumerate(rows.values()):
        table[0].add_row(ids, i)
    table.commit_block_table(2)
    computed = np.array([4 * BS - 3, 2 * BS - 6])  # "a" positions 0..4*BS-4 before this step
    scheduled = np.array([1, 2])
    positions = torch.tensor([computed[0], computed[1], computed[1] + 1], dtype=torch.int64)
    qsl = torch.tensor([0, 1, 3, 3, 3], dtype=torch.int32)
    seq_lens = torch.tensor([*(computed + scheduled), 0, 0], dtype=torch.int32)
    runner = SimpleNamespace(
        input_batch=SimpleNamespace(num_reqs=2, req_ids=list(rows), block_table=table),
        seq_lens=seq_lens, optimistic_seq_lens_cpu=seq_lens.clone().long(),
        positions=positions, query_start_loc=SimpleNamespace(gpu=qsl, np=qsl.numpy()),
    )
    table.compute_slot_mapping(2, qsl, positions)  # vLLM's own, before our hook
    buffers = {"seq_lens": runner.seq_lens, "optimistic": runner.optimistic_seq_lens_cpu,
               "slots": table[0].slot_mapping.gpu}
    addresses = {k: v.data_ptr() for k, v in buffers.items()}
    stock_slots = table[0].slot_mapping.gpu[:3].clone()

    ev = W.WorkerEviction(runner)
    ev.plan = StepPlan(offsets={"a": BS})
    ev.fix_inputs(scheduled)
    assert {k: v.data_ptr() for k, v in buffers.items()} == addresses
    assert runner.seq_lens.tolist() == [4 * BS - 2 - BS, 2 * BS - 4, 0, 0]
    assert runner.optimistic_seq_lens_cpu.tolist() == runner.seq_lens.tolist()
    # "a": compacted position 3*BS-3 - ... lands in its 3rd row block (id 2), row BS-3
    assert table[0].slot_mapping.gpu[:3].tolist() == [2 * BS + BS - 3, *stock_slots[1:].tolist()]


# -- the plugin's attention backend: statistics from its buffers ------------------------------
def test_fused_rows_are_scored_from_the_backend_buffers(monkeypatch):
    """A decode row of the plugin's backend: the worker flags it (slot = batch row) with its
    parked blocks in one upload, runs no hook statistic, and hands the policy the kernel's
    per-block values moved from the kernel's order (attended blocks in row order, then the
    parked ones) to the resident positional order the policy and the scheduler use."""
    from vllm_kvevict.adapter.protocol import SCORES_ATTR
    from vllm_kvevict.backend import buffers
    from vllm_kvevict.policies import get_policy

    stats = buffers.DecodeStatBuffers(max_rows=4, max_slots=4, num_heads=HQ, num_kv_heads=HKV,
                                      max_blocks=8, max_parked=4, device="cpu")
    buffers.activate(stats)
    try:
        ev = W.WorkerEviction(SimpleNamespace(
            device=torch.device("cpu"),
            input_batch=SimpleNamespace(block_table=[SimpleNamespace(block_size=BS)]),
            model_config=SimpleNamespace(get_num_kv_heads=lambda _: HKV,
                                         get_num_attention_heads=lambda _: HQ),
            parallel_config=None))
        ev.fused, ev.layer_names = True, ["model.layers.0.attn", "model.layers.1.attn"]
        policy = get_policy("attention", {})
        task = SimpleNamespace(phase="decode", generation=0, visual_spans=[], policy="attention")
        sr = uploaded(scoring_batch.ScoredRequest(
            req_id="r1", task=task, policy=policy, q_start=1, q_end=2,
            block_ids=torch.tensor([5, 9, 2]), positions=torch.tensor([0, 1, 3]),
            parked=torch.tensor([False, True, False]), tokens_per_block=[BS, BS, 3],
            query_positions=torch.tensor([3 * BS + 2]), layers={}, slot=1, hooked=frozenset()))
        assert sr.stat_columns.tolist() == [0, 2, 1]
        ev.scored, ev.plan = [sr], SimpleNamespace(score={"r1": task})
        assert not ev.needs_eager_attention  # a FULL graph may replay this step
        ev._prepare_backend(num_reqs=2)
        assert stats.slot[:4].tolist() == [-1, 1, -1, -1]
        assert stats.park_start[:3].tolist() == [0, 0, 1] and stats.park_ids[:1].tolist() == [9]
        stats.mass[1, :, :3] = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # as the kernel
        stats.peak[1, :, :3] = stats.mass[1, :, :3] / 10
        seen = []
        real = policy.block_scores
        monkeypatch.setattr(policy, "block_scores", lambda st, state: seen.append(st) or real(st, state))
        ev.finish_step()
        assert ev.transfers.counts == {"downloads": 1}  # the scores, one copy for the step
        assert seen[0].position_limit == 4  # sized on the host: no read-back in the policy
        got = seen[0]
        assert got.decode_mass.tolist() == [[1.0, 3.0, 2.0], [4.0, 6.0, 5.0]]
        assert torch.allclose(got.decode_peak, got.decode_mass / 10)
        assert got.num_layers == 2 and got.num_heads == HQ
        output = SimpleNamespace(req_ids=["r1"])
        ev.attach_scores(output)
        sent = getattr(output, SCORES_ATTR)["r1"]
        assert np.allclose(sent.scores, np.array([5.0, 9.0, 7.0]) / 21)
        # the next step flags nothing: the rows are cleared once (one more upload), then no more
        ev.scored = []
        ev._prepare_backend(num_reqs=2)
        assert stats.slot[:4].tolist() == [-1, -1, -1, -1] and not ev._backend_rows
    finally:
        buffers.activate(None)


def test_backend_selection(monkeypatch, smollm2, caplog):
    """On an NVIDIA GPU with eviction on, the full-attention layers get the plugin's backend;
    a backend the user chose is kept and the cost is logged; policy ``none`` and other
    platforms leave vLLM's configuration untouched; a model the kernel does not serve keeps
    vLLM's choice with the cost logged."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vllm_kvevict.backend import buffers, is_ours
    from vllm_kvevict.backend.selection import select_attention_backend
    from vllm_kvevict.config import parse_config

    def config(**kw):
        return EngineArgs(model=smollm2, block_size=32, max_model_len=512, **kw).create_engine_config()

    h2o = parse_config({"policy": "h2o", "budget": 0.25})
    vc = config()
    with caplog.at_level(logging.INFO, logger="vllm_kvevict"):
        chosen = select_attention_backend(vc, h2o, cuda=True)
    assert chosen.fused and is_ours(vc.attention_config.backend_per_kind["full_attention"])
    assert vc.attention_config.backend is None  # sliding-window layers: vLLM's choice
    assert "inside the attention pass" in caplog.text
    # the worker allocates the statistics buffers for exactly this configuration
    made = buffers.allocate(vc, h2o, "cpu")
    try:
        assert made is buffers.active() and made.mass.shape == (vc.scheduler_config.max_num_seqs,
                                                                3, 512 // 32)
    finally:
        buffers.activate(None)
    assert buffers.allocate(config(), h2o, "cpu") is None  # not selected: nothing reserved

    user = config(attention_backend="FLASH_ATTN")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vllm_kvevict"):
        kept = select_attention_backend(user, h2o, cuda=True)
    assert not kept.fused and user.attention_config.backend == AttentionBackendEnum.FLASH_ATTN
    assert not user.attention_config.backend_per_kind and "second pass" in caplog.text
    for untouched in (select_attention_backend(config(), parse_config({"policy": "none"}), cuda=True),
                      select_attention_backend(config(), h2o, cuda=False)):
        assert not untouched.fused
    odd = config()
    odd.cache_config.block_size = 48
    assert not select_attention_backend(odd, h2o, cuda=True).fused
    assert not odd.attention_config.backend_per_kind


def test_only_leading_decode_rows_are_measured_by_the_kernel():
    """The backend's kernel serves the batch's leading one-token rows (vLLM puts decode rows
    first for it; the builder splits there). A decode request in such a row gets a slot and no
    hook work; one behind a prefill row (a batch not reordered) would be served by vLLM's
    kernel: the hooks measure it instead of the policy reading an untouched, zeroed slot."""
    from vllm.platforms import current_platform
    from vllm.v1.worker.block_table import MultiGroupBlockTable

    from vllm_kvevict.adapter.protocol import ScoreTask, StepPlan
    from vllm_kvevict.backend import buffers

    current_platform.register_triton_kernel_overrides()
    table = MultiGroupBlockTable(max_num_reqs=4, max_num_batched_tokens=64, pin_memory=False,
                                 device=torch.device("cpu"), block_sizes=[BS], max_num_blocks=[8])
    rows = {"a": [5, 7], "b": [1, 3], "c": [2, 4, 6]}
    for i, ids in enumerate(rows.values()):
        table[0].add_row(ids, i)
    table.commit_block_table(3)
    scheduled = np.array([1, 3, 1])  # a decodes, b prefills a chunk, c decodes behind it
    seq_lens = torch.tensor([2 * BS - 3, 2 * BS - 1, 3 * BS - 5, 0], dtype=torch.int32)
    positions = torch.tensor([2 * BS - 4, 2 * BS - 4, 2 * BS - 3, 2 * BS - 2, 3 * BS - 6])
    qsl = torch.tensor([0, 1, 4, 5, 5], dtype=torch.int32)
    runner = SimpleNamespace(
        input_batch=SimpleNamespace(num_reqs=3, req_ids=list(rows), block_table=table,
                                    num_computed_tokens_cpu=np.array([2 * BS - 4, 2 * BS - 4,
                                                                      3 * BS - 6])),
        seq_lens=seq_lens, optimistic_seq_lens_cpu=seq_lens.clone().long(), positions=positions,
        query_start_loc=SimpleNamespace(gpu=qsl, np=qsl.numpy()), device=torch.device("cpu"))

    def task(n_blocks, phase="decode"):
        return ScoreTask(policy="h2o", options={}, phase=phase, generation=0,
                         kept_positions=list(range(n_blocks)), parked=[])

    stats = buffers.DecodeStatBuffers(max_rows=4, max_slots=4, num_heads=HQ, num_kv_heads=HKV,
                                      max_blocks=8, max_parked=4, device="cpu")
    buffers.activate(stats)
    try:
        ev = W.WorkerEviction(runner)
        ev.fused = True
        ev.plan = StepPlan(score={"a": task(2), "b": task(2, "prefill"), "c": task(3)})
        ev.fix_inputs(scheduled)
        # everything the step sends before the forward: one (pinned, non-blocking) copy
        assert ev.transfers.counts == {"uploads": 1}
        got = {sr.req_id: sr for sr in ev.scored}
        for sr in ev.scored:  # device views of what the policies read
            assert [v.tolist() for v in sr.on_device] == [a.tolist() for a in sr.device_parts()]
            # positions from the host's computed-token counts: what vLLM put on the device
            q = slice(sr.q_start, sr.q_end)
            assert sr.query_positions.tolist() == positions[q].tolist()
        assert got["a"].slot == 0 and got["a"].hooked == frozenset()
        assert got["b"].slot is None and "window_attn" in got["b"].hooked
        assert got["c"].slot is None and "decode_attn" in got["c"].hooked
        assert stats.slot[:3].tolist() == [0, -1, -1]
        assert ev.needs_eager_attention  # b and c need the hooks: no FULL graph this step
    finally:
        buffers.activate(None)


def test_a_scored_decode_step_moves_data_only_through_its_two_transfers(monkeypatch):
    """The worker's step on a device whose data cannot be read: ``meta`` stands in for the
    GPU (reading a meta tensor raises, so any host sync of device data fails the test). A
    compacting step scoring two decode requests of the plugin's backend (H2O) makes exactly:
    one upload of the worker's data and one of the backend's flags (pinned, non-blocking),
    one download of the scores; nothing else crosses, no device value is read."""
    from torch.overrides import TorchFunctionMode

    from vllm_kvevict.adapter.protocol import ScoreTask, StepPlan
    from vllm_kvevict.backend import buffers
    from vllm_kvevict.config import parse_config

    meta = torch.device("meta")
    crossings = []

    class Crossings(TorchFunctionMode):
        """Calls from the plugin (outside its two transfer points) that put data on meta."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            frames = [f.filename for f in __import__("traceback").extract_stack()[:-1]
                      if "vllm_kvevict" in f.filename]
            target = kwargs.get("device", next((a for a in args[1:] if isinstance(
                a, (torch.device, str))), None))
            moving = func in (torch.Tensor.to, torch.tensor, torch.as_tensor) and \
                str(target) == "meta" and not (args and isinstance(args[0], torch.Tensor)
                                               and args[0].is_meta)
            if func is torch.Tensor.copy_ and args[0].is_meta and not args[1].is_meta:
                moving = True
            if moving and frames and not any(f.endswith(("transfers.py", "buffers.py"))
                                             for f in frames[-1:]):
                crossings.append(f"{func.__name__} {frames[-1]}")
            return func(*args, **kwargs)

    rows = {"a": [5, 7, 2], "b": [1, 3]}
    table_np = np.zeros((4, 8), dtype=np.int32)
    for i, ids in enumerate(rows.values()):
        table_np[i, : len(ids)] = ids
    slot_calls = []
    block_table = SimpleNamespace(
        block_size=BS, block_table=SimpleNamespace(np=table_np),
        num_blocks_per_row=np.array([3, 2, 0, 0]),
        compute_slot_mapping=lambda *a: slot_calls.append(a))
    computed = np.array([4 * BS - 3, 2 * BS - 6])  # "a": its block at position 1 evicted
    runner = SimpleNamespace(
        device=meta,
        input_batch=SimpleNamespace(num_reqs=2, req_ids=list(rows), block_table=[block_table],
                                    num_computed_tokens_cpu=computed),
        seq_lens=torch.zeros(4, dtype=torch.int32, device=meta),
        optimistic_seq_lens_cpu=torch.tensor([4 * BS - 2, 2 * BS - 5, 0, 0]),
        positions=torch.zeros(8, dtype=torch.int64, device=meta),
        query_start_loc=SimpleNamespace(gpu=torch.zeros(5, dtype=torch.int32, device=meta),
                                        np=np.array([0, 1, 2, 2, 2])),
        model_config=SimpleNamespace(get_num_kv_heads=lambda _: HKV,
                                     get_num_attention_heads=lambda _: HQ),
        parallel_config=None)
    stats = buffers.DecodeStatBuffers(max_rows=4, max_slots=4, num_heads=HQ, num_kv_heads=HKV,
                                      max_blocks=8, max_parked=4, device=meta)
    buffers.activate(stats)
    try:
        ev = W.WorkerEviction(runner, parse_config({"policy": "h2o", "budget": 0.25}))
        ev.fused, ev.layer_names = True, ["model.layers.0.attn", "model.layers.1.attn"]
        task = lambda positions: ScoreTask(  # noqa: E731
            policy="h2o", options={}, phase="decode", generation=0,
            kept_positions=positions, parked=[])
        ev.plan = StepPlan(offsets={"a": BS}, score={"a": task([0, 2, 3]), "b": task([0, 1])})
        downloads = []
        monkeypatch.setattr(ev.transfers, "download", lambda t: (
            downloads.append(t.shape), ev.transfers.counts.update(["downloads"]),
            torch.ones(t.shape))[2])  # as if read: every request measured
        prepared = []
        real_prepare = stats.prepare
        monkeypatch.setattr(stats, "prepare", lambda *a, **k: (prepared.append(a),
                                                               real_prepare(*a, **k))[1])
        with Crossings():
            ev.fix_inputs(np.array([1, 1]))
            assert [sr.slot for sr in ev.scored] == [0, 1] and not ev.needs_eager_attention
            ev.finish_step()
        assert crossings == [], crossings
        assert ev.transfers.counts == {"uploads": 1, "downloads": 1}
        assert len(prepared) == 1 and len(slot_calls) == 1  # the flags; compaction's slots
        assert downloads == [(3 + 2 + 2,)]  # 5 block scores + 2 flags, one copy
        assert set(ev.pending_scores) == {"a", "b"}
    finally:
        buffers.activate(None)


def test_buffers_narrower_than_the_group_needs_are_refused():
    """Sized at load time from the cache config's block size: a group whose blocks are
    smaller (more per request) would leave a request's last blocks without statistics."""
    from vllm_kvevict.backend import buffers

    buffers.activate(buffers.DecodeStatBuffers(max_rows=2, max_slots=2, num_heads=HQ,
                                               num_kv_heads=HKV, max_blocks=16, max_parked=1,
                                               device="cpu"))
    try:
        W._check_buffer_width(512, 32)  # 16 blocks: fits
        with pytest.raises(UnsupportedConfigError, match="hold 16 blocks per request.*needs 32"):
            W._check_buffer_width(512, 16)
    finally:
        buffers.activate(None)
