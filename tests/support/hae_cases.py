"""HAE's crafted case: 24 tokens in blocks of 4, an image over tokens 4..14, attention maps
whose visual tokens fall below or above both thresholds."""

from __future__ import annotations

import torch

from vllm_kvevict.policies.base import RequestStatistics

T, BS, W = 24, 4, 4  # blocks 0..5; window queries are tokens 20..23 (text)
VISUAL = torch.zeros(T, dtype=torch.bool)
VISUAL[4:15] = True  # block 1 (4..7) visual, block 2 (8..11) visual, block 3: 12..14 visual + text 15
LOW, HIGH = [4, 5, 6, 7, 12, 13, 14], [8, 9, 10, 11]
OPTS = {"window": W, "global_threshold": 0.05, "individual_threshold": 0.05}


def crafted(token5=None, layer1_block1: float | None = None) -> torch.Tensor:
    """[L=2, Hq=2, W, T] window attention. Per query: 0.01 on each LOW visual token, 0.1 on each
    HIGH one, the rest on token 0. So g_low = 0.04, g_high = 0.4, Σg = 1.88, θ_g·Σg ≈ 0.094:
    LOW tokens are prunable, HIGH are not. ``token5`` = (head0 row, head1 row) overrides token 5."""
    a = torch.zeros(2, 2, W, T)
    a[..., LOW] = 0.01
    a[..., HIGH] = 0.1
    if token5 is not None:
        a[:, 0, :, 5] = torch.tensor(token5[0])
        a[:, 1, :, 5] = torch.tensor(token5[1])
    if layer1_block1 is not None:
        a[1, :, :, 4:8] = layer1_block1
    a[..., 0] = 1 - a.sum(-1)
    return a


def stats_for(window_attn, visual=VISUAL, phase="prefill") -> RequestStatistics:
    nb = -(-T // BS)
    return RequestStatistics(
        block_size=BS, block_index=torch.arange(nb), num_tokens=T, num_kv_heads=1,
        parked=torch.zeros(nb, dtype=torch.bool), phase=phase, window_attn=window_attn,
        visual=visual,
    )
