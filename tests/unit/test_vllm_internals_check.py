"""The internals checker (``python -m vllm_kvevict.adapter.vllm_internals check SRC_DIR``) against
vLLM sources read with ``ast``: it passes on the installed vLLM, names an internal that was
renamed or lost a parameter, and follows imports and base classes the way Python does. Also
the supported versions, the refusal of KV connectors, and the capacity check patched where
0.33 keeps it (``kv_cache_planning``), which this machine cannot run."""

from __future__ import annotations

import functools
import importlib.util
import shutil
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest

from vllm_kvevict.adapter.internals_check import SourceTree, check_internal, main
from vllm_kvevict.adapter.startup_checks import (
    UnsupportedConfigError,
    check_engine_config,
    check_prefill_capacity,
    check_vllm_version,
    kv_planning_module,
)
from vllm_kvevict.adapter.vllm_internals import KV_PLANNING_MODULES, TOUCHED_INTERNALS, Internal


def _installed_vllm() -> Path:
    """The installed ``vllm`` package directory (found, not imported)."""
    return Path(importlib.util.find_spec("vllm").submodule_search_locations[0])


@pytest.fixture(scope="module")
def vllm_copy(tmp_path_factory) -> Path:
    """The installed vLLM's source files the checker reads, copied (``<dir>/vllm/...``)."""
    tree = SourceTree.locate(_installed_vllm())
    for internal in TOUCHED_INTERNALS:
        if internal.kind != "doc":
            check_internal(tree, internal)
    root = tmp_path_factory.mktemp("src")
    for rel in tree.files():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tree.root.parent / rel, root / rel)
    return root


def test_the_installed_vllm_sources_match(capsys):
    assert main(["check", str(_installed_vllm())]) == 0
    out = capsys.readouterr().out
    assert " 0 differences" in out
    assert "unchecked: CPU attention KV layout" in out  # doc entries are listed, not checked


