"""vLLM CPU-backend KV layouts: gather, and layout detection that refuses to guess (hazard 4)."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from vllm_kvevict.kernels.paged import (
    CPU,
    CPU_T,
    PagedKV,
    cpu_kv_view,
    detect_cpu_key_layout,
    gather_kv,
)

BS, HKV, D = 16, 2, 8


def write_cpu_cache(keys, values, block_ids, layout, num_blocks=6):
    """Store keys/values [T, Hkv, D] as vLLM's CPU backend would; returns the [nb, Hkv, 2*bs, D] view.

    ``layout="pairs"`` is a layout this code does not know (token pairs interleaved per
    dimension, like a VNNI packing) and must be rejected.
    """
    kv = torch.zeros(num_blocks, HKV, 2 * BS, D)
    for t in range(keys.shape[0]):
        b, o = int(block_ids[t // BS]), t % BS
        tile = kv[b, :, :BS]  # [Hkv, bs, D], one contiguous bs*D run per head
        if layout == CPU:
            tile[:, o] = keys[t]
        elif layout == CPU_T:
            tile.reshape(HKV, D, BS)[:, :, o] = keys[t]
        else:
            tile.reshape(HKV, BS // 2, D, 2)[:, o // 2, :, o % 2] = keys[t]
        kv[b, :, BS + o] = values[t]
    return kv


@pytest.fixture
def tokens():
    gen = torch.Generator().manual_seed(1)
    keys, values = torch.randn(37, HKV, D, generator=gen), torch.randn(37, HKV, D, generator=gen)
    return keys, values, torch.tensor([4, 0, 2])  # three shuffled blocks, last one partial


@pytest.mark.parametrize("layout", [CPU, CPU_T])
def test_detect_then_gather_roundtrip(tokens, layout):
    keys, values, ids = tokens
    kv = write_cpu_cache(keys, values, ids, layout)
    slot = int(ids[35 // BS]) * BS + 35 % BS
    assert detect_cpu_key_layout(kv, keys[35], slot, known_value=values[35]) == layout
    k, v = gather_kv(kv, ids, 37, layout)
    assert torch.equal(k, keys) and torch.equal(v, values)
    # the raw allocation [nb, Hkv, bs, 2*D] gives the same view
    raw = kv.view(kv.shape[0], HKV, BS, 2 * D)
    assert torch.equal(cpu_kv_view(raw), kv)


def test_wrong_layout_is_detected_not_used(tokens):
    keys, values, ids = tokens
    kv = write_cpu_cache(keys, values, ids, CPU_T)
    wrong, _ = gather_kv(kv, ids, 37, CPU)  # what a plain reader would silently get
    assert not torch.allclose(wrong, keys)
    assert detect_cpu_key_layout(kv, keys[3], int(ids[0]) * BS + 3) == CPU_T

    unknown = write_cpu_cache(keys, values, ids, "pairs")
    with pytest.raises(ValueError, match="not recognised.*matches neither"):
        detect_cpu_key_layout(unknown, keys[3], int(ids[0]) * BS + 3)


def test_detect_rejects_ambiguous_and_malformed_input(tokens):
    keys, values, ids = tokens
    with pytest.raises(ValueError, match="matches both"):  # a constant key fits any layout
        detect_cpu_key_layout(torch.zeros(6, HKV, 2 * BS, D), torch.zeros(HKV, D), 5)
    kv = write_cpu_cache(keys, values, ids, CPU)
    with pytest.raises(ValueError, match="cpu_kv_view"):
        detect_cpu_key_layout(kv.view(6, HKV, BS, 2 * D), keys[0], int(ids[0]) * BS)
    with pytest.raises(ValueError, match="values .* not stored plain"):
        detect_cpu_key_layout(kv, keys[0], int(ids[0]) * BS, known_value=values[1])
    with pytest.raises(ValueError, match="CPU layout must be"):
        PagedKV.from_cpu(kv, "nhd")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_layout_written_by_vllm_cpu_backend():
    """vLLM's own CPU cache writer, on this host's ISA: detected, and gathered back exactly."""
    script = textwrap.dedent("""
        import platform
        import torch
        from vllm import _custom_ops as ops
        from vllm_kvevict.kernels.paged import cpu_kv_view, detect_cpu_key_layout, gather_kv
        bs, h, d, t = 32, 2, 64, 70
        kv = cpu_kv_view(torch.zeros(4, h, bs, 2 * d))
        key_cache, value_cache = kv.chunk(2, dim=2)
        keys, values = torch.randn(t, h, d), torch.randn(t, h, d)
        table = torch.tensor([3, 0, 2])
        slots = torch.stack([table[i // bs] * bs + i % bs for i in range(t)])
        # the ISA vLLM 0.32's _get_attn_isa picks for float32, block 32, head 64 (importing it
        # doubles this subprocess's start-up)
        isa = "neon" if platform.machine() in ("aarch64", "arm64") else "vec"
        ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, slots, isa)
        layout = detect_cpu_key_layout(kv, keys[-1], int(slots[-1]), known_value=values[-1])
        k, v = gather_kv(kv, table, t, layout)
        assert torch.equal(k, keys) and torch.equal(v, values)
        print(layout)
    """)
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu"}
    env.pop("TRITON_INTERPRET", None)
    try:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=120, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("vLLM CPU op probe timed out")
    if "cpu_attn_reshape_and_cache" in proc.stderr and "has no attribute" in proc.stderr:
        pytest.skip("this vLLM build has no CPU attention ops")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] in (CPU, CPU_T)
