"""The benchmarks find the test helpers they import (``engine_helpers`` in ``tests/support``):
every folder a benchmark puts on ``sys.path`` exists, and a benchmark that imports
``engine_helpers`` has it on its path. No engine: the scripts are read, not run."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _path_entries(tree: ast.Module, here: Path) -> list[Path]:
    """The folders of the ``sys.path.insert(0, os.path.join(HERE | dirname(HERE), ...))``
    calls at the module's top level."""
    found = []
    for node in tree.body:
        call = node.value if isinstance(node, ast.Expr) else None
        if not (isinstance(call, ast.Call) and ast.unparse(call.func) == "sys.path.insert"):
            continue
        target = call.args[1]
        if isinstance(target, ast.Name) and target.id == "HERE":
            found.append(here)
            continue
        base, *parts = target.args
        root = here.parent if ast.unparse(base) == "os.path.dirname(HERE)" else here
        assert ast.unparse(base) in ("HERE", "os.path.dirname(HERE)"), ast.unparse(base)
        found.append(root.joinpath(*(ast.literal_eval(p) for p in parts)).resolve())
    return found


@pytest.mark.parametrize("script", sorted(BENCHMARKS.glob("*.py")), ids=lambda p: p.name)
def test_a_benchmark_finds_what_it_imports(script):
    source = script.read_text()
    entries = _path_entries(ast.parse(source), BENCHMARKS)
    for entry in entries:
        assert entry.is_dir(), f"{script.name} puts {entry} on sys.path: no such folder"
    if "from engine_helpers import" in source:
        assert any((e / "engine_helpers.py").exists() for e in entries), script.name
