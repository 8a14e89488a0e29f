"""No Triton compilation while serving: every launch a scored step makes has the same compile key.

Triton compiles one variant of a kernel per *key*: the specialisation of each argument (an
integer equal to 1 becomes a constant; integers and pointers are marked when divisible by 16)
plus the constexpr values. Here each launch's key is computed with Triton's own function
(``native_specialize_impl``, what ``JITFunction.run`` keys its cache on) over steps whose batch
size, split count, lengths, window and row widths change the way serving changes them: each
kernel must show one key, so its warm-up at startup (``backend.warm_up``) is its only
compilation. The same keys without the kernels' ``do_not_specialize`` lists differ: the
check sees what it guards.
"""

from __future__ import annotations

import inspect

import pytest
import torch

pytestmark = pytest.mark.usefixtures("needs_triton")

BS, HKV, G, D = 16, 2, 2, 32


def _key(kernel, args, kwargs, free):
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    fn = getattr(kernel, "fn", kernel)
    names = list(inspect.signature(fn).parameters)
    parts = [native_specialize_impl(BaseBackend, arg, False, name not in free, True)
             for name, arg in zip(names, args)]
    return tuple(parts) + tuple(sorted(kwargs.items()))


@pytest.fixture
def launches(monkeypatch):
    """Records (module, kernel name, kernel, args, kwargs) of every launch of the serving
    kernels."""
    from vllm_kvevict.kernels import fused_decode, value_norm, window_attention

    seen = []
    for module in (fused_decode, value_norm, window_attention):
        for name in module.DO_NOT_SPECIALIZE:
            kernel = getattr(module, name)

            class Recorder:
                def __getitem__(self, grid, _kernel=kernel, _module=module, _name=name):
                    launch = _kernel[grid]

                    def run(*args, **kwargs):
                        seen.append((_module, _name, _kernel, args, kwargs))
                        return launch(*args, **kwargs)
                    return run

            monkeypatch.setattr(module, name, Recorder())
    return seen


def _keys(seen, honour=True):
    """{kernel name: the set of compile keys of its launches}."""
    keys = {}
    for module, name, kernel, args, kwargs in seen:
        free = module.DO_NOT_SPECIALIZE[name] if honour else ()
        keys.setdefault(name, set()).add(_key(kernel, args, kwargs, free))
    return keys


def _steps(device):
    """A cache and persistent buffers as the backend holds them, then steps of serving: batch
    sizes 1..6 (split counts 16, 5, 1...), lengths up to 5 blocks, windows 1..32 of prefill
    chunks, rows of different widths."""
    from vllm_kvevict.kernels import dispatch
    from vllm_kvevict.kernels.fused_decode import fused_decode_attention, split_scratch
    from vllm_kvevict.kernels.paged import PagedKV, vllm_layer_caches
    from vllm_kvevict.kernels.warmup import warm_up

    gen = torch.Generator().manual_seed(0)
    hq, rows, nb = HKV * G, 8, 6
    cache = vllm_layer_caches(1, 64, HKV, BS, D, "LBNHC", torch.float32, device)[0]
    cache.copy_(torch.randn(cache.shape, generator=gen))
    kv = PagedKV.from_vllm(cache, D)
    table = torch.randperm(64, generator=gen)[: rows * nb].view(rows, nb).to(device, torch.int32)
    seq_lens = torch.zeros(rows, dtype=torch.int32, device=device)
    query = torch.randn(64, hq, D, generator=gen).to(device)
    out = torch.empty(rows, hq, D, device=device)
    f32 = dict(dtype=torch.float32, device=device)
    stats = dict(slot=torch.full((rows,), -1, dtype=torch.int32, device=device),
                 park_ids=torch.zeros(4, dtype=torch.int32, device=device),
                 park_start=torch.zeros(rows + 1, dtype=torch.int32, device=device),
                 mass=torch.zeros(rows, HKV, nb, **f32), peak=torch.zeros(rows, HKV, nb, **f32),
                 block_partials=(torch.zeros(rows, nb, hq, **f32), torch.zeros(rows, nb, hq, **f32)))
    scratch = split_scratch(rows, hq, HKV, D, device)
    gram = torch.randn(hq, D, D, generator=gen).to(device)
    # startup: what the worker compiles before serving, on the same cache and widths
    assert warm_up(cache, hq, D, nb, stats=stats, decode=True) == 4
    for step, (n_rows, splits, length) in enumerate(
            [(1, 16, 5), (2, 5, 37), (3, 1, 80), (6, 2, 16), (4, 3, 1)]):
        seq_lens[:n_rows] = torch.tensor([length + i for i in range(n_rows)], dtype=torch.int32)
        stats["slot"][:n_rows] = torch.arange(n_rows, dtype=torch.int32)
        fused_decode_attention(query[:n_rows], kv.key, kv.value, table, seq_lens, out[:n_rows],
                               D**-0.5, scratch=scratch, num_splits=splits, **stats)
        # prefill statistics of one request: its own row, a window of this chunk's queries
        width, w = 1 + step % nb, (1, 7, 17, 32, 32)[step]
        row = table[step % rows, :width][None].clone()  # a fresh row, as the worker makes
        lens = torch.tensor([min(width * BS, 70)], dtype=torch.int32, device=device)
        q_window = query[20 - w: 20].transpose(0, 1)[None]
        dispatch.window_attention(q_window, kv, row, lens, D**-0.5, backend="triton")
        dispatch.value_proj_norm(gram, kv, row, lens, backend="triton")


def test_one_compile_key_per_kernel_across_serving_steps(launches, device):
    """The warm-up's launches and every later step's share one key per kernel."""
    _steps(device)
    keys = _keys(launches)
    assert set(keys) == {"_phase1", "_phase2", "_window_kernel", "_value_norm_kernel"}
    assert {name: len(k) for name, k in keys.items()} == dict.fromkeys(keys, 1)


def test_without_do_not_specialize_the_keys_differ(launches, device):
    """The check sees the hazard: the same launches keyed as Triton would without the lists
    compile several variants (split count 1 and 16, widths and strides)."""
    _steps(device)
    keys = _keys(launches, honour=False)
    assert len(keys["_phase1"]) > 1 and len(keys["_window_kernel"]) > 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compile caches exist on a GPU only")
def test_the_gpu_compiles_each_kernel_at_most_once_across_serving_steps(device):
    """On a GPU, Triton's own cache: the warm-up and the changing steps add at most one
    compiled variant per kernel (none if an earlier test compiled the same one)."""
    from vllm_kvevict.kernels import fused_decode, value_norm, window_attention

    kernels = [getattr(m, name) for m in (fused_decode, value_norm, window_attention)
               for name in m.DO_NOT_SPECIALIZE]

    def compiled(kernel):
        return sum(len(entry[0]) for entry in kernel.device_caches.values())

    before = [compiled(k) for k in kernels]
    _steps(device)
    added = [compiled(k) - b for k, b in zip(kernels, before)]
    assert all(n <= 1 for n in added), dict(zip((k.fn.__name__ for k in kernels), added))
