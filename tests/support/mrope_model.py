"""A tiny M-RoPE vision-language model folder, built offline in a few seconds.

``build_tiny_mrope(out_dir)`` writes a PaddleOCR-VL checkpoint: transformers'
``PaddleOCRVLForConditionalGeneration`` (``model_type`` ``paddleocr_vl``), which vLLM 0.32 serves
with its ``paddleocr_vl`` module (an Ernie-4.5 text model with multimodal rotary embeddings,
``SupportsMRoPE``). The weights are random (``torch.manual_seed``): the model says nothing
sensible. It exists so the engine tests can compare vLLM with transformers on a model whose
text positions are 3-D: an image's tokens take (t, h, w) grid positions and the text after it
continues from the largest of them, so its rotary positions are smaller than its token index.

Sizes: 2 text layers (hidden 128, 2 query heads and 1 KV head of 64, ``mrope_section``
[8, 12, 12], which sums to head_dim / 2), a 1-layer vision tower (hidden 64, 14-pixel
patches), images resized to at most 112x112 pixels, i.e. at most 8x8 patches = 16 image tokens
after the 2x2 merge. The text weights are drawn with std ``INIT_STD`` = 0.1 (transformers'
default 0.02 leaves attention almost uniform): hiding keys or moving rotary positions then
changes the logits measurably. The tokenizer is byte-level: one token per byte of text (a few hundred
characters give a few hundred tokens), after the special tokens PaddleOCR-VL's processor and
chat template use.

Same ``seed``, same folder, byte for byte in the weights.
"""

from __future__ import annotations

from pathlib import Path

#: the special tokens, ids 0..9 in this order; the 256 byte tokens follow
SPECIAL_TOKENS = (
    "<unk>", "<s>", "</s>", "<pad>",
    "<|IMAGE_PLACEHOLDER|>", "<|IMAGE_START|>", "<|IMAGE_END|>", "<|video_pad|>",
    "<|begin_of_sentence|>", "<|end_of_sentence|>",
)
#: the text placeholder of one image (vLLM's ``get_placeholder_str`` for PaddleOCR-VL)
IMAGE_PLACEHOLDER = "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>"
PATCH_SIZE = 14
MERGE_SIZE = 2
MAX_IMAGE_SIDE = 112  # pixels: 8 patches, 4 merged tokens per side
INIT_STD = 0.1  # of the text weights
CHAT_TEMPLATE = (
    "<|begin_of_sentence|>{% for m in messages %}{{ m['role'] | capitalize }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] in ('image', 'image_url') %}" + IMAGE_PLACEHOLDER
    + "{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}"
)


def _tokenizer():
    """Byte-level BPE without merges: the special tokens, then one token per byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):  # 256 stand-ins for the bytes
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>", extra_special_tokens={"image_token": "<|IMAGE_PLACEHOLDER|>"},
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_mrope(out_dir, seed: int = 0) -> Path:
    """Write the tiny random-weight PaddleOCR-VL folder to ``out_dir`` and return its path:
    ``config.json``, ``model.safetensors`` (float32), tokenizer, processor and chat template.
    No download; deterministic for a given ``seed``."""
    import torch
    from transformers import (
        PaddleOCRVLConfig,
        PaddleOCRVLForConditionalGeneration,
        PaddleOCRVLImageProcessorPil,
        PaddleOCRVLProcessor,
    )

    out = Path(out_dir)
    tokenizer = _tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    assert list(ids.values()) == list(range(len(SPECIAL_TOKENS))), ids

    image_processor = PaddleOCRVLImageProcessorPil(
        # PaddleOCR-VL reads these as min/max pixel counts
        size={"shortest_edge": (PATCH_SIZE * MERGE_SIZE) ** 2,
              "longest_edge": MAX_IMAGE_SIDE ** 2},
        patch_size=PATCH_SIZE, temporal_patch_size=1, merge_size=MERGE_SIZE,
    )
    processor = PaddleOCRVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                     chat_template=CHAT_TEMPLATE)

    config = PaddleOCRVLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
            max_position_embeddings=4096, initializer_range=INIT_STD,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0,
                             "mrope_section": [8, 12, 12]},
            pad_token_id=ids["<pad>"], bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
        ),
        vision_config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
            image_size=MAX_IMAGE_SIDE, patch_size=PATCH_SIZE, spatial_merge_size=MERGE_SIZE,
        ),
        image_token_id=ids["<|IMAGE_PLACEHOLDER|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|IMAGE_START|>"], vision_end_token_id=ids["<|IMAGE_END|>"],
        tie_word_embeddings=True,
    )
    config.architectures = ["PaddleOCRVLForConditionalGeneration"]

    torch.manual_seed(seed)
    model = PaddleOCRVLForConditionalGeneration(config).to(torch.float32).eval()
    model.generation_config.pad_token_id = ids["<pad>"]
    model.generation_config.eos_token_id = ids["</s>"]
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


if __name__ == "__main__":
    import sys

    print(build_tiny_mrope(sys.argv[1] if len(sys.argv) > 1 else "tiny-mrope"))
