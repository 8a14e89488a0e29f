"""Multimodal requests with eviction on: ``smollm2-vlm`` (Idefics3 layout, untrained vision tower).

One engine serves the module (the VLM, plugin on, HAE at 25 % by default). Every image request
is a multi-image one (seeded numpy/PIL images). The scheduler and the worker run in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the tests read the spans the scheduler hands the
workers, the visual mask HAE's prefill pruning sees, and the per-request eviction report.

Idefics3 in vLLM 0.32 replaces each ``<image>`` of the prompt with
``<fake_token_around_image><global-img>`` + 64 ``<image>`` + ``<fake_token_around_image>``
(67 tokens, no image splitting); the 64 ``<image>`` tokens take the encoder's embeddings.

Exactness with images: evicted image (and text) blocks match transformers' Idefics3 on the same
token ids and pixel values with the logged positions masked; without eviction the plugin engine
equals stock vLLM (``stock_run.py``, one more engine in a subprocess) bit for bit.
"""

from __future__ import annotations

import base64
import io
import json

import pytest
from engine_helpers import (
    BLOCK_SIZE,
    HFVLMReference,
    Server,
    eviction_report,
    excluded_from_log,
    finished_log,
    logprob_deltas,
    make_llm,
    sampling,
    scheduler,
    shutdown,
    stock_run,
    token_logprobs,
    top_logprobs,
)
from engine_helpers import seeded_images as images

pytestmark = pytest.mark.engine

DEFAULT = {"policy": "hae", "budget": 0.25}
#: the module engine's arguments beyond ``make_llm``'s (the stock reference uses them too)
ENGINE = {"enable_prefix_caching": True}
MAX_TOKENS = 12
IMAGE_SEQ_LEN = 64
FILLER = "The grass is green. The sky is blue. "


def data_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_prompt(n: int) -> str:
    """A ChatML prompt (SmolLM2's format) with ``n`` ``<image>`` placeholders and some text."""
    pictures = " and ".join("<image>" for _ in range(n))
    return (f"<|im_start|>user\nLook at {pictures}. " + FILLER * 12
            + "Describe the pictures.<|im_end|>\n<|im_start|>assistant\n")


def params(kv=None, max_tokens=MAX_TOKENS, logprobs=0):
    return sampling(kv, max_tokens, logprobs, ignore_eos=True)


def embed_runs(token_ids: list[int], token_id: int) -> list[tuple[int, int]]:
    """``(offset, length)`` of each run of ``token_id`` in ``token_ids``."""
    runs: list[tuple[int, int]] = []
    for i, t in enumerate(token_ids):
        if t != token_id:
            continue
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


# -- the OpenAI server (its own engine; runs before the module's engine exists) ------------


def test_openai_client_chat_with_two_base64_images():
    """``vllm-kvevict serve smollm2-vlm --kv-eviction hae`` and the ``openai`` client: a chat
    completion with two ``image_url`` data URIs evicts and reports it (engine core in its own
    process, as a user runs it)."""
    import openai

    with Server(["smollm2-vlm", "--served-model-name", "smollm2-vlm", "--block-size",
                 str(BLOCK_SIZE), "--max-model-len", "4096", "--dtype", "float32",
                 "--enforce-eager", "--kv-eviction", "hae", "--kv-eviction-budget", "0.25"]) as server:
        client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", timeout=600)
        a, b = images(2, seed=1)
        out = client.chat.completions.create(
            model="smollm2-vlm", max_tokens=MAX_TOKENS, temperature=0,
            messages=[{"role": "user", "content": [
                {"type": "text", "text": "Here are two pictures."},
                {"type": "image_url", "image_url": {"url": data_uri(a)}},
                {"type": "image_url", "image_url": {"url": data_uri(b)}},
                {"type": "text", "text": FILLER * 12 + "What do they show?"}]}],
        )
    assert out.usage.prompt_tokens > 2 * (IMAGE_SEQ_LEN + 3)
    assert out.choices[0].message.content
    rep = out.model_extra["kv_transfer_params"]["kv_eviction"]
    assert rep["policy"] == "hae" and rep["evicted_blocks"] > 0, rep
    assert rep["visual_evicted_tokens"] > 0, rep


