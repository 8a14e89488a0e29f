"""Kernel tests run the real Triton kernels: on a CUDA GPU if there is one, else in Triton's
numpy interpreter (``TRITON_INTERPRET=1``: exact but slow, so shapes are small).

``triton.jit`` decides interpreted-or-compiled when a function is decorated, and triton's own
``tl.cdiv``/``tl.sum``... are jit functions too, so the variable must be set before triton is
first imported. If another test module imported it earlier, its jit'd standard library and
our kernel modules are re-decorated here. The variable is restored afterwards so engine tests
in the same session never inherit it; an autouse fixture sets it for each kernel test.
"""

from __future__ import annotations

import importlib
import os
from types import SimpleNamespace

import pytest
import torch

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
KERNEL_MODULES = ("paged_decode", "window_attention", "key_bounds", "value_norm")
TRITON_ERROR = None  # a reason to skip the Triton tests (the torch references still run)


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


@pytest.fixture(params=[
    # (block_size, GQA group, request lengths): both block sizes, GQA 1 and 3, several requests
    # of different lengths in one launch (one token, partial last blocks, exactly full rows)
    pytest.param((16, 1, [1, 37, 64, 20]), id="bs16-gqa1"),
    pytest.param((16, 3, [40, 5, 16]), id="bs16-gqa3"),
    pytest.param((32, 1, [70, 32, 3]), id="bs32-gqa1"),
    pytest.param((32, 3, [1, 45, 96]), id="bs32-gqa3"),
])
def case(request):
    """A paged case for each shape configuration (2 KV heads, head_dim 32)."""
    block_size, group, lens = request.param
    return make_case(block_size, 2, group, 32, lens)
