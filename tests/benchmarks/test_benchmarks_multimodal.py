"""bench_multimodal.py's prompt layouts, checked with the folder's own processor (as vLLM
expands them)."""

from __future__ import annotations

import bench_multimodal  # noqa: E402
import pytest


@pytest.fixture(scope="module")
def processor():
    from transformers import AutoProcessor

    from vllm_kvevict.models import model_path

    return AutoProcessor.from_pretrained(str(model_path("smollm2-vlm")))


@pytest.mark.parametrize("aligned", [False, True])
def test_aligned_prompts_have_no_mixed_blocks(processor, aligned):
    """``--aligned`` puts each picture in exactly two all-image blocks and leaves no mixed
    block; the prompts as written mix notes and image tokens (the case it is compared with)."""
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    prompt, pictures, code = bench_multimodal.make_prompt(3, 6, 0.5, aligned=aligned)
    ids = processor(text=prompt, images=[pictures])["input_ids"][0]
    ids = list(ids.tolist() if hasattr(ids, "tolist") else ids)
    kinds = bench_multimodal.block_kinds(ids, image_id)
    assert sum(t == image_id for t in ids) == 6 * 64
    if aligned:
        assert kinds["mixed"] == 0 and kinds["image"] == 12
    else:
        assert kinds["mixed"] > 0
    assert f"is {code}." in prompt