# -- the offline engine ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def vlm_path():
    from vllm_kvevict.models import model_path

    return model_path("smollm2-vlm")


@pytest.fixture(scope="module")
def llm(vlm_path):
    engine = make_llm({"kv_eviction": DEFAULT}, model=str(vlm_path), **ENGINE)
    yield engine
    shutdown(engine)


@pytest.fixture(scope="module")
def image_token_id(vlm_path):
    return json.loads((vlm_path / "config.json").read_text())["image_token_id"]


@pytest.fixture(scope="module")
def hae_run(llm):
    """One three-image request at the engine default (HAE, 25 %), with what the scheduler
    handed the workers (spans, per scoring task) and what HAE's prefill pruning saw."""
    from vllm_kvevict.policies.hae import HAEPolicy

    sched = scheduler(llm)
    tasks, pruning = [], []
    score_task, prunable = sched.kv_planner.score_task, HAEPolicy.prunable_tokens

    def spy_task(request, state, num_tokens, *rest):
        task = score_task(request, state, num_tokens, *rest)
        if task is not None:
            ranges = [(f.mm_position.offset, f.mm_position.length,
                       int(f.mm_position.is_embed.sum())) for f in request.mm_features]
            tasks.append((task.phase, list(task.visual_spans), ranges))
        return task

    def spy_prunable(self, stats):
        verdict = prunable(self, stats)
        pruning.append((stats.visual.clone(), stats.block_index.clone(), verdict))
        return verdict

    llm.reset_prefix_cache()
    sched.kv_planner.score_task = spy_task
    HAEPolicy.prunable_tokens = spy_prunable
    try:
        out = llm.generate([{"prompt": image_prompt(3), "multi_modal_data": {"image": images(3)}}],
                           params())[0]
    finally:
        del sched.kv_planner.score_task
        HAEPolicy.prunable_tokens = prunable
    return out, tasks, pruning, finished_log(llm, out.request_id)


def test_the_model_prepares_offline(vlm_path):
    """The folder: Idefics3 config (tiny vision tower, 64 tokens per image), tokenizer with the
    image tokens, processor, chat template placing images; the text weights are SmolLM2's."""
    from safetensors import safe_open
    from transformers import AutoProcessor

    from vllm_kvevict.models import model_path

    for name in ("config.json", "tokenizer.json", "processor_config.json", "chat_template.jinja",
                 "generation_config.json", "model.safetensors"):
        assert (vlm_path / name).is_file(), name
    config = json.loads((vlm_path / "config.json").read_text())
    assert config["architectures"] == ["Idefics3ForConditionalGeneration"]
    vision = config["vision_config"]
    assert (vision["image_size"] // vision["patch_size"]) ** 2 // config["scale_factor"] ** 2 == 64
    assert vision["num_hidden_layers"] == 2

    processor = AutoProcessor.from_pretrained(str(vlm_path))
    assert type(processor).__name__ == "Idefics3Processor" and processor.image_seq_len == 64
    assert processor.image_processor.do_image_splitting is False
    tok = processor.tokenizer
    for token in ("<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"):
        assert len(tok.encode(token, add_special_tokens=False)) == 1, token
    assert tok.convert_tokens_to_ids("<image>") == config["image_token_id"]
    chat = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"},
                                      {"type": "image"}]}],
        add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>user\n<image>and<image><|im_end|>" in chat
    assert chat.endswith("<|im_start|>assistant\n")

    text_dir = model_path("smollm2")
    with safe_open(str(text_dir / "model.safetensors"), "pt") as text, \
            safe_open(str(vlm_path / "model.safetensors"), "pt") as vlm:
        keys = set(vlm.keys())
        for key in text.keys():
            assert key.startswith("model."), key
            theirs = text.get_tensor(key)
            mine = vlm.get_tensor("model.text_model." + key[len("model."):])
            if key == "model.embed_tokens.weight":  # rows for the new tokens are appended
                assert mine.shape[0] == config["text_config"]["vocab_size"] == len(tok)
                mine = mine[: theirs.shape[0]]
            assert mine.equal(theirs), key
        assert any(k.startswith("model.vision_model.") for k in keys)
        assert any(k.startswith("model.connector.") for k in keys)


