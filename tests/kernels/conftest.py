"""Kernel tests run the real Triton kernels: on a CUDA GPU if there is one, else in Triton's
numpy interpreter (``TRITON_INTERPRET=1``: exact but slow, so shapes are small).

``triton.jit`` decides interpreted-or-compiled when a function is decorated, and triton's own
``tl.cdiv``/``tl.sum``... are jit functions too, so the variable must be set before triton is
first imported. If another test module imported it earlier, its jit'd standard library and
our kernel modules are re-decorated here. The variable is restored afterwards so engine tests
in the same session never inherit it; an autouse fixture sets it for each kernel test.

These tests need only torch, triton and pytest (numpy too on CPU, for the interpreter): from a
bare ``git clone`` (no ``pip install``), :func:`ensure_kernels_importable` maps ``kernels/`` to
``vllm_kvevict.kernels`` as the installed package does.

Cache dtypes: float32 on CPU (the interpreter is slow); float32, float16 and bfloat16 on CUDA.
``KVEVICT_KERNEL_DTYPES=float16,bfloat16`` overrides the list (``benchmarks/gpu_check.py``
runs one dtype per process). Half-precision results are compared with float32 references
computed from the same half-precision inputs (see ``TOLERANCES``).
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def ensure_kernels_importable() -> None:
    """``vllm_kvevict.kernels`` from a bare checkout too (``vllm_kvevict/__init__.py``)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import vllm_kvevict  # dependency-free

    vllm_kvevict.ensure_kernels_importable()


ensure_kernels_importable()

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
KERNEL_MODULES = ("fused_decode", "window_attention", "key_bounds", "value_norm", "warmup")
TRITON_ERROR = None  # a reason to skip the Triton tests (the torch references still run)

_DTYPE_NAMES = ("float32", "float16", "bfloat16")
_wanted = os.environ.get("KVEVICT_KERNEL_DTYPES") or ",".join(_DTYPE_NAMES if GPU else _DTYPE_NAMES[:1])
_names = [name.strip() for name in _wanted.split(",") if name.strip()]
if not _names or set(_names) - set(_DTYPE_NAMES):
    raise ValueError(f"KVEVICT_KERNEL_DTYPES={_wanted!r}: expected a comma list of {_DTYPE_NAMES}")
DTYPES = tuple(getattr(torch, name) for name in _names)

#: (atol, rtol) per cache dtype for ``out`` (tensors in the cache dtype, e.g. the decode output:
#: kernel and reference both round a float32 result to it, so they may differ by about one ulp)
#: and ``stat`` (float32 statistics: both compute in float32 from the same inputs, only the
#: summation order differs; 1e-4 for half inputs leaves room for the GPU's order).
TOLERANCES = {
    torch.float32: dict(out=(1e-5, 1e-5), stat=(1e-5, 1e-5)),
    torch.float16: dict(out=(2e-3, 2e-3), stat=(1e-4, 1e-4)),
    torch.bfloat16: dict(out=(1e-2, 1.6e-2), stat=(1e-4, 1e-4)),
}


def _load_interpreted() -> None:
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.standard.cdiv, InterpretedFunction):  # triton was imported before us
        for module in (tl.standard, tl.random, tl):
            importlib.reload(module)
    for name in KERNEL_MODULES:
        importlib.reload(importlib.import_module(f"vllm_kvevict.kernels.{name}"))
    if not isinstance(tl.standard.cdiv, InterpretedFunction):
        raise RuntimeError("could not switch triton to its interpreter")


try:
    if GPU:
        import triton  # noqa: F401
    else:
        _previous = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            _load_interpreted()
        finally:
            if _previous is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = _previous
except (ImportError, RuntimeError) as exc:
    TRITON_ERROR = f"Triton kernels cannot run here: {exc}"


@pytest.fixture(autouse=True)
def _triton_interpret(monkeypatch):
    if not GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def needs_triton():
    if TRITON_ERROR:
        pytest.skip(TRITON_ERROR)


@pytest.fixture
def device():
    return DEVICE


def make_case(block_size, num_kv_heads, group, head_dim, lens, *, dtype=torch.float32,
              spare_blocks=3, seed=0):
    """Random paged caches with shuffled block tables, poisoned wherever a kernel must not read.

    Physical blocks not in any request's row, the unused tail of each partial last block and the
    table's padding entries all hold NaN, so an unmasked read shows up as a NaN in the result.
    """
    gen = torch.Generator().manual_seed(seed)
    r_n = len(lens)
    need = [-(-n // block_size) for n in lens]
    max_blocks = max(max(need), 1) + 1  # one padding column at least
    num_blocks = sum(need) + spare_blocks
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key = torch.randn(shape, generator=gen)
    value = torch.randn(shape, generator=gen)
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.empty(r_n, max_blocks, dtype=torch.int32)
    used = torch.zeros(num_blocks, dtype=torch.bool)
    nxt = 0
    for r, (n, nb) in enumerate(zip(lens, need)):
        ids = perm[nxt: nxt + nb]
        nxt += nb
        used[ids] = True
        table[r, :nb] = ids.to(torch.int32)
        table[r, nb:] = perm[-1]  # a spare (poisoned) block: never read
        if n % block_size:
            key[ids[-1], n % block_size:] = float("nan")
            value[ids[-1], n % block_size:] = float("nan")
    key[~used] = float("nan")
    value[~used] = float("nan")
    hq = num_kv_heads * group
    return SimpleNamespace(
        key_cache=key.to(DEVICE, dtype), value_cache=value.to(DEVICE, dtype),
        block_table=table.to(DEVICE), seq_lens=torch.tensor(lens, dtype=torch.int32, device=DEVICE),
        query=torch.randn(r_n, hq, head_dim, generator=gen).to(DEVICE, dtype),
        block_size=block_size, num_kv_heads=num_kv_heads, num_heads=hq, head_dim=head_dim,
        gen=gen,
    )


@pytest.fixture
def paged_case():
    return make_case


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def dtype(request):
    """The cache/query dtype of a test (see ``DTYPES``)."""
    return request.param


class Tolerance:
    """``assert_close`` with the tolerance of the case's dtype (``TOLERANCES``)."""

    def __init__(self, dtype):
        self.dtype = dtype
        self.out_atol, self.out_rtol = TOLERANCES[dtype]["out"]
        self.atol, self.rtol = TOLERANCES[dtype]["stat"]

    def close(self, got, want, **kwargs):
        """float32 tensors get the ``stat`` tolerance, half-precision ones ``out``."""
        if got.dtype == torch.float32:
            kwargs = dict(atol=self.atol, rtol=self.rtol) | kwargs
        else:
            kwargs = dict(atol=self.out_atol, rtol=self.out_rtol) | kwargs
        torch.testing.assert_close(got, want, **kwargs)


@pytest.fixture
def tol(dtype):
    return Tolerance(dtype)


@pytest.fixture(params=[
    # (block_size, GQA group, request lengths): both block sizes, GQA 1 and 3, several requests
    # of different lengths in one launch (one token, partial last blocks, exactly full rows)
    pytest.param((16, 1, [1, 37, 64, 20]), id="bs16-gqa1"),
    pytest.param((16, 3, [40, 5, 16]), id="bs16-gqa3"),
    pytest.param((32, 1, [70, 32, 3]), id="bs32-gqa1"),
    pytest.param((32, 3, [1, 45, 96]), id="bs32-gqa3"),
])
def case(request, dtype):
    """A paged case for each shape configuration (2 KV heads, head_dim 32) and dtype."""
    block_size, group, lens = request.param
    return make_case(block_size, 2, group, 32, lens, dtype=dtype)
