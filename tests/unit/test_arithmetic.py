"""Tests for the arithmetic task and greedy generation (loracast.eval.arithmetic)."""

from __future__ import annotations

import re

import pytest
import torch

from loracast.eval.arithmetic import (
    GenerationExample,
    arithmetic_splits,
    arithmetic_training_pairs,
    evaluate_generation,
    exact_match,
    generate_answers,
    n_distinct_questions,
)
from tests.conftest import build_tiny_gemma3, build_tiny_llama

QUESTION = re.compile(r"^Question: (\d+) ([+-]) (\d+) =\nAnswer:$")

PROMPTS = [
    "Question: 347 + 85 =\nAnswer:",
    "Question: 12 - 990 =\nAnswer:",
    "Rain",
    "The quick brown fox jumps over the lazy dog. Markets rallied on Tuesday.",
    "Question: 500 - 499 =\nAnswer:",
]


def _question(example: GenerationExample) -> tuple[int, str, int]:
    match = QUESTION.match(example.prompt)
    assert match is not None, example.prompt
    return int(match.group(1)), match.group(2), int(match.group(3))


def test_splits_sizes_and_format():
    splits = arithmetic_splits(seed=3, n_train=50, n_validation=20, n_test=30)

    assert len(splits.train) == 50
    assert len(splits.validation) == 20
    assert len(splits.test) == 30
    for example in splits.train + splits.validation + splits.test:
        a, operator, b = _question(example)
        assert 1 <= a <= 99
        assert 1 <= b <= 99
        expected = a + b if operator == "+" else a - b
        assert example.answer == str(expected)


def test_splits_disjoint_and_deterministic():
    splits = arithmetic_splits(seed=0, n_train=300, n_validation=100, n_test=100)
    again = arithmetic_splits(seed=0, n_train=300, n_validation=100, n_test=100)
    other_seed = arithmetic_splits(seed=1, n_train=300, n_validation=100, n_test=100)

    questions = [
        {_question(example) for example in split}
        for split in (splits.train, splits.validation, splits.test)
    ]
    assert sum(len(q) for q in questions) == 500
    assert len(set.union(*questions)) == 500
    assert again == splits
    assert other_seed.test != splits.test


def test_splits_cover_both_operators_and_negatives():
    splits = arithmetic_splits(seed=0, n_train=200, n_validation=10, n_test=10)
    operators = {_question(example)[1] for example in splits.train}
    lengths = {len(str(a)) for a, _, _ in map(_question, splits.train)}

    assert operators == {"+", "-"}
    assert any(example.answer.startswith("-") for example in splits.train)
    assert lengths == {1, 2}


def test_splits_with_larger_operands():
    splits = arithmetic_splits(
        seed=2, n_train=200, n_validation=10, n_test=10, operand_digits=(2, 3)
    )
    operands = [value for example in splits.train for value in _question(example)[::2]]

    assert min(operands) >= 10
    assert max(operands) <= 999
    assert {len(str(value)) for value in operands} == {2, 3}


def test_distinct_question_counts():
    # Two operators and 99 (1..99) or 990 (10..999) values for each operand.
    assert n_distinct_questions() == 2 * 99 * 99
    assert n_distinct_questions((2, 3)) == 2 * 990 * 990
    with pytest.raises(ValueError, match="19602 distinct"):
        arithmetic_splits(n_train=19_000, n_validation=400, n_test=400)
    assert len(arithmetic_splits(n_train=19_000, n_test=400, operand_digits=(2, 3)).train) == 19_000


def test_test_split_independent_of_other_counts():
    small = arithmetic_splits(seed=5, n_train=10, n_validation=10, n_test=40)
    large = arithmetic_splits(seed=5, n_train=200, n_validation=50, n_test=40)

    assert small.test == large.test


@pytest.mark.parametrize(
    "arguments",
    [
        {"seed": "0"},
        {"n_train": 0},
        {"n_validation": -1},
        {"n_test": 2.5},
        {"n_test": True},
        {"n_train": 2_000_000},
        {"operand_digits": ()},
        {"operand_digits": (0, 1)},
        {"operand_digits": (2, 2)},
        {"operand_digits": 2},
    ],
)
def test_splits_reject_invalid_arguments(arguments):
    with pytest.raises(ValueError, match=next(iter(arguments))):
        arithmetic_splits(**arguments)


