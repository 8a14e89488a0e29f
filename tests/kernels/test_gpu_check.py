"""benchmarks/gpu_check.py: nothing written without a GPU; pytest's JUnit XML read into counts."""

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

CHECK = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", CHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU main() runs the real check")
def test_without_gpu_it_says_so_and_writes_nothing(gpu_check, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    assert gpu_check.main(["--out", str(tmp_path / "check.json")]) == 0
    assert "no NVIDIA GPU found" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())


def test_junit_counts_and_failure_names(gpu_check, tmp_path):
    (tmp_path / "test_demo.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
        def test_ok(dtype):
            pass

        def test_bad():
            assert 1 == 2

        @pytest.fixture
        def broken():
            raise RuntimeError("setup")

        def test_setup_error(broken):
            pass

        def test_skip():
            pytest.skip("no reason")
    """))
    xml = tmp_path / "junit.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path),
                    f"--junitxml={xml}", "--rootdir", str(tmp_path), "-c", "/dev/null"],
                   cwd=tmp_path, capture_output=True, timeout=120)
    got = gpu_check.junit_summary(xml)
    assert {k: got[k] for k in ("passed", "failed", "errors", "skipped")} == dict(
        passed=2, failed=1, errors=1, skipped=1)
    assert [f.split(" ")[0] for f in got["failures"]] == ["test_demo.py::test_bad",
                                                          "test_demo.py::test_setup_error"]
    assert got["skip_reasons"] == {"no reason": 1}
