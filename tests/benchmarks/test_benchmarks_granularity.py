"""bench_granularity.py: its attention twin and its decisions at each granularity (no model)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import bench_granularity as bg  # noqa: E402
import pytest
import torch

L, HQ, HKV, T, D = 2, 4, 2, 200, 8


def twin(hidden=None):
    from transformers.models.llama import modeling_llama

    ref = bg.Reference.__new__(bg.Reference)  # the attention only, no model
    ref.hq, ref.hkv, ref.repeat_kv = HQ, HKV, modeling_llama.repeat_kv
    ref.capture, ref.hidden = None, hidden
    return ref


def qkv(q_len, k_len, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, HQ, q_len, D, generator=g), torch.randn(1, HKV, k_len, D, generator=g),
            torch.randn(1, HKV, k_len, D, generator=g))


def test_attention_twin_equals_transformers_eager():
    from transformers.models.llama import modeling_llama

    q, k, v = qkv(5, 5)
    mask = torch.full((5, 5), torch.finfo(torch.float32).min).triu(1)[None, None]
    module = SimpleNamespace(num_key_value_groups=HQ // HKV, training=False, layer_idx=0)
    expect, _ = modeling_llama.eager_attention_forward(module, q, k, v, mask, scaling=D ** -0.5)
    got, _ = twin()._attention(module, q, k, v, mask, scaling=D ** -0.5)
    assert torch.allclose(got, expect, atol=1e-6)
    got, _ = twin()._attention(module, q, k, v, None, scaling=D ** -0.5)  # causal without a mask
    assert torch.allclose(got, expect, atol=1e-6)


def test_hidden_keys_equal_attention_over_the_kept_keys_per_head():
    q, k, v = qkv(1, 12, seed=1)
    hidden = torch.zeros(1, HQ, 10, dtype=torch.bool)  # [L, Hq, T0]: prompt of 10, 2 new keys
    hidden[0, 0, [1, 4]] = True
    hidden[0, 3, 7] = True
    module = SimpleNamespace(layer_idx=0)
    got, _ = twin(hidden)._attention(module, q, k, v, None, scaling=1.0)
    for h in range(HQ):
        keep = [j for j in range(12) if j >= 10 or not hidden[0, h, j]]
        kv = h // (HQ // HKV)
        p = torch.softmax(q[0, h, 0] @ k[0, kv, keep].T, -1)
        assert torch.allclose(got[0, 0, h], p @ v[0, kv, keep], atol=1e-6)


def stats(seed=0):
    g = torch.Generator().manual_seed(seed)
    attn = torch.softmax(torch.randn(L, HQ, bg.WINDOW, T, generator=g) * 3, -1)
    return {"window_attn": attn, "value_proj_norm": torch.rand(L, HQ, T, generator=g) + 0.1}


@pytest.mark.parametrize("policy", ["snapkv", "laprox", "hybridkv", "streamingllm"])
@pytest.mark.parametrize("budget", [0.25, 0.05])
def test_each_granularity_keeps_its_budget_in_its_unit(policy, budget):
    from diagnose_natural import protected_mask

    kept = bg.decisions(policy, stats(), HKV, [budget])
    for gran, (bs, per_head) in bg.GRANULARITIES.items():
        k = kept[gran, budget]
        assert k.shape == (L, HKV, T)
        protected, keep = protected_mask("new", budget, math.ceil(T / bs), T, bs)
        prot_tokens = protected.repeat_interleave(bs)[:T]
        assert k[:, :, prot_tokens].all(), gran  # protection holds in every (layer, head)
        counts = k.sum(-1)
        if per_head:  # each (layer, KV head) keeps exactly its own ceil(budget * T) tokens
            assert (counts == keep).all()
            if policy != "streamingllm":  # recency is the same in every head
                assert not (k == k[:1, :1]).all(), "per-head sets differ on random statistics"
        else:  # one set shared by every layer and head, whole units (last one partial)
            assert (k == k[:1, :1]).all()
            units = torch.nn.functional.pad(k[0, 0], (0, -T % bs), value=True).reshape(-1, bs)
            units = units.clone()
            units[-1, T % bs or bs:] = units[-1, 0]  # padding follows the last unit's fate
            assert (units.all(-1) | ~units.any(-1)).all(), "a unit is kept whole or not at all"
            assert int(units.all(-1).sum()) == max(keep, int(protected.sum()))
