"""``smollm2-vlm``: SmolLM2-135M in the Idefics3 (SmolVLM) layout, with an *untrained* vision tower.

A multimodal model to exercise the plugin on real image requests without downloading anything:
the trained SmolLM2 text model (its weights copied exactly into ``model.text_model``; the
embedding matrix, tied to ``lm_head``, gains rows for the image tokens) behind a tiny seeded
SigLIP-style vision tower and pixel-shuffle connector that were never trained. Images therefore
change the prompt's K/V realistically (placeholder spans, encoder cache, prefix hashing) but carry
no meaning: the model cannot describe them.

Layout (``Idefics3ForConditionalGeneration``, served by vLLM's ``idefics3`` module): an image is
resized to ``IMAGE_SIZE`` px (no splitting), cut into ``PATCH_SIZE`` patches ((256/16)² = 256),
and the connector's pixel shuffle (``SCALE_FACTOR`` 2) merges them into ``IMAGE_SEQ_LEN`` = 64
embeddings, which replace the 64 ``<image>`` tokens of
``<fake_token_around_image><global-img><image>×64<fake_token_around_image>``.
"""

from __future__ import annotations

import os
from pathlib import Path

IMAGE_SIZE = 256
PATCH_SIZE = 16
SCALE_FACTOR = 2
IMAGE_SEQ_LEN = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2  # 64 embeddings per image
#: the vision tower: tiny on purpose (≈0.4 M parameters, loads in no time)
VISION = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
              image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
SEED = 0

#: tokens the Idefics3 processor and vLLM's prompt replacement expect as single tokens: the image
#: wrapper, the image placeholder, the end of turn, the global-image tag and the tile tags of
#: image splitting (6×6 tiles at most)
IMAGE_TOKENS = (
    "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
    *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)),
)

#: SmolLM2's ChatML template (so the instruction-tuned text model sees its own format), extended
#: to OpenAI-style content lists: ``{"type": "image"}`` parts become ``<image>``, which the
#: processor expands to the image's placeholder tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_vlm(text_dir: Path, out: Path, *, seed: int = SEED) -> None:
    """Write the ``smollm2-vlm`` HF folder (config, weights, tokenizer, processor, template).

    Args:
        text_dir: the prepared SmolLM2 folder (float32 ``LlamaForCausalLM`` and its tokenizer).
        out: the folder to write (created; the caller renames it into place).
        seed: seeds the vision tower, the connector and the new embedding rows.
    """
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3Processor,
        Idefics3VisionConfig,
    )

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(str(text_dir))
    text = AutoModelForCausalLM.from_pretrained(str(text_dir), dtype=torch.float32)
    base_vocab = text.config.vocab_size
    tokenizer.add_special_tokens({"additional_special_tokens": list(IMAGE_TOKENS)},
                                 replace_extra_special_tokens=False)
    vocab = len(tokenizer)
    ids = tokenizer.convert_tokens_to_ids(list(IMAGE_TOKENS))
    if sorted(ids) != list(range(base_vocab, vocab)):
        raise RuntimeError(f"image tokens got ids {ids}, expected {base_vocab}..{vocab - 1}")

    text_config = text.config.to_dict()
    text_config.update(vocab_size=vocab)
    text_config.pop("_name_or_path", None)  # the folder is the same wherever the cache lives
    config = Idefics3Config(
        text_config=text_config,
        vision_config=Idefics3VisionConfig(**VISION).to_dict(),
        scale_factor=SCALE_FACTOR,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=text.config.pad_token_id,
        tie_word_embeddings=text.config.tie_word_embeddings,
    )
    config.architectures = ["Idefics3ForConditionalGeneration"]
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).to(torch.float32).eval()

    with torch.no_grad():
        embed = text.get_input_embeddings().weight  # [V, hidden]
        state = {**text.model.state_dict(), "embed_tokens.weight": _grow(embed, vocab)}
        model.model.text_model.load_state_dict(state, strict=True)  # SmolLM2's weights, exactly
        if not text.config.tie_word_embeddings:
            model.lm_head.weight.copy_(_grow(text.lm_head.weight, vocab))
        _match_text_scale(model, embed)

    model.generation_config = GenerationConfig.from_pretrained(str(text_dir))
    model.save_pretrained(str(out))
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": IMAGE_SIZE}, max_image_size={"longest_edge": IMAGE_SIZE},
        do_image_splitting=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    processor = Idefics3Processor(image_processor, tokenizer, image_seq_len=IMAGE_SEQ_LEN,
                                  chat_template=CHAT_TEMPLATE)
    # the processor re-registers its three tokens as the only extra special ones: list them all
    tokenizer.add_special_tokens({"additional_special_tokens": list(IMAGE_TOKENS)},
                                 replace_extra_special_tokens=True)
    processor.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def _grow(weight, rows: int):
    """``weight`` [V, hidden] with ``rows - V`` rows appended: the mean row plus small seeded
    noise (the new tokens are never sampled in practice, and the ``<image>`` rows are replaced by
    the connector's output before the decoder)."""
    import torch

    extra = weight.mean(0) + weight.std(0) * 0.1 * torch.randn(rows - weight.shape[0], weight.shape[1])
    return torch.cat([weight, extra])


def _match_text_scale(model, embed) -> None:
    """Scale the untrained connector so image embeddings have the text embeddings' RMS (an
    untrained projection would otherwise hand the decoder vectors of an arbitrary scale).

    Args:
        model: the ``Idefics3ForConditionalGeneration`` being built (seeded RNG state).
        embed: ``[V, hidden]`` SmolLM2's input embeddings.
    """
    import torch

    pixels = torch.rand(4, 3, IMAGE_SIZE, IMAGE_SIZE) * 2 - 1  # normalised pixels lie in [-1, 1]
    mask = torch.ones(4, IMAGE_SIZE // PATCH_SIZE, IMAGE_SIZE // PATCH_SIZE, dtype=torch.bool)
    hidden = model.model.vision_model(pixel_values=pixels, patch_attention_mask=mask).last_hidden_state
    features = model.model.connector(hidden)  # [4, IMAGE_SEQ_LEN, text hidden]
    ratio = embed.pow(2).mean().sqrt() / features.pow(2).mean().sqrt()
    model.model.connector.modality_projection.proj.weight.mul_(ratio)
