"""Prefill eviction's memory bound: the peak a request can hold, the relaxed startup check of
vLLM's KV pool against it, and requests whose options would exceed what the pool was sized for."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from vllm_kvevict.adapter.startup_checks import UnsupportedConfigError, check_prefill_capacity
from vllm_kvevict.config import EvictionConfig

BS = 32


def _vllm_config(max_len=8192, chunk=256, extra=None):
    return SimpleNamespace(
        cache_config=SimpleNamespace(block_size=BS),
        scheduler_config=SimpleNamespace(max_num_batched_tokens=chunk),
        model_config=SimpleNamespace(max_model_len=max_len),
        additional_config={"kv_eviction": extra} if extra is not None else None,
    )


def test_peak_is_the_budget_plus_one_chunk_with_prefill_eviction_else_the_whole_sequence():
    on = EvictionConfig(policy="snapkv", budget=0.1, prefill_eviction=True)
    assert on.peak_blocks(8192, 256, BS) == math.ceil(820 / BS) + 256 // BS + 2
    assert on.peak_blocks(8192, 8, BS) == math.ceil(820 / BS) + 1 + 2  # interval 16 < one block
    off = EvictionConfig(policy="snapkv", budget=0.1)
    assert off.peak_blocks(8192, 256, BS) == 256  # the prompt is whole before any decision
    assert EvictionConfig(prefill_eviction=True).peak_blocks(8192, 256, BS) == 256  # policy none
    tokens = EvictionConfig(policy="h2o", budget_tokens=512, prefill_eviction=True)
    assert tokens.peak_blocks(100_000, 256, BS) == 16 + 8 + 2
    assert tokens.peak_blocks(300, 256, BS) == math.ceil(300 / BS)  # never above the sequence


def _vllm_refuses(available, get_needed, max_len, estimate):
    if get_needed() > available:
        raise ValueError("To serve at least one request with the model's max seq len ...")


@pytest.mark.parametrize("pool_tokens, ok", [(2048, True), (1024, False)])
def test_a_pool_smaller_than_max_model_len_starts_when_the_peak_fits(pool_tokens, ok):
    config = EvictionConfig(policy="snapkv", budget=0.1, prefill_eviction=True)
    bytes_per_token = 10
    args = (pool_tokens * bytes_per_token, lambda: 8192 * bytes_per_token, 8192,
            lambda memory: memory // bytes_per_token)
    peak = config.peak_blocks(8192, 256, BS) * BS  # (26 + 8 + 2) blocks: 1,152 tokens
    assert peak == 1152
    if ok:
        check_prefill_capacity(_vllm_config(), config, _vllm_refuses, *args)
    else:
        with pytest.raises(UnsupportedConfigError, match="kv_eviction.prefill_eviction.*holds up to 1152"):
            check_prefill_capacity(_vllm_config(), config, _vllm_refuses, *args)
    # no memory at all stays vLLM's own error
    with pytest.raises(ValueError, match="max seq len"):
        check_prefill_capacity(_vllm_config(), config, _vllm_refuses, 0, *args[1:])


@pytest.mark.parametrize("override, field", [
    ({"budget": 0.5}, "kv_eviction.budget"),
    ({"prefill_eviction": False}, "kv_eviction.prefill_eviction"),
    ({"policy": "none"}, "kv_eviction.prefill_eviction"),
])
def test_requests_may_not_hold_more_than_the_server_default_with_prefill_eviction(override, field):
    from vllm.exceptions import VLLMValidationError

    from vllm_kvevict.adapter import validate_request

    server = _vllm_config(extra={"policy": "snapkv", "budget": 0.25, "prefill_eviction": True})
    for fine in ({"budget": 0.1}, {"policy": "h2o"}, {"budget_tokens": 256}):
        validate_request(server, SimpleNamespace(extra_args={"kv_eviction": fine}))
    with pytest.raises(VLLMValidationError, match=field):
        validate_request(server, SimpleNamespace(extra_args={"kv_eviction": override}))
    # without prefill eviction on the server the pool holds max_model_len: anything goes
    plain = _vllm_config(extra={"policy": "snapkv", "budget": 0.25})
    validate_request(plain, SimpleNamespace(extra_args={"kv_eviction": {"budget": 1.0}}))


def test_prefill_eviction_needs_chunked_prefill():
    from vllm_kvevict.adapter.startup_checks import check_engine_config

    config = SimpleNamespace(
        speculative_config=None, parallel_config=SimpleNamespace(), model_config=None,
        cache_config=SimpleNamespace(cache_dtype="auto"), use_v2_model_runner=False,
        scheduler_config=SimpleNamespace(enable_chunked_prefill=False),
        additional_config={"kv_eviction": {"policy": "snapkv", "prefill_eviction": True}})
    with pytest.raises(UnsupportedConfigError, match="prefill_eviction without chunked prefill"):
        check_engine_config(config)
    config.scheduler_config.enable_chunked_prefill = True
    check_engine_config(config)
