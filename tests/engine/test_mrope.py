"""Eviction on an M-RoPE model: a tiny random-weight PaddleOCR-VL (``mrope_model.py``).

M-RoPE models give each token a 3-D rotary position (t, h, w). In vLLM 0.32 that changes only
what reaches the rotary embedding: ``GPUModelRunner._prepare_inputs`` still computes
``self.positions`` (1-D: ``num_computed_tokens + query_pos``) for every model and derives
``seq_lens`` and the slot mapping (``block_table.compute_slot_mapping``) from it, while
``_calc_mrope_positions`` fills ``self.mrope_positions`` (the prompt's precomputed
``get_mrope_input_positions``, then ``num_computed_tokens + mrope_position_delta``) and
``_preprocess`` hands those to the model as ``positions``. The adapter compacts only the former
(``seq_lens − E``, slots from ``positions − E``), so RoPE keeps every token's original 3-D
position, as it keeps the 1-D one of other models.

One engine serves the module (eviction on: attention policy, 25 %); stock vLLM runs once more
in a subprocess (``stock_run.py``) for the zero-eviction identity. The HF reference is
transformers' ``PaddleOCRVLForConditionalGeneration`` on the same folder, float32, eager, with
a 4-D mask hiding the logged positions and ``position_ids`` from its own ``get_rope_index``.
"""

from __future__ import annotations

import pytest
from engine_helpers import (
    BLOCK_SIZE,
    attention_mask,
    eviction_report,
    excluded_from_log,
    finished_log,
    logprob_deltas,
    make_llm,
    sampling,
    scheduler,
    seeded_images,
    shutdown,
    stock_run,
    token_logprobs,
    top_logprobs,
)
from mrope_model import IMAGE_PLACEHOLDER, build_tiny_mrope

pytestmark = pytest.mark.engine

EVICTING = {"policy": "attention", "budget": 0.25, "interval": 4}
MAX_TOKENS = 24
#: the text tests' bound (test_engine, test_multimodal): max |logprob| difference of each
#: generated token between the plugin (float32) and the float32 masked transformers reference
EXACT = 5e-5
FILLER = "The grass is green. The sky is blue. "
#: (images, seed) of the zero-eviction image request (``seeded_images``, as ``stock_run``
#: recreates them: 240x320 -> 3x4 merged tokens, 256x256 -> 4x4)
ZERO_IMAGES = (2, 0)
#: square images of the evicting image request, each 8x8 patches -> 4x4 image tokens
EXACT_IMAGES = 3


def text_prompt() -> str:
    """633 byte tokens (20 blocks): a needle in filler."""
    return ("<|begin_of_sentence|>User: " + FILLER * 7 + "The pass key is 71432. "
            + FILLER * 8 + "What is the pass key?\nAssistant: The pass key is")


def image_prompt(n: int) -> str:
    """``n`` images after 89 tokens of text (the first starts in block 2), then about 420
    tokens of text; 559 tokens with the three square images of the exactness test."""
    pictures = " and ".join([IMAGE_PLACEHOLDER] * n)
    return ("<|begin_of_sentence|>User: " + FILLER * 2 + "Look at " + pictures + ". "
            + FILLER * 10 + "Describe the pictures.\nAssistant: ")


