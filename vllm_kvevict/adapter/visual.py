"""Where a multimodal request's image tokens sit, in tokens and in blocks.

Multimodal methods (HAE, HybridKV) rank image blocks apart from text, and the eviction report
counts evicted tokens by modality; both read the spans here. One overlap rule throughout: a
block mixing text and image tokens counts each token by its own modality.
"""

from __future__ import annotations

import torch


def visual_spans(request) -> list[tuple[int, int]]:
    """``(offset, length)`` of each run of prompt tokens that a multimodal encoder fills.

    vLLM's ``PlaceholderRange`` (``request.mm_features[i].mm_position``) covers an item's
    whole replacement, wrapper tokens included (Idefics3:
    ``<fake_token_around_image><global-img>`` + 64 ``<image>`` + ``<fake_token_around_image>``,
    67 tokens); its ``is_embed`` mask marks the positions that take encoder embeddings (the 64
    ``<image>`` tokens). The wrappers are ordinary text-token embeddings, so only the embedded
    runs count as visual (one run per image tile; the whole range when ``is_embed`` is None).
    """
    spans = []
    for feature in getattr(request, "mm_features", None) or []:
        pos = feature.mm_position
        if pos.is_embed is None:
            spans.append((pos.offset, pos.length))
        else:
            spans.extend((start, end + 1 - start) for start, end in pos.extract_embeds_range())
    return [(int(offset), int(length)) for offset, length in spans if length > 0]


def visual_token_count(spans: list[tuple[int, int]], positions, block_size: int) -> int:
    """Visual tokens held by the blocks at ``positions`` (each token by its own modality)."""
    total = 0
    for p in positions:
        lo, hi = p * block_size, (p + 1) * block_size
        total += sum(max(0, min(hi, off + n) - max(lo, off)) for off, n in spans)
    return total


def visual_tokens(request, positions, block_size: int) -> int:
    """:func:`visual_token_count` of the request's own spans (0 for a text request)."""
    spans = visual_spans(request)
    return visual_token_count(spans, positions, block_size) if spans else 0


def visual_block_shares(request, positions: list[int], block_size: int) -> torch.Tensor | None:
    """``[nb]`` float32: the share of each block's tokens that are multimodal embedding tokens
    (1: an all-image block, 0: text only, between: a mixed block); None for a text request."""
    spans = visual_spans(request)
    if not spans:
        return None
    bs = block_size
    return torch.tensor([visual_token_count(spans, (p,), bs) / bs for p in positions],
                        dtype=torch.float32)
