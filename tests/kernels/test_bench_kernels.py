"""benchmarks/bench_kernels.py: no fake numbers without a GPU, and its code path works (tiny, CPU)."""

import importlib.util
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_kernels.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU main() runs the real benchmark")
def test_without_gpu_it_says_so_and_writes_nothing(bench, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    assert bench.main([]) == 0
    assert "no NVIDIA GPU" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())


@pytest.mark.usefixtures("needs_triton")
def test_one_tiny_config_end_to_end(bench, tmp_path, device):
    """Same code as on the GPU, float32, with a stand-in timer (its numbers are not results):
    the fused launch gives the plain launch's output plus statistics whose attended mass sums
    to the group size per KV head."""
    args = bench.parse_args(["--heads", "6", "--kv-heads", "2", "--head-dim", "32",
                             "--block-size", "16", "--dtypes", "float32"])
    assert bench.configs(args)[0] == ("float32", *bench.HEADLINE)
    args.dtype = "float32"
    calls = []

    def timer(fn):
        out = fn()
        calls.append(out.clone() if isinstance(out, torch.Tensor) else out)
        return 1.0

    row = bench.run_config(2, 40, args, device, timer)
    assert len(calls) == len(bench.VARIANTS)
    plain, fused = (calls[bench.VARIANTS.index(v)] for v in ("plain", "fused"))
    torch.testing.assert_close(plain, fused, atol=0, rtol=0)
    assert row["max_abs_err"] < 1e-5 and row["mass_sum_err"] < 1e-5
    assert row["fused_cost_ratio"] == 1.0 and row["stats_bytes_per_request"] == 3 * 2 * 4 * 2 + 3 * 6 * 4 * 2
    md, csv_path = bench.write_results([row], dict(gpu="Test GPU", dtype="float32"), out_dir=tmp_path)
    assert md.name == "bench_kernels_test_gpu.md" and "| dtype | batch | context |" in md.read_text()
    assert csv_path.read_text().splitlines()[0].startswith("dtype,batch,context,max_abs_err")