def test_only_decoder_attention_is_hooked(llm):
    """The vision tower's attention (``MMEncoderAttention``, no paged KV cache) is invisible to
    the startup check and the statistics hooks: exactly the 30 decoder layers are hooked."""

    def hooked(worker):
        runner = worker.model_runner
        return runner._kvevict.layer_names, runner.kv_cache_config.kv_cache_groups[0].layer_names

    names, cache_layers = llm.collective_rpc(hooked)[0]
    assert names == [f"model.text_model.layers.{i}.self_attn.attn" for i in range(30)]
    assert sorted(cache_layers) == sorted(names)


def test_multi_image_request_with_hae_evicts(hae_run):
    out, _, _, log = hae_run
    rep = eviction_report(out)
    assert rep["policy"] == "hae"
    assert rep["evicted_blocks"] > 0 and rep["evicted_tokens"] > 0, rep
    assert rep["attended_tokens"] < rep["total_tokens"]
    assert len(out.outputs[0].token_ids) == MAX_TOKENS
    # by modality: visual first, so released image tokens dominate; the split adds up
    assert rep["visual_evicted_tokens"] + rep["text_evicted_tokens"] == rep["evicted_tokens"]
    assert rep["visual_evicted_tokens"] > rep["text_evicted_tokens"], rep
    assert log and log[0][0] == len(out.prompt_token_ids)  # decided right after the prefill


def test_visual_spans_are_the_image_tokens(hae_run, image_token_id):
    """The spans the scheduler hands the workers are exactly the prompt's runs of 64 ``<image>``
    tokens; vLLM's placeholder range also covers the wrappers (2 before, 1 after), which its
    ``is_embed`` mask excludes."""
    out, tasks, _, _ = hae_run
    ids = out.prompt_token_ids
    runs = embed_runs(ids, image_token_id)
    assert [length for _, length in runs] == [IMAGE_SEQ_LEN] * 3
    assert tasks and tasks[0][0] == "prefill"
    for _, spans, ranges in tasks:
        assert spans == runs
        assert [(off + 2, length - 3, n) for off, length, n in ranges] == [
            (o, n, n) for o, n in runs]
    fake, glob = ids[runs[0][0] - 2], ids[runs[0][0] - 1]
    assert all(ids[o - 2] == fake and ids[o - 1] == glob and ids[o + n] == fake for o, n in runs)


