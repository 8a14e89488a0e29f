"""benchmarks/tasks.py: exact token lengths, determinism, where the facts sit, answer checks."""

from __future__ import annotations

import pytest
import tasks  # noqa: E402


def _find(ids: list[int], sub: list[int]) -> int:
    for i in range(len(ids) - len(sub) + 1):
        if ids[i:i + len(sub)] == sub:
            return i
    return -1


@pytest.mark.parametrize("task", tasks.TASKS)
@pytest.mark.parametrize("context", [256, 1024, 2048])
def test_prompts_have_exactly_the_requested_tokens(task, context):
    for depth in (0.0, 0.5, 1.0):
        sample = tasks.make_sample(task, context, depth, index=1)
        assert len(sample.token_ids) == context
        assert context % 32 == 0  # a block multiple: prefix-cache hits recompute one full block


@pytest.mark.parametrize("task", tasks.TASKS)
def test_samples_are_deterministic_and_seeded(task):
    a = tasks.make_sample(task, 512, 0.5, index=0)
    b = tasks.make_sample(task, 512, 0.5, index=0)
    assert a == b and a.token_ids == b.token_ids
    others = [tasks.make_sample(task, 512, 0.5, index=i) for i in range(1, 4)]
    others.append(tasks.make_sample(task, 512, 0.5, index=0, seed=1))
    assert all(o.token_ids != a.token_ids for o in others)
    assert len({o.answer for o in others} | {a.answer}) > 1


@pytest.mark.parametrize("task", tasks.TASKS)
def test_question_ends_the_prompt_and_the_answer_is_inside(task):
    s = tasks.make_sample(task, 1024, 0.3, index=2)
    text = tasks.tokenizer().decode(s.token_ids)
    assert text.rstrip().endswith(s.question)
    assert text.startswith(tasks.NATURAL_INTRO if task == "natural" else tasks.INTRO)
    assert text.count(s.answer) >= 1


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_needle_sits_at_its_depth(depth):
    s = tasks.make_sample("passkey", 2048, depth, index=0)
    start = _find(s.token_ids, tasks.encode(f" The pass key is {s.answer}."))
    assert start >= 0
    head, tail = len(tasks.encode(tasks.INTRO)), len(tasks.encode(" " + s.question))
    relative = (start - head) / (2048 - head - tail)
    assert abs(relative - depth) < 0.06


def test_multifact_has_distinct_facts_and_asks_one():
    s = tasks.make_sample("multifact", 1024, 0.5, index=3, facts=4)
    text = tasks.tokenizer().decode(s.token_ids)
    facts = [r for r in tasks.RELATIONS if f"The {r} is " in text]
    assert len(facts) == 4
    asked = s.question.split("What is the ")[1].split("?")[0]
    assert asked in facts
    assert f"The {asked} is {s.answer}." in text
    values = [text.split(f"The {r} is ")[1].split(".")[0] for r in facts]
    assert len(set(values)) == 4


def test_drift_prompt_length_and_determinism():
    a = tasks.drift_prompt(1024, 0)
    assert len(a) == 1024 and a == tasks.drift_prompt(1024, 0)
    assert a != tasks.drift_prompt(1024, 1)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown task"):
        tasks.make_sample("nope", 1024, 0.5, 0)
    with pytest.raises(ValueError, match="depth"):
        tasks.make_sample("passkey", 1024, 1.5, 0)
    with pytest.raises(ValueError, match="too short"):
        tasks.make_sample("multifact", 64, 0.5, 0)


@pytest.mark.parametrize("text, answer, ok", [
    (" 71432. Remember it.", "71432", True),
    ("71432", "71432", True),
    (" The pass key is 71432.", "71432", True),
    (" 714320.", "71432", False),  # a longer number is wrong
    (" 1432.", "71432", False),
    (" 12345 then 71432", "71432", False),  # the first number counts
    (" no number here", "71432", False),
    ("", "71432", False),
])
def test_answer_check(text, answer, ok):
    assert tasks.is_correct(text, answer) is ok


def test_extract_answer():
    assert tasks.extract_answer(" 8324224. Remember") == "8324224"
    assert tasks.extract_answer("none") is None


@pytest.mark.parametrize("task", tasks.TASKS)
def test_kvpress_split_keeps_the_question_and_matches_the_budget(task):
    """kvpress compresses the context only; the question is its own tail, and the context's
    compression ratio keeps ``budget`` of the whole prompt, question included."""
    import bench_kvpress

    sample = tasks.make_sample(task, 1024, 0.5, index=0)
    context, question = bench_kvpress.split_prompt(sample)
    assert context + question == sample.token_ids
    assert tasks.tokenizer().decode(question).strip() == sample.question
    for budget in (0.5, 0.25, 0.1, 0.05):
        ratio = bench_kvpress.context_ratio(budget, len(sample.token_ids), len(question))
        kept = int(len(context) * (1 - ratio)) + len(question)  # kvpress's ScorerPress count
        assert abs(kept - budget * len(sample.token_ids)) <= 1