def test_training_pairs_end_with_newline():
    examples = [GenerationExample("Question: 347 + 85 =\nAnswer:", "432")]

    assert arithmetic_training_pairs(examples) == [("Question: 347 + 85 =\nAnswer:", " 432\n")]


@pytest.mark.parametrize(
    ("prompt", "answer", "field"),
    [("", "1", "prompt"), ("Q", "", "answer"), ("Q", "   ", "answer"), ("Q", "1\n2", "newline")],
)
def test_generation_example_rejects_invalid(prompt, answer, field):
    with pytest.raises(ValueError, match=field):
        GenerationExample(prompt, answer)


def test_exact_match_strips_whitespace():
    assert exact_match([" 432", "-1 ", "7"], ["432", "-1", "8"]) == pytest.approx(2 / 3)
    assert exact_match([" 43"], ["432"]) == 0.0


def test_exact_match_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="one answer per prediction"):
        exact_match(["1"], ["1", "2"])
    with pytest.raises(ValueError, match="empty"):
        exact_match([], [])


@pytest.mark.parametrize(
    ("tokenizer_name", "build"),
    [("byte_tokenizer", build_tiny_llama), ("metaspace_tokenizer", build_tiny_gemma3)],
)
def test_batched_generation_matches_unbatched(request, tokenizer_name, build):
    tokenizer = request.getfixturevalue(tokenizer_name)
    model = build(len(tokenizer))
    padding_side = tokenizer.padding_side

    batched = generate_answers(
        model, tokenizer, PROMPTS, max_new_tokens=5, batch_size=3, show_progress=False
    )
    single = [
        generate_answers(model, tokenizer, [prompt], max_new_tokens=5, show_progress=False)[0]
        for prompt in PROMPTS
    ]

    assert batched == single
    assert tokenizer.padding_side == padding_side


def test_generation_matches_manual_greedy_decoding(byte_tokenizer):
    model = build_tiny_llama(len(byte_tokenizer))
    prompt = PROMPTS[0]

    ids = torch.tensor([byte_tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        for _ in range(4):
            next_id = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    expected = byte_tokenizer.decode(ids[0, -4:], skip_special_tokens=True).split("\n")[0]

    generated = generate_answers(
        model, byte_tokenizer, [prompt], max_new_tokens=4, show_progress=False
    )
    assert generated == [expected]


def test_generation_cuts_at_newline_and_restores_mode(byte_tokenizer):
    model = build_tiny_llama(len(byte_tokenizer))
    model.train()

    generated = generate_answers(
        model, byte_tokenizer, PROMPTS, max_new_tokens=12, batch_size=2, show_progress=False
    )

    assert all("\n" not in text for text in generated)
    assert model.training


def test_generate_answers_rejects_invalid_arguments(byte_tokenizer):
    model = build_tiny_llama(len(byte_tokenizer), layers=1)
    with pytest.raises(ValueError, match="prompts is empty"):
        generate_answers(model, byte_tokenizer, [], show_progress=False)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_answers(model, byte_tokenizer, ["Q"], max_new_tokens=0, show_progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        generate_answers(model, byte_tokenizer, ["Q"], batch_size=0, show_progress=False)


def test_evaluate_generation_scores_own_outputs(byte_tokenizer):
    model = build_tiny_llama(len(byte_tokenizer))
    generated = generate_answers(
        model, byte_tokenizer, PROMPTS[:3], max_new_tokens=4, show_progress=False
    )
    # Only the first expected answer is the model's own output, so only it can match.
    answers = [generated[0].strip() or "x", "no such answer", "no such answer"]
    examples = [GenerationExample(p, a) for p, a in zip(PROMPTS[:3], answers, strict=True)]

    result = evaluate_generation(
        model, byte_tokenizer, examples, max_new_tokens=4, show_progress=False
    )

    assert result.predictions == generated
    assert result.answers == answers
    assert result.correct[1:] == [False, False]
    assert result.correct[0] == bool(generated[0].strip())
    assert result.score == pytest.approx(sum(result.correct) / 3)


def test_evaluate_generation_rejects_empty(byte_tokenizer):
    model = build_tiny_llama(len(byte_tokenizer), layers=1)
    with pytest.raises(ValueError, match="examples is empty"):
        evaluate_generation(model, byte_tokenizer, [], show_progress=False)
