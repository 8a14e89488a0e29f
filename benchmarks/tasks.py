"""Deterministic retrieval prompts sized in tokens of a model's tokenizer (SmolLM2 unless
:func:`use_model` says otherwise), and answer checks.

Every prompt is a list of token ids of exactly ``context_tokens`` tokens (intro, haystack with
the facts inside, question), built from a seed string, so the vLLM engine (``TokensPrompt``) and
transformers/kvpress see the very same ids. A BOS only where the tokenizer adds one (Gemma 3;
SmolLM2's adds none).

Tasks
-----
``passkey``   the classic pass-key retrieval: a repeated filler paragraph, one 5-digit key at a
              relative ``depth``; asked at the end.
``needle``    needle in a haystack of varied (seeded, non-repeating) sentences: one 7-digit
              "special magic number" at ``depth``.
``multifact`` ``facts`` key -> value facts ("The door code is 48213. ...") of one shape and
              value range, the distractors spread evenly over the filler, the asked one at
              ``depth``: the model must return the asked value, not any number it has seen.
``natural``   ordinary prose: paragraphs of everyday documents (notices, letters, recipes,
              reports), some repeated verbatim as real documents repeat boilerplate, one
              5-digit access code at ``depth``, asked at the end. No "remember it" cue and no
              templated filler: the hardest of the four for attention-averaging scorers.
``drift``     a varied haystack followed by an open instruction, for long free generation (no
              answer; used by the drift measure).

Lengths are multiples of 32 (the engine's block size) by default so that a prefix-cache hit
recomputes exactly one full block - the 32-query observation window of the windowed policies
(see benchmarks/README.md).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from functools import lru_cache

TASKS = ("passkey", "needle", "multifact", "natural")

INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it."
)
PASSKEY_FILLER = (
    " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)
# multifact: facts of the same shape and value range, told apart by their relation only
# (SmolLM2-135M cannot bind many entities to one relation, "Alice's key"/"Bob's key", over
# 1k+ tokens: full cache was right 4-7 of 9 times; distinct relations: 9 of 9)
FACT = " The {key} is {value}. Remember it. {value} is the {key}."
FACT_QUESTION = " What is the {key}? The {key} is"
RELATIONS = ("pass key", "door code", "phone number", "room number", "bank PIN", "ticket number",
             "order number", "locker code")

# word banks of the varied haystack (needle, drift): seeded combinations, never a repeated loop
_SUBJECTS = ("The farmer", "A small boy", "The old teacher", "My neighbour", "The baker",
             "A tired traveller", "The young doctor", "Our captain", "The painter", "A quiet girl",
             "The mayor", "An old fisherman", "The student", "The gardener", "A busy clerk")
_VERBS = ("walked to", "looked at", "cleaned", "painted", "visited", "talked about", "built",
          "remembered", "found", "carried water to", "sang near", "waited beside", "fixed",
          "opened", "drew a map of")
_OBJECTS = ("the river", "the market", "a wooden bridge", "the library", "the hill", "an old barn",
            "the harbour", "the school", "a green field", "the station", "the bakery",
            "the forest path", "a stone wall", "the garden", "the church tower")
_TAILS = ("in the morning.", "after lunch.", "before the rain came.", "with a friend.",
          "on a cold day.", "while the birds sang.", "for the first time.", "again and again.",
          "late in the evening.", "without a word.", "in the spring.", "under a grey sky.")


# natural: paragraphs of ordinary documents (written for this benchmark)
_PARAGRAPHS = (
    " The library on Elm Street will close early on Friday because the heating is being"
    " repaired. Books that are due that day can be returned on Monday without a fine. The"
    " reading room upstairs stays open until noon.",
    " Put the onions in a wide pan with a little oil and cook them slowly until they are soft."
    " Add the tomatoes, a pinch of salt and half a cup of water. Let the sauce simmer for twenty"
    " minutes and stir it now and then so that it does not stick.",
    " Thank you for your letter of last week. We were glad to hear that the garden is doing"
    " well after the dry summer. Your aunt sends her love and asks whether you will visit us"
    " in October, when the apples are ready.",
    " Trains to the coast leave every hour from platform two. On Sundays the first train leaves"
    " at nine and the last one at half past six. Passengers with bicycles should use the front"
    " carriage.",
    " The weather will stay mild for most of the week. Clouds will build up on Wednesday"
    " afternoon and there may be light rain in the evening. Temperatures will fall a little"
    " at the weekend, with a cold wind from the north.",
    " Members of staff are reminded that the kitchen on the second floor is shared by three"
    " teams. Please wash your cups, label your food and take it home on Fridays. The"
    " refrigerator is cleaned every Monday morning.",
    " The museum has added a new room about the history of the harbour. Visitors can see old"
    " maps, a model of the first lighthouse and the tools that the dock workers used. Guided"
    " tours start at eleven and at three.",
    " Our shop sells fresh bread every morning from seven o'clock. The rye loaf and the"
    " seeded rolls are the most popular, and they are often gone by ten. Cakes can be ordered"
    " two days in advance.",
    " The meeting of the town council began at six and lasted almost three hours. Most of the"
    " time was spent on the plan for the new bus route. A decision was postponed until the"
    " next meeting in March.",
    " To reset the printer, switch it off, wait ten seconds and switch it on again. If the"
    " light is still red, open the front cover and check that no paper is stuck inside. Call"
    " the help desk if the problem continues.",
    " The school football team won its third match in a row on Saturday. The players trained"
    " twice a week through the winter, and the coach said the hard work was paying off. The"
    " next game is away, in the village by the lake.",
    " Please note that the car park behind the office will be resurfaced next month. During"
    " the work, staff can park at the sports centre, which is a short walk away. The work"
    " should take about two weeks.",
    " My grandmother grew up on a farm with four brothers and a great many cows. She still"
    " tells stories about the long walk to school in the snow and the old horse that knew the"
    " way home by itself.",
    " The hotel offers breakfast from seven until ten in the dining room on the ground floor."
    " Guests who leave early can ask for a packed breakfast at the front desk the evening"
    " before. Towels are changed every second day.",
)
NATURAL_FACT = " The access code for the staff room is {value}."
NATURAL_QUESTION = " What is the access code for the staff room? The access code for the staff room is"
NATURAL_INTRO = "Below are some documents from an office archive."


def _natural_haystack(rng: random.Random, n_tokens: int) -> list[list[int]]:
    """Paragraphs (token lists) totalling exactly ``n_tokens``: each next paragraph is a new
    one or, a third of the time, one already used (boilerplate repeats verbatim)."""
    used: list[int] = []
    out: list[list[int]] = []
    total = 0
    while total < n_tokens:
        if used and rng.random() < 1 / 3:
            pick = rng.choice(used)
        else:
            fresh = [i for i in range(len(_PARAGRAPHS)) if i not in used] or list(range(len(_PARAGRAPHS)))
            pick = rng.choice(fresh)
            used.append(pick)
        ids = encode(_PARAGRAPHS[pick])
        out.append(ids)
        total += len(ids)
    last = out.pop()
    out.insert(0, last[total - n_tokens:])
    return out


@dataclass(frozen=True)
class Sample:
    """One prompt: token ids, the expected answer (digits) and what produced it."""

    task: str
    context_tokens: int
    depth: float
    seed: str
    token_ids: list[int] = field(repr=False)
    answer: str
    question: str  # the question text at the end (also used by kvpress reports)


#: the embedded model whose tokenizer sizes the prompts (``use_model`` switches it)
MODEL = "smollm2"


def use_model(name: str) -> None:
    """Size every following prompt in tokens of ``name`` (an alias of ``vllm_kvevict.models``)."""
    global MODEL
    MODEL = name
    tokenizer.cache_clear()


@lru_cache(maxsize=1)
def tokenizer():
    from transformers import AutoTokenizer

    from vllm_kvevict.models import model_path

    return AutoTokenizer.from_pretrained(str(model_path(MODEL)))


def encode(text: str) -> list[int]:
    return list(tokenizer()(text, add_special_tokens=False).input_ids)


def bos() -> list[int]:
    """``[bos id]`` when the model's tokenizer starts every text with one (Gemma 3, which
    degenerates without it), else ``[]`` (SmolLM2): the prompts carry what the tokenizer adds."""
    tok = tokenizer()
    ids = tok("a").input_ids
    return [ids[0]] if tok.bos_token_id is not None and ids[0] == tok.bos_token_id else []


def _varied_sentence(rng: random.Random) -> str:
    return " " + " ".join(
        (rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_TAILS))
    )


def _haystack(kind: str, rng: random.Random, n_tokens: int) -> list[list[int]]:
    """Sentences (token lists) totalling exactly ``n_tokens``: whole sentences, the first one
    cut to its tail if needed (the haystack reads like an excerpt)."""
    sentences: list[list[int]] = []
    total = 0
    while total < n_tokens:
        ids = encode(PASSKEY_FILLER) if kind == "passkey" else encode(_varied_sentence(rng))
        sentences.append(ids)
        total += len(ids)
    # the sentence that overshot opens the haystack, cut to its tail
    last = sentences.pop()
    sentences.insert(0, last[total - n_tokens:])
    return sentences


def _assemble(haystack: list[list[int]], inserts: list[tuple[float, list[int]]]) -> list[int]:
    """Put each insert between sentences at its relative depth (0 = first, 1 = last)."""
    slots: dict[int, list[list[int]]] = {}
    n = len(haystack)
    for depth, ids in inserts:
        slots.setdefault(round(depth * n), []).append(ids)
    out: list[int] = []
    for i in range(n + 1):
        for ids in slots.get(i, []):
            out += ids
        if i < n:
            out += haystack[i]
    return out


def _rng(*parts) -> random.Random:
    # str seeds are hashed with SHA-512: the same across runs and PYTHONHASHSEED values
    return random.Random(":".join(str(p) for p in parts))


def make_sample(task: str, context_tokens: int, depth: float, index: int, seed: int = 0,
                facts: int = 4) -> Sample:
    """The ``index``-th sample of ``task`` at ``context_tokens`` total tokens and ``depth``."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {TASKS}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    tag = f"{task}:{context_tokens}:{depth}:{index}:{seed}"
    rng = _rng(tag)
    if task == "passkey":
        answer = str(rng.randint(10000, 99999))
        inserts = [(depth, encode(f" The pass key is {answer}. Remember it. {answer} is the pass key."))]
        question = " What is the pass key? The pass key is"
    elif task == "natural":
        answer = str(rng.randint(10000, 99999))
        inserts = [(depth, encode(NATURAL_FACT.format(value=answer)))]
        question = NATURAL_QUESTION
    elif task == "needle":
        answer = str(rng.randint(1000000, 9999999))
        inserts = [(depth, encode(f" The special magic number is {answer}. Remember it."))]
        question = " What is the special magic number? The special magic number is"
    else:
        keys = rng.sample(RELATIONS, facts)
        codes = rng.sample(range(10000, 100000), facts)
        asked = rng.randrange(facts)

        def fact(i: int) -> list[int]:
            return encode(FACT.format(key=keys[i], value=codes[i]))

        # the asked fact at `depth`, the distractors evenly spread over the context
        others = [i for i in range(facts) if i != asked]
        spread = [(k + 0.5) / len(others) for k in range(len(others))]
        inserts = [(depth, fact(asked))] + [(d, fact(i)) for d, i in zip(spread, others)]
        answer = str(codes[asked])
        question = FACT_QUESTION.format(key=keys[asked])
    head = bos() + encode(NATURAL_INTRO if task == "natural" else INTRO)
    tail = encode(question)
    body = context_tokens - len(head) - len(tail) - sum(len(ids) for _, ids in inserts)
    if body < 16:
        raise ValueError(f"context_tokens={context_tokens} is too short for task {task!r}")
    if task == "natural":
        haystack = _natural_haystack(rng, body)
    else:
        haystack = _haystack("passkey" if task in ("passkey", "multifact") else "varied", rng, body)
    ids = head + _assemble(haystack, inserts) + tail
    assert len(ids) == context_tokens
    return Sample(task, context_tokens, depth, tag, ids, answer, question.strip())


def make_samples(task: str, context_tokens: int, depths, per_depth: int, seed: int = 0,
                 facts: int = 4) -> list[Sample]:
    return [make_sample(task, context_tokens, d, i, seed, facts)
            for d in depths for i in range(per_depth)]


def drift_prompt(context_tokens: int, index: int, seed: int = 0) -> list[int]:
    """A varied text and an open instruction: long free generation for the drift measure."""
    rng = _rng("drift", context_tokens, index, seed)
    tail = encode(" Now write a long story about these people and places. Once upon a time,")
    head = bos()
    body = context_tokens - len(head) - len(tail)
    return head + [t for s in _haystack("varied", rng, body) for t in s] + tail


_NUMBER = re.compile(r"\d+")


def extract_answer(text: str) -> str | None:
    """The first run of digits in the generated text (``None`` if there is none)."""
    m = _NUMBER.search(text)
    return m.group(0) if m else None


def is_correct(text: str, answer: str) -> bool:
    """Correct iff the first number the model writes is exactly the expected one."""
    return extract_answer(text) == answer
