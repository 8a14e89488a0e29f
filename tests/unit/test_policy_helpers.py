"""Reference statistics against brute-force loops on small random tensors."""

from __future__ import annotations

import math

import pytest
import torch
from vllm_kvevict.kernels import reference as R

from vllm_kvevict.policies import common as stats

GQA = [(2, 2), (6, 2)]  # (Hq, Hkv): group sizes 1 and 3


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


@pytest.mark.parametrize("hq,hkv", GQA)
@pytest.mark.parametrize("offset", [None, 3, "tensor"])
def test_window_attention(hq, hkv, offset):
    g = torch.Generator().manual_seed(0)
    t, w, d = 11, 4, 5
    q = torch.randn(w, hq, d, generator=g)
    k = torch.randn(t, hkv, d, generator=g)
    scale = 0.37
    if offset is None:
        pos = [t - w + i for i in range(w)]
        arg = None
    elif offset == "tensor":
        pos = [2, 5, 6, 10]
        arg = torch.tensor(pos)
    else:
        pos = [offset + i for i in range(w)]
        arg = offset
    out = R.dense_window_attention(q, k, scale, arg)
    assert out.shape == (hq, w, t)
    for h in range(hq):
        kv = h // (hq // hkv)
        for i in range(w):
            visible = [float(q[i, h] @ k[j, kv]) * scale for j in range(pos[i] + 1)]
            expect = _softmax(visible) + [0.0] * (t - pos[i] - 1)
            assert torch.allclose(out[h, i], torch.tensor(expect), atol=1e-5)


@pytest.mark.parametrize("hq,hkv", GQA)
def test_decode_attention(hq, hkv):
    g = torch.Generator().manual_seed(1)
    t, d = 9, 4
    q = torch.randn(hq, d, generator=g)
    k = torch.randn(t, hkv, d, generator=g).to(torch.bfloat16)
    exclude = torch.zeros(t, dtype=torch.bool)
    exclude[[2, 5]] = True
    out = R.dense_decode_attention(q, k, 0.5)
    out_ex = R.dense_decode_attention(q, k, 0.5, exclude=exclude)
    kf = k.float()
    for h in range(hq):
        kv = h // (hq // hkv)
        logits = [float(q[h] @ kf[j, kv]) * 0.5 for j in range(t)]
        assert torch.allclose(out[h], torch.tensor(_softmax(logits)), atol=1e-5)
        kept = [j for j in range(t) if not exclude[j]]
        probs = _softmax([logits[j] for j in kept])
        expect = torch.zeros(t)
        expect[kept] = torch.tensor(probs)
        assert torch.allclose(out_ex[h], expect, atol=1e-5)


@pytest.mark.parametrize("hq,hkv", GQA)
def test_value_proj_norm_matches_projection(hq, hkv):
    g = torch.Generator().manual_seed(2)
    t, d, hidden = 7, 4, 10
    values = torch.randn(t, hkv, d, generator=g)
    o_proj = torch.nn.Linear(hq * d, hidden, bias=False)
    with torch.no_grad():
        o_proj.weight.copy_(torch.randn(hidden, hq * d, generator=g))
    gram = R.wo_gram(o_proj.weight, hq)
    out = R.dense_value_proj_norm(values, gram)
    assert out.shape == (hq, t)
    for h in range(hq):
        kv = h // (hq // hkv)
        for j in range(t):
            # push v_j through o_proj with every other head's slot zeroed
            x = torch.zeros(hq * d)
            x[h * d:(h + 1) * d] = values[j, kv]
            expect = o_proj(x).norm().item()
            assert out[h, j].item() == pytest.approx(expect, rel=1e-4, abs=1e-5)


def test_wo_gram_rejects_bad_width():
    with pytest.raises(ValueError):
        R.wo_gram(torch.zeros(4, 10), 3)


@pytest.mark.parametrize("t", [12, 10])  # full and partial last block
def test_key_bounds(t):
    g = torch.Generator().manual_seed(3)
    hkv, d, bs = 2, 3, 4
    k = torch.randn(t, hkv, d, generator=g)
    kmin, kmax = R.dense_key_bounds(k, bs)
    nb = -(-t // bs)
    assert kmin.shape == kmax.shape == (hkv, nb, d)
    for h in range(hkv):
        for b in range(nb):
            toks = range(b * bs, min((b + 1) * bs, t))
            for e in range(d):
                vals = [k[j, h, e].item() for j in toks]
                assert kmin[h, b, e].item() == min(vals)
                assert kmax[h, b, e].item() == max(vals)


@pytest.mark.parametrize("hq,hkv", GQA)
def test_quest_block_bounds(hq, hkv):
    g = torch.Generator().manual_seed(4)
    t, d, bs = 10, 3, 4
    q = torch.randn(hq, d, generator=g)
    k = torch.randn(t, hkv, d, generator=g)
    kmin, kmax = R.dense_key_bounds(k, bs)
    out = R.quest_block_bounds(q, kmin, kmax)
    nb = kmin.shape[1]
    assert out.shape == (hq, nb)
    for h in range(hq):
        kv = h // (hq // hkv)
        for b in range(nb):
            expect = sum(
                max(q[h, e] * kmin[kv, b, e], q[h, e] * kmax[kv, b, e]).item() for e in range(d)
            )
            assert out[h, b].item() == pytest.approx(expect, abs=1e-5)
            # an upper bound on every real key of the block
            best = max(float(q[h] @ k[j, kv]) for j in range(b * bs, min((b + 1) * bs, t)))
            assert out[h, b].item() >= best - 1e-5


@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_pool_tokens(kernel):
    g = torch.Generator().manual_seed(5)
    x = torch.rand(2, 3, 9, generator=g)
    out = stats.pool_tokens(x, kernel)
    assert out.shape == x.shape
    r = kernel // 2
    for i in range(2):
        for h in range(3):
            for j in range(9):
                window = [x[i, h, m].item() for m in range(j - r, j + r + 1) if 0 <= m < 9]
                assert out[i, h, j].item() == pytest.approx(sum(window) / kernel, abs=1e-6)


def test_pool_tokens_rejects_even_kernel():
    with pytest.raises(ValueError):
        stats.pool_tokens(torch.zeros(5), 4)


@pytest.mark.parametrize("reduce", ["mean", "sum", "max"])
def test_group_heads(reduce):
    x = torch.rand(2, 6, 5)
    out = stats.group_heads(x, 2, reduce, dim=1)
    fn = {"mean": torch.mean, "sum": torch.sum, "max": torch.amax}[reduce]
    for g in range(2):
        assert torch.allclose(out[:, g], fn(x[:, 3 * g:3 * g + 3], dim=1))
    with pytest.raises(ValueError):
        stats.group_heads(torch.zeros(5, 3), 2)
