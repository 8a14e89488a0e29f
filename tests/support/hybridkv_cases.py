"""HybridKV's crafted case: 24 tokens in blocks of 4, an image over blocks 2 and 3, attention
rows of a static (text-looking), a dynamic (image-looking) and a local head."""

from __future__ import annotations

import torch

from vllm_kvevict.policies.base import RequestStatistics

T, BS, W = 24, 4, 4  # blocks 0..5; window = tokens 20..23; sink_tokens 4 -> candidates 4..19
VISUAL = torch.zeros(T, dtype=torch.bool)
VISUAL[8:16] = True  # blocks 2 and 3
TEXT_CAND = [4, 5, 6, 7, 16, 17, 18, 19]
VIS = list(range(8, 16))


def static_row() -> torch.Tensor:
    """Looks at text: 0.08 per text candidate, a little (distinct) on visual tokens."""
    r = torch.zeros(T)
    r[TEXT_CAND] = 0.08
    r[VIS] = 0.01 + 0.001 * torch.arange(8)
    r[0] = 1 - r.sum()
    return r


def dynamic_row() -> torch.Tensor:
    """Looks at the image; most mass on the sink, which must not count as 'text'."""
    r = torch.zeros(T)
    r[VIS] = 0.03
    r[TEXT_CAND] = 0.005
    r[0] = 1 - r.sum()
    return r


def local_row() -> torch.Tensor:
    """Image-looking head that also attends its own neighbourhood (the window) heavily."""
    r = dynamic_row()
    r[20:24] = 0.1
    r[0] = 0
    r[0] = 1 - r.sum()
    return r


def crafted_stats(rows, visual=VISUAL) -> RequestStatistics:
    """rows[l][h] -> every window query of (layer l, head h) has that attention row."""
    attn = torch.stack([torch.stack([r.expand(W, T) for r in layer]) for layer in rows])
    nb = T // BS
    return RequestStatistics(
        block_size=BS, block_index=torch.arange(nb), num_tokens=T, num_kv_heads=len(rows[0]),
        parked=torch.zeros(nb, dtype=torch.bool), phase="prefill", window_attn=attn,
        visual=visual,
    )
