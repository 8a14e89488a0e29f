"""Where a multimodal request's image tokens sit (``adapter/visual.py``), without an engine."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from vllm.multimodal.inputs import PlaceholderRange

from vllm_kvevict.adapter.visual import visual_block_shares, visual_spans, visual_token_count


def test_visual_spans_keep_only_embedded_runs():
    """A placeholder range's wrappers are dropped, image-splitting tiles give one span
    each, and a range without ``is_embed`` is visual as a whole."""
    def feature(offset, mask=None, length=None):
        is_embed = None if mask is None else torch.tensor([c == "x" for c in mask])
        length = len(mask) if mask is not None else length
        return SimpleNamespace(mm_position=PlaceholderRange(offset, length, is_embed))

    request = SimpleNamespace(mm_features=[
        feature(8, "..xxxx."),  # <fake><global-img> 4 x <image> <fake>
        feature(20, ".xxx.xxx\n..xxx."),  # two tiles and the global image
        feature(40, length=5),
        feature(50, "..."),  # nothing embedded
    ])
    assert visual_spans(request) == [(10, 4), (21, 3), (25, 3), (31, 3), (40, 5)]
    assert visual_spans(SimpleNamespace(mm_features=None)) == []


def test_visual_token_count_splits_mixed_blocks_by_token():
    spans = [(10, 64), (100, 3)]  # tokens 10..73 and 100..102
    assert visual_token_count(spans, [0], 32) == 22  # 10..31
    assert visual_token_count(spans, [1], 32) == 32
    assert visual_token_count(spans, [2], 32) == 10  # 64..73
    assert visual_token_count(spans, [3], 32) == 3
    assert visual_token_count(spans, [0, 1, 2, 3, 4], 32) == 67
    assert visual_token_count([], [0, 1], 32) == 0


def test_block_shares_count_each_token_by_its_modality():
    request = SimpleNamespace(mm_features=[SimpleNamespace(
        mm_position=PlaceholderRange(10, 64, None))])  # tokens 10..73
    shares = visual_block_shares(request, [0, 1, 2, 3], 32)
    assert shares.tolist() == [22 / 32, 1.0, 10 / 32, 0.0]
    assert visual_block_shares(SimpleNamespace(mm_features=None), [0], 32) is None
