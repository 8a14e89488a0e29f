"""LaProx's projected-value norms on a real engine: what scoring gathers is what the cache
holds (the unit side, random write sequences, is ``tests/unit/test_value_norms.py``)."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import make_llm, passkey_prompt, sampling, shutdown
from vllm_kvevict.kernels import dispatch

from vllm_kvevict.adapter import statistics

pytestmark = pytest.mark.engine


def test_a_laprox_server_scores_with_the_norms_written_with_the_tokens(monkeypatch):
    """On a LaProx server every layer's norms gathered at scoring equal the norms recomputed
    from the cache (prefix caching on: the second request reuses blocks the first wrote)."""
    compared = []
    original = statistics._value_proj_norm

    def spy(inputs, b):
        original(inputs, b)
        assert inputs.value_norms is not None
        want = dispatch.value_proj_norm(inputs.gram(), inputs.kv, b.block_table, b.seq_lens)
        for i, sr in enumerate(b.members):
            got = sr.layers["value_proj_norm"][-1]
            torch.testing.assert_close(got, want[i, :, :sr.num_tokens], atol=1e-4, rtol=1e-4)
            compared.append(sr.num_tokens)

    monkeypatch.setattr(statistics, "_value_proj_norm", spy)
    monkeypatch.setattr(statistics, "MEASURED", tuple(  # read at every layer call
        statistics.Statistic(s.name, s.fields, spy, prefill_only=True)
        if s.name == "value_proj_norm" else s for s in statistics.MEASURED))
    llm = make_llm({"kv_eviction": {"policy": "laprox", "budget": 0.25}})
    try:
        prompt = passkey_prompt("40404", repeats=12)
        for _ in range(2):
            out = llm.generate([prompt], sampling(max_tokens=8), use_tqdm=False)[0]
            assert "40404" in out.outputs[0].text
    finally:
        shutdown(llm)
    assert len(compared) >= 2 * 30  # both requests, every layer