def square_images(n: int, seed: int = 0):
    """``n`` seeded 224x224 RGB noise images, resized to 112x112 by the processor: the vision
    tower's native 8x8 position grid. (Other grids resample it, and there vLLM 0.32 and
    transformers 5.19 differ, ``align_corners`` False vs True: a mismatch of the vision tower,
    not of the decoder this module tests.)"""
    import numpy as np
    from PIL import Image

    rs = np.random.RandomState(seed)
    return [Image.fromarray(rs.randint(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in range(n)]


def image_request(images) -> dict:
    return {"prompt": image_prompt(len(images)), "multi_modal_data": {"image": list(images)}}


def params(kv=None, max_tokens=MAX_TOKENS, logprobs=0):
    return sampling(kv, max_tokens, logprobs, ignore_eos=True)


def evicted_log(llm, request_id: str):
    log = finished_log(llm, request_id)
    assert log, f"no eviction recorded for request {request_id}"
    return log


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_mrope(tmp_path_factory.mktemp("tiny-mrope"))


@pytest.fixture(scope="module")
def llm(folder):
    engine = make_llm({"kv_eviction": EVICTING}, model=str(folder))
    yield engine
    shutdown(engine)


class MRoPEReference:
    """The folder in transformers (float32, eager attention): the 4-D additive mask reaches
    the text model as given; ``position_ids`` are the model's own ``get_rope_index`` over the
    whole sequence (3 rows: t, h, w; the generated tokens are text after the last image)."""

    def __init__(self, folder):
        import torch
        from transformers import AutoProcessor, PaddleOCRVLForConditionalGeneration

        self.torch = torch
        self.processor = AutoProcessor.from_pretrained(str(folder))
        self.model = PaddleOCRVLForConditionalGeneration.from_pretrained(
            str(folder), dtype=torch.float32, attn_implementation="eager").eval()
        self.image_token_id = self.model.config.image_token_id

    def encode(self, prompt: str, images=None) -> tuple[list[int], dict]:
        """The prompt's token ids (each image placeholder expanded) and its image inputs."""
        enc = self.processor(text=[prompt], images=list(images) if images else None,
                             return_tensors="pt")
        inputs = {}
        if images:
            inputs = {"pixel_values": enc["pixel_values"],
                      "image_grid_thw": enc["image_grid_thw"]}
        return enc["input_ids"][0].tolist(), inputs

    def rope_index(self, token_ids: list[int], image_grid_thw=None):
        """``[3, 1, n]`` M-RoPE positions of ``token_ids``."""
        torch = self.torch
        ids = torch.tensor([token_ids])
        types = (ids == self.image_token_id).int()  # 1 marks an image token
        positions, _ = self.model.model.get_rope_index(
            ids, types, image_grid_thw=image_grid_thw, attention_mask=torch.ones_like(ids))
        return positions

    def logprobs(self, token_ids: list[int], excluded, positions, **inputs):
        """``[n, vocab]`` log-probabilities of the next token at each position."""
        torch = self.torch
        n = len(token_ids)
        with torch.no_grad():
            logits = self.model(
                input_ids=torch.tensor([token_ids]),
                attention_mask=attention_mask(n, excluded, torch.float32),
                position_ids=positions, **inputs,
            ).logits[0]
        return torch.log_softmax(logits, -1)


@pytest.fixture(scope="module")
def reference(folder):
    return MRoPEReference(folder)


def test_the_engine_starts_with_eviction_on_an_mrope_model(llm):
    """No refusal: the engine's model uses M-RoPE (3 position rows) and the plugin hooked both
    decoder attention layers (the vision tower's attention has no paged KV cache)."""
    assert llm.llm_engine.model_config.uses_mrope

    def runner_facts(worker):
        runner = worker.model_runner
        return (runner.uses_mrope, runner.mrope_num_dims, tuple(runner.mrope_positions.cpu.shape),
                runner._kvevict.layer_names)

    uses_mrope, dims, shape, layers = llm.collective_rpc(runner_facts)[0]
    assert uses_mrope and dims == 3 and shape[0] == 3
    assert layers == [f"language_model.model.layers.{i}.self_attn.attn" for i in range(2)]
    assert scheduler(llm).kv_default.policy == "attention"  # eviction on by default


@pytest.fixture(scope="module")
def zero_runs(llm):
    """The text and the image request in one batch, twice: tracked at budget 1.0 (text: the
    attention policy, never scored; image: HAE, scored at prefill with thresholds that prune
    nothing) and opted out (policy ``none``)."""
    hae = {"policy": "hae", "budget": 1.0,
           "options": {"global_threshold": 0.0, "individual_threshold": 0.0}}
    sched = scheduler(llm)
    score_task, tasks = sched.kv_planner.score_task, []

    def spy_task(request, state, num_tokens, *rest):
        task = score_task(request, state, num_tokens, *rest)
        if task is not None:
            tasks.append((request.request_id, task.phase))
        return task

    runs, skipped = {}, sched.kv_counters.scoring_skipped
    sched.kv_planner.score_task = spy_task
    try:
        for name, kvs in {"tracked": ({"budget": 1.0}, hae),
                          "none": ({"policy": "none"}, {"policy": "none"})}.items():
            llm.reset_prefix_cache()
            outs = llm.generate([text_prompt(), image_request(seeded_images(*ZERO_IMAGES))],
                                [params(kv, logprobs=5) for kv in kvs])
            runs[name] = outs
    finally:
        del sched.kv_planner.score_task
    return runs, tasks, sched.kv_counters.scoring_skipped - skipped


def test_zero_eviction_is_identical_to_stock_vllm(zero_runs, folder):
    """Tracked at budget 1.0 and opted out equal stock vLLM (plugin not loaded, same batch):
    the same tokens and every returned logprob (top 5 and the sampled token's), bit for bit."""
    expected = stock_run({
        "prompts": [text_prompt(),
                    {"prompt": image_prompt(ZERO_IMAGES[0]), "images": list(ZERO_IMAGES)}],
        "max_tokens": MAX_TOKENS, "logprobs": 5, "ignore_eos": True,
        "engine": {"model": str(folder)},
    })
    assert all(ref["plugin_loaded"] is False for ref in expected)
    runs, tasks, skipped = zero_runs
    for out in runs["tracked"]:
        assert eviction_report(out)["evicted_blocks"] == 0
    assert all(out.kv_transfer_params is None for out in runs["none"])  # not tracked
    # the statistics were measured on the M-RoPE model (HAE's prefill scoring) and changed
    # nothing; the text request at budget 1.0 was never scored
    text, image = (out.request_id for out in runs["tracked"])
    assert [phase for rid, phase in tasks if rid.startswith(image)] == ["prefill"], tasks
    assert not [rid for rid, _ in tasks if rid.startswith(text)], tasks
    assert skipped == 0  # measured, not skipped
    for name, outs in runs.items():
        for out, ref in zip(outs, expected):
            completion = out.outputs[0]
            assert list(out.prompt_token_ids) == ref["prompt_token_ids"], name
            assert list(completion.token_ids) == ref["token_ids"], name
            assert token_logprobs(completion) == ref["logprobs"], name  # bit-identical
            got = [{str(t): lp for t, lp in pos.items()} for pos in top_logprobs(completion)]
            assert got == ref["top"], name


@pytest.fixture(scope="module")
def evicted_runs(llm):
    """The text and the image request at the engine default (attention policy, 25 %)."""
    llm.reset_prefix_cache()
    skipped = scheduler(llm).kv_counters.scoring_skipped
    text, image = llm.generate([text_prompt(), image_request(square_images(EXACT_IMAGES))],
                               params())
    assert scheduler(llm).kv_counters.scoring_skipped == skipped  # every decision was scored
    return {"text": (text, evicted_log(llm, text.request_id)),
            "image": (image, evicted_log(llm, image.request_id))}


@pytest.mark.parametrize("case", ["text", "image"])
def test_evicted_output_matches_the_masked_hf_reference(case, evicted_runs, reference):
    """Eviction changes nothing but which keys are attended, also with 3-D positions:
    transformers on prompt + generated tokens, with a 4-D mask hiding from each query the
    positions the scheduler's log excluded at that point and the model's own M-RoPE
    ``position_ids``, gives every generated token's logprob within the text tests' bound.
    Mutants miss it by far: the log ignored (nothing masked) and, with an image, 1-D
    positions instead of the M-RoPE ones."""
    torch = reference.torch
    out, log = evicted_runs[case]
    images = square_images(EXACT_IMAGES) if case == "image" else None
    ids, inputs = reference.encode(image_prompt(len(images)) if images else text_prompt(), images)
    assert ids == list(out.prompt_token_ids)  # the same expansion of the image placeholders
    completion = out.outputs[0]
    assert len(completion.token_ids) == MAX_TOKENS

    # something was evicted, else the test proves nothing
    rep = eviction_report(out)
    assert rep["evicted_tokens"] > 0 and rep["evicted_blocks"] > 0, rep
    evicted = set().union(*(blocks for _, blocks in log))
    assert evicted and log[0][0] == len(ids), log  # decided right after the prefill

    seq = ids + list(completion.token_ids)
    n, start = len(seq), len(ids) - 1
    positions = reference.rope_index(seq, inputs.get("image_grid_thw"))
    linear = torch.arange(n).view(1, 1, n).expand(3, 1, n)
    if case == "image":
        # genuinely 3-D: the rows differ on the image tokens, and the text after the images
        # sits at smaller rotary positions than its index
        image_blocks = {p // BLOCK_SIZE for p, t in enumerate(ids) if t == reference.image_token_id}
        assert inputs["image_grid_thw"].tolist() == [[1, 8, 8]] * EXACT_IMAGES
        assert evicted & image_blocks, (log, image_blocks)
        assert rep["visual_evicted_tokens"] > 0, rep
        assert not torch.equal(positions[1], positions[2])
        assert int(positions.max()) < n - 1
    else:
        assert torch.equal(positions, linear)  # text only: M-RoPE degenerates to 1-D

    masked = excluded_from_log(log)
    ref = reference.logprobs(seq, masked, positions, **inputs)
    deltas = logprob_deltas(ref, start, completion)
    delta_full = max(logprob_deltas(reference.logprobs(seq, lambda p: set(), positions, **inputs),
                             start, completion))
    message = (f"{case}: evicted blocks {sorted(evicted)} of {-(-len(ids) // BLOCK_SIZE)}; "
               f"max |Δlogprob| vs masked reference {max(deltas):.2e}, vs unmasked "
               f"{delta_full:.2e}")
    if case == "image":
        delta_1d = max(logprob_deltas(reference.logprobs(seq, masked, linear, **inputs), start,
                               completion))
        message += f", vs masked with 1-D positions {delta_1d:.2e}"
    print(message)
    assert max(deltas) <= EXACT, deltas
    for i, token in enumerate(completion.token_ids):  # HF's greedy choice, up to a tie
        top = int(ref[start + i].argmax())
        assert top == token or ref[start + i, top] - ref[start + i, token] <= 2 * EXACT, i
    # the mutants fail the bound by far, so this test can fail
    assert delta_full > 100 * EXACT
    if case == "image":
        assert delta_1d > 100 * EXACT