def test_hae_prefill_pruning_sees_the_images(hae_run, image_token_id):
    """HAE's prefill pruning ran once, on a visual mask equal to the prompt's image tokens; the
    blocks made only of image tokens are out of attention after the prefill (visual first)."""
    out, _, pruning, log = hae_run
    ids = out.prompt_token_ids
    assert len(pruning) == 1
    visual, block_index, verdict = pruning[0]
    assert block_index.tolist() == list(range(-(-len(ids) // BLOCK_SIZE)))  # every block resident
    assert visual.tolist() == [t == image_token_id for t in ids]
    assert verdict is not None and verdict.shape == visual.shape
    assert not (verdict & ~visual).any()  # only visual tokens are ever prunable
    image_blocks = {b for b in range(len(ids) // BLOCK_SIZE)
                    if all(t == image_token_id for t in ids[b * BLOCK_SIZE:(b + 1) * BLOCK_SIZE])}
    assert image_blocks and image_blocks <= log[0][1]


def test_hae_prunes_only_image_blocks_within_budget(llm, image_token_id):
    """At budget 1.0 with thresholds every visual token passes, HAE's prefill pruning releases
    exactly the blocks made only of image tokens (and nothing else)."""
    llm.reset_prefix_cache()
    kv = {"policy": "hae", "budget": 1.0,
          "options": {"global_threshold": 1.0, "individual_threshold": 1.0}}
    out = llm.generate([{"prompt": image_prompt(2), "multi_modal_data": {"image": images(2, 3)}}],
                       params(kv, max_tokens=4))[0]
    ids = out.prompt_token_ids
    image_blocks = {b for b in range(len(ids) // BLOCK_SIZE)
                    if all(t == image_token_id for t in ids[b * BLOCK_SIZE:(b + 1) * BLOCK_SIZE])}
    rep = eviction_report(out)
    assert rep["evicted_blocks"] == len(image_blocks) > 0, rep
    assert rep["evicted_tokens"] == len(image_blocks) * BLOCK_SIZE  # released, not parked
    assert rep["visual_evicted_tokens"] == rep["evicted_tokens"] and rep["text_evicted_tokens"] == 0
    assert finished_log(llm, out.request_id)[0][1] == image_blocks


#: the image request of the zero-eviction tests (two images, seed 5)
ZERO_REQUEST = (2, 5)


@pytest.fixture(scope="module")
def zero_runs(llm):
    """One image request, each prompt computed from scratch: tracked at budget 1.0 (HAE scored
    at prefill with thresholds that prune nothing; the attention policy) and opted out (policy
    ``none``): per run, (tokens, sampled logprobs, top-5 logprobs, kv_transfer_params, prompt)."""
    n, seed = ZERO_REQUEST
    request = {"prompt": image_prompt(n), "multi_modal_data": {"image": images(n, seed)}}
    runs = {}
    for name, kv in {
        "none": {"policy": "none"},
        "hae": {"policy": "hae", "budget": 1.0,
                "options": {"global_threshold": 0.0, "individual_threshold": 0.0}},
        "attention": {"policy": "attention", "budget": 1.0},
    }.items():
        llm.reset_prefix_cache()  # each request computes its prompt from scratch
        out = llm.generate([request], params(kv, logprobs=5))[0]
        completion = out.outputs[0]
        runs[name] = (list(completion.token_ids), token_logprobs(completion),
                      top_logprobs(completion), out.kv_transfer_params, list(out.prompt_token_ids))
    return runs


def test_no_eviction_on_an_image_request_is_identical(zero_runs):
    """Tracked at budget 1.0 and opted out give the same tokens and logprobs (top 5, bit for
    bit)."""
    runs = zero_runs
    assert runs["none"][3] is None  # not tracked
    for name in ("hae", "attention"):
        assert runs[name][3]["kv_eviction"]["evicted_blocks"] == 0
        assert runs[name][:3] == runs["none"][:3], name


def test_zero_eviction_on_an_image_request_is_identical_to_stock_vllm(zero_runs, vlm_path):
    """The same image request on stock vLLM (``stock_run.py`` in a subprocess: plugin not loaded,
    no ``kv_eviction`` config, the module engine's arguments, the images recreated from their
    seed): the plugin engine's ``none`` and ``hae`` at budget 1.0 runs give its tokens and every
    returned logprob (top 5 and the sampled token's) exactly, as the text test requires."""
    n, seed = ZERO_REQUEST
    (ref,) = stock_run({
        "prompts": [{"prompt": image_prompt(n), "images": [n, seed]}],
        "max_tokens": MAX_TOKENS, "logprobs": 5, "ignore_eos": True,
        "engine": {"model": str(vlm_path), **ENGINE},
    })
    assert ref["plugin_loaded"] is False
    assert ref["num_cached_tokens"] == 0
    for name in ("none", "hae"):
        tokens, logprobs, top, _, prompt = zero_runs[name]
        assert prompt == ref["prompt_token_ids"], name  # the same images, the same expansion
        assert tokens == ref["token_ids"], name
        assert logprobs == ref["logprobs"], name  # bit-identical
        assert [{str(t): lp for t, lp in pos.items()} for pos in top] == ref["top"], name


# -- exactness: evicted image blocks vs a masked transformers reference ---------------------

#: the text tests' bound (test_engine): max |logprob| difference of each generated token between
#: the plugin (float32) and the float32 transformers reference masking the evicted positions
EXACT = 5e-5
#: (images, seed) of the two evicting requests
EXACT_REQUESTS = {"hae": (3, 0), "snapkv": (2, 12)}


@pytest.fixture(scope="module")
def vlm_reference():
    return HFVLMReference()


@pytest.fixture(scope="module")
def snapkv_run(llm):
    """Two images, SnapKV at 25 %, 20 tokens: decided after the prefill and again at the first
    check after the decode filled a block (the mask changes mid-generation)."""
    n, seed = EXACT_REQUESTS["snapkv"]
    llm.reset_prefix_cache()
    out = llm.generate([{"prompt": image_prompt(n), "multi_modal_data": {"image": images(n, seed)}}],
                       params({"policy": "snapkv", "budget": 0.25}, max_tokens=20))[0]
    return out, finished_log(llm, out.request_id)


@pytest.mark.parametrize("case", sorted(EXACT_REQUESTS))
def test_evicted_image_blocks_match_the_masked_hf_reference(case, request, vlm_reference,
                                                             image_token_id):
    """Evicting image blocks changes nothing but which keys are attended: transformers'
    ``Idefics3ForConditionalGeneration`` (float32, eager) on the same prompt, token ids and pixel
    values from the folder's processor (equal to vLLM's), run over prompt + generated tokens with
    a 4-D mask hiding from each query the positions the scheduler's log excluded at that point
    (original RoPE positions), gives every generated token's logprob within the text tests'
    bound (HAE at 25 %: one decision after the prefill; SnapKV at 25 %: a second one during the
    decode). The mutant (log ignored, nothing masked) differs far beyond it."""
    if case == "hae":
        out, _, _, log = request.getfixturevalue("hae_run")
    else:
        out, log = request.getfixturevalue("snapkv_run")
    n, seed = EXACT_REQUESTS[case]
    ids, pixels = vlm_reference.encode(image_prompt(n), images(n, seed))
    assert ids == list(out.prompt_token_ids)
    completion = out.outputs[0]

    # the log hid image blocks, and text blocks too: otherwise the test proves nothing
    evicted = set().union(*(blocks for _, blocks in log))
    kinds = [{t == image_token_id for t in ids[b * BLOCK_SIZE:(b + 1) * BLOCK_SIZE]}
             for b in range(len(ids) // BLOCK_SIZE)]
    image_blocks = {b for b, kind in enumerate(kinds) if kind == {True}}
    text_blocks = {b for b, kind in enumerate(kinds) if kind == {False}}
    assert evicted & image_blocks and evicted & text_blocks, (log, image_blocks)
    assert log[0][0] == len(ids)  # decided right after the prefill
    if case == "snapkv":
        assert len(log) == 2 and log[0][1] < log[1][1], log  # then more, during the decode

    seq = ids + list(completion.token_ids)
    start = len(ids) - 1
    ref = vlm_reference.logprobs(seq, excluded_from_log(log), **pixels)
    deltas = logprob_deltas(ref, start, completion)
    delta_full = max(logprob_deltas(vlm_reference.logprobs(seq, lambda p: set(), **pixels), start,
                             completion))
    print(f"{case}: evicted blocks {sorted(evicted)} (image-only {sorted(evicted & image_blocks)}); "
          f"max |Δlogprob| vs masked reference {max(deltas):.2e}, vs unmasked {delta_full:.2e}")
    assert max(deltas) <= EXACT, deltas
    for i, token in enumerate(completion.token_ids):  # HF's greedy choice, up to a tie
        top = int(ref[start + i].argmax())
        assert top == token or ref[start + i, top] - ref[start + i, token] <= 2 * EXACT, i
    # the mutant: ignoring the log (full attention) misses the bound by far, so this can fail
    assert delta_full > 100 * max(deltas)


def test_chat_with_base64_image_urls(llm, image_token_id):
    """``LLM.chat`` with two ``image_url`` data URIs (the OpenAI content parts the server takes)
    renders through the model's chat template and evicts with HAE."""
    a, b = images(2, seed=7)
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "Here are two pictures."},
        {"type": "image_url", "image_url": {"url": data_uri(a)}},
        {"type": "image_url", "image_url": {"url": data_uri(b)}},
        {"type": "text", "text": FILLER * 12 + "What do they show?"}]}]
    out = llm.chat(messages, params())[0]
    runs = embed_runs(out.prompt_token_ids, image_token_id)
    assert [length for _, length in runs] == [IMAGE_SEQ_LEN] * 2
    rep = eviction_report(out)
    assert rep["evicted_blocks"] > 0, rep
    assert len(out.outputs[0].token_ids) == MAX_TOKENS