def test_the_module_runs_as_a_command_without_importing_vllm():
    code = ("import runpy, sys; sys.argv = ['x', 'check', sys.argv[1]]\n"
            "try:\n    runpy.run_module('vllm_kvevict.adapter.vllm_internals', "
            "run_name='__main__')\nexcept SystemExit as exc:\n"
            "    assert 'vllm' not in sys.modules, 'vllm was imported'\n    raise")
    done = subprocess.run([sys.executable, "-c", code, str(_installed_vllm().parent)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "internals checked, 0 differences" in done.stdout


@pytest.mark.parametrize("path, old, new, named", [
    ("vllm/v1/core/kv_cache_manager.py", "def get_computed_blocks(",
     "def get_cached_blocks(",
     "vllm.v1.core.kv_cache_manager.KVCacheManager.get_computed_blocks: missing"),
    ("vllm/v1/core/kv_cache_coordinator.py",
     "def cache_blocks(self, request: Request, num_computed_tokens: int)",
     "def cache_blocks(self, request: Request)",
     "vllm.v1.core.kv_cache_coordinator.KVCacheCoordinator.cache_blocks: parameter "
     "num_computed_tokens not accepted"),
    ("vllm/v1/core/kv_cache_utils.py", "    estimate_max_model_len: Callable[[int], int],\n):",
     "    estimate_max_model_len: Callable[[int], int],\n    headroom: int = 0,\n):",
     "vllm.v1.core.kv_cache_utils._check_enough_kv_cache_memory: parameter headroom is not "
     "taken by the plugin's fixed signature"),
])
def test_a_changed_internal_is_named(vllm_copy, tmp_path, capsys, path, old, new, named):
    src = tmp_path / "src"
    shutil.copytree(vllm_copy, src)
    text = (src / path).read_text()
    assert text.count(old) == 1, f"control: {old!r} once in {path}"
    (src / path).write_text(text.replace(old, new))
    assert main(["check", str(src)]) == 1
    out = capsys.readouterr().out
    assert named in out
    assert " 1 differences" in out  # only that one


def test_a_bad_source_directory_is_refused(tmp_path, capsys):
    assert main(["check", str(tmp_path)]) == 2
    assert "no vllm package" in capsys.readouterr().err


def _tree(tmp_path: Path, files: dict[str, str]) -> SourceTree:
    for rel, text in {"vllm/__init__.py": "", **files}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return SourceTree.locate(tmp_path)


def test_lookup_follows_imports_base_classes_and_self_attributes(tmp_path):
    tree = _tree(tmp_path, {
        "vllm/base.py": (
            "class Base:\n"
            "    level: int = 0\n"
            "    def __init__(self, pool):\n"
            "        self.pool, self.size = pool, 1\n"
            "    def free(self, request, *, delay=False): ...\n"
            "    @property\n"
            "    def busy(self): ...\n"),
        "vllm/impl.py": (
            "from typing import TYPE_CHECKING\n"
            "from . import base\n"
            "from .base import *\n"
            "if TYPE_CHECKING:\n"
            "    from .typing_only import Hidden\n"
            "class Manager(base.Base):\n"
            "    @staticmethod\n"
            "    def name(kind): ...\n"
            "    if True:\n"
            "        def maybe(self): ...\n"),
        "vllm/api.py": "from vllm.impl import Manager as Exported, Base\n",
    })

    def problems(qualname, kind, module="vllm.api", **kw):
        return check_internal(tree, Internal(module, qualname, kind, **kw))

    assert problems("Exported", "class") == []
    assert problems("Base", "class") == []  # through the star import
    assert problems("Exported.free", "method", params=("request", "delay")) == []
    assert problems("Exported.pool", "attribute") == []  # self.pool in the base's __init__
    assert problems("Exported.size", "attribute") == []  # tuple target
    assert problems("Exported.level", "attribute") == []  # class-level annotation
    assert problems("Exported.busy", "attribute") == []  # a property
    assert problems("Exported.name", "method", params=("kind",), exact=True) == []  # static
    assert problems("Exported.maybe", "method") == []  # defined inside an if block
    assert problems("Exported.free", "method", params=("request", "num_tokens")) == [
        "vllm.api.Exported.free: parameter num_tokens not accepted"]
    assert problems("Exported.free", "method", params=("request",), exact=True) == [
        "vllm.api.Exported.free: parameter delay is not taken by the plugin's fixed "
        "signature (request)"]
    assert problems("Exported.busy", "method") == [
        "vllm.api.Exported.busy: is a property, expected a method"]
    assert problems("Hidden", "class", module="vllm.impl") == [
        "vllm.impl.Hidden: missing"]  # TYPE_CHECKING imports do not exist at run time


def test_a_module_this_python_cannot_parse_is_named(tmp_path, capsys):
    _tree(tmp_path, {"vllm/new.py": "def f(:\n    pass\n"})
    assert main(["check", str(tmp_path)], internals=(Internal("vllm.new", "f", "function"),)) == 1
    out = capsys.readouterr().out
    assert "vllm.new.f: missing" in out
    assert "vllm.new: cannot be read (" in out and "SyntaxError" in out


def test_an_internal_that_moved_is_found_in_either_module(tmp_path):
    """0.33 moved the KV-cache planning functions out of kv_cache_utils: either place passes."""
    check = Internal(KV_PLANNING_MODULES, "_check_enough_kv_cache_memory", "function",
                     params=("available_memory",))
    signature = "def _check_enough_kv_cache_memory(available_memory): ...\n"
    for where in ("kv_cache_planning", "kv_cache_utils"):
        tree = _tree(tmp_path / where, {f"vllm/v1/core/{where}.py": signature})
        assert check_internal(tree, check) == []
    tree = _tree(tmp_path / "neither", {"vllm/v1/core/kv_cache_utils.py": ""})
    assert check_internal(tree, check) == [
        "vllm.v1.core.kv_cache_planning|vllm.v1.core.kv_cache_utils."
        "_check_enough_kv_cache_memory: missing"]


@pytest.mark.parametrize("version, ok", [
    ("0.32.0", True), ("0.32.3", True), ("0.33.0", True), ("0.33.1", True),
    ("0.34.0", False), ("0.31.2", False), ("0.330.0", False),
])
def test_supported_vllm_versions(version, ok):
    if ok:
        check_vllm_version(version)
    else:
        with pytest.raises(UnsupportedConfigError, match=f"found vLLM {version}"):
            check_vllm_version(version)


@pytest.mark.parametrize("connector", [
    "OffloadingConnector", "SimpleCPUOffloadConnector", "LMCacheConnectorV1", "NixlConnector",
    "--kv-offloading-size",
])
def test_kv_connectors_are_refused_by_name(connector, monkeypatch):
    from vllm.config import CacheConfig, KVTransferConfig, VllmConfig

    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    check_engine_config(VllmConfig())  # control: the same config without a connector
    if connector.startswith("--"):  # vLLM derives an OffloadingConnector from it
        config = VllmConfig(cache_config=CacheConfig(kv_offloading_size=1.0))
        connector = "OffloadingConnector"
    else:
        config = VllmConfig(kv_transfer_config=KVTransferConfig(kv_connector=connector,
                                                                kv_role="kv_both"))
    with pytest.raises(UnsupportedConfigError, match="kv_eviction cannot run with") as err:
        check_engine_config(config)
    assert f"kv_transfer_config.kv_connector={connector}" in str(err.value)


def test_the_installed_vllm_plans_kv_caches_in_kv_cache_utils():
    module = kv_planning_module()
    assert module.__name__ == "vllm.v1.core.kv_cache_utils"  # 0.32
    assert callable(module._check_enough_kv_cache_memory)


def test_the_capacity_check_is_replaced_where_get_kv_cache_configs_looks_it_up(monkeypatch):
    """vLLM 0.33's layout, faked: ``get_kv_cache_configs`` and the check it calls live in
    ``kv_cache_planning``, which the engine core imports it from. Prefill eviction's check is
    in effect there for the one call, and vLLM's is back afterwards."""
    import vllm.v1.engine.core as core

    from vllm_kvevict.adapter import _install_capacity_check

    planning = types.ModuleType(KV_PLANNING_MODULES[0])

    def vllm_check(available, get_needed, max_model_len, estimate):
        if get_needed() > available:
            raise ValueError("To serve at least one request with the model's max seq len ...")

    in_effect = []

    def get_kv_cache_configs(vllm_config, kv_cache_specs, available_memory, global_groups):
        check = planning._check_enough_kv_cache_memory  # a global of its module, as in vLLM
        in_effect.append(check)
        check(available_memory[0], lambda: 8192 * 10, 8192, lambda memory: memory // 10)
        return ["kv cache config"]

    planning._check_enough_kv_cache_memory = vllm_check
    planning.get_kv_cache_configs = get_kv_cache_configs
    monkeypatch.setitem(sys.modules, planning.__name__, planning)
    monkeypatch.setattr(core, "get_kv_cache_configs", get_kv_cache_configs)
    _install_capacity_check()
    assert core.get_kv_cache_configs is not get_kv_cache_configs

    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    spec = FullAttentionSpec(block_size=32, num_kv_heads=2, head_size=16, dtype=torch.float32)
    vllm_config = SimpleNamespace(
        cache_config=SimpleNamespace(block_size=32),
        scheduler_config=SimpleNamespace(max_num_batched_tokens=256),
        additional_config={"kv_eviction": {"policy": "snapkv", "budget": 0.1,
                                           "prefill_eviction": True}})
    # a pool of 2,048 tokens < max_model_len 8,192, but it holds the peak (1,152 tokens)
    assert core.get_kv_cache_configs(vllm_config, [{"l0": spec}], [2048 * 10], []) == [
        "kv cache config"]
    assert isinstance(in_effect[0], functools.partial)
    assert in_effect[0].func is check_prefill_capacity
    assert in_effect[0].args[2] is vllm_check
    assert planning._check_enough_kv_cache_memory is vllm_check  # restored
    with pytest.raises(ValueError, match="max seq len"):  # without prefill eviction: vLLM's
        core.get_kv_cache_configs(SimpleNamespace(additional_config=None), [{"l0": spec}],
                                  [2048 * 10], [])
