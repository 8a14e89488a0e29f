"""Realistic ``RequestStatistics`` for policy tests: random q/k/v/o_proj per layer turned into the
statistics a worker would measure, through the reference statistics
(``vllm_kvevict.kernels.reference``)."""

from __future__ import annotations

import torch
from vllm_kvevict.kernels import reference as R

from vllm_kvevict.policies.base import STATISTICS, RequestStatistics


def make_stats(
    *,
    layers: int = 2,
    hq: int = 6,
    hkv: int = 2,
    d: int = 4,
    tokens: int = 21,
    block_size: int = 4,
    window: int = 5,
    phase: str = "prefill",
    visual: torch.Tensor | None = None,
    block_index: torch.Tensor | None = None,
    needs=STATISTICS,
    seed: int = 0,
) -> tuple[RequestStatistics, dict]:
    """Random q/k/v/o_proj per layer turned into the statistics a worker would measure."""
    g = torch.Generator().manual_seed(seed)
    window = max(1, min(window, tokens))
    nb = -(-tokens // block_size)
    if block_index is None:
        block_index = torch.arange(nb)
    raw = {"keys": [], "values": [], "q": [], "o_proj": []}
    fields = {k: [] for k in ("window_attn", "decode_mass", "decode_peak", "value_proj_norm")}
    scale = d ** -0.5
    for _ in range(layers):
        keys = torch.randn(tokens, hkv, d, generator=g) * 2
        values = torch.randn(tokens, hkv, d, generator=g)
        q = torch.randn(window, hq, d, generator=g) * 2
        o_proj = torch.randn(8, hq * d, generator=g)
        for name, x in zip(("keys", "values", "q", "o_proj"), (keys, values, q, o_proj)):
            raw[name].append(x)
        fields["window_attn"].append(R.dense_window_attention(q, keys, scale))
        blocks = R.dense_block_attention(q[-1], keys, block_size, scale).view(hkv, hq // hkv, nb)
        fields["decode_mass"].append(blocks.sum(1))
        fields["decode_peak"].append(blocks.amax(1))
        fields["value_proj_norm"].append(R.dense_value_proj_norm(values, R.wo_gram(o_proj, hq)))
    wanted = {
        "window_attn": "window_attn" in needs and phase == "prefill",
        "decode_mass": "decode_attn" in needs,  # the engine measures the newest query always
        "decode_peak": "decode_attn" in needs,
        "value_proj_norm": "value_proj_norm" in needs and phase == "prefill",
    }
    reduce = {"decode_mass": lambda v: torch.stack(v).sum(0),
              "decode_peak": lambda v: torch.stack(v).amax(0)}
    st = RequestStatistics(
        block_size=block_size,
        block_index=block_index,
        num_tokens=tokens,
        num_kv_heads=hkv,
        parked=torch.zeros(nb, dtype=torch.bool),
        phase=phase,
        visual=visual,
        num_layers=layers,
        num_heads=hq,
        **{k: reduce.get(k, torch.stack)(v) for k, v in fields.items() if wanted[k]},
    )
    return st, raw


def decode_probs(raw: dict, layer: int) -> torch.Tensor:
    """[Hq, T] the newest query's softmax over the keys of one layer of :func:`make_stats`'s raw
    tensors: the per-token row the block statistics sum (brute-force references use it)."""
    keys, q = raw["keys"][layer], raw["q"][layer]
    return R.dense_decode_attention(q[-1], keys, keys.shape[-1] ** -0.5)
