"""Tests for user tasks read from JSONL files (loracast.eval.user_tasks)."""

from __future__ import annotations

import json

import pytest

from loracast.eval.arithmetic import GenerationExample, generate_answers
from loracast.eval.classification import score_choices
from loracast.eval.language_modeling import bits_per_byte
from loracast.eval.user_tasks import (
    ChoiceExample,
    UserTask,
    evaluate_user_task,
    load_user_task,
    read_user_examples,
)
from tests.conftest import build_tiny_llama

CLASSIFICATION_RECORDS = [
    {"prompt": "Is the sky blue?", "choices": [" yes", " no"], "label": 0},
    {"prompt": "Is fire cold?", "choices": [" yes", " no"], "label": 1},
    {"prompt": "Pick a colour:", "choices": [" red", " green", " blue"], "label": 2},
    {"prompt": "Is snow white?", "choices": [" yes", " no"], "label": 0, "id": "extra"},
    {"prompt": "Best season:", "choices": [" winter", " summer rain"], "label": 1},
]
GENERATION_RECORDS = [
    {"prompt": "Question: 2 + 3 =\nAnswer:", "answer": "5"},
    {"prompt": "Question: 10 - 4 =\nAnswer:", "answer": "6"},
    {"prompt": "Capital of France:", "answer": "Paris"},
    {"prompt": "Opposite of up:", "answer": " down "},
]
TEXT_RECORDS = [
    {"text": "The quick brown fox jumps over the lazy dog."},
    {"text": "Rain, wind and snow: the forecast looks grim."},
    {"text": "A small café in Zürich serves crêpes."},
]


def _write(tmp_path, lines, name="task.jsonl"):
    path = tmp_path / name
    path.write_text(
        "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n",
        encoding="utf-8",
    )
    return path


@pytest.mark.parametrize(
    ("records", "kind", "example_type", "metric", "higher_is_better"),
    [
        (CLASSIFICATION_RECORDS, "classification", ChoiceExample, "accuracy", True),
        (GENERATION_RECORDS, "generation", GenerationExample, "exact_match", True),
        (TEXT_RECORDS, "language_modeling", str, "bits_per_byte", False),
    ],
)
def test_load_detects_kind(tmp_path, records, kind, example_type, metric, higher_is_better):
    path = _write(tmp_path, records, name="my_task.jsonl")

    task = load_user_task(path)

    assert task.kind == kind
    assert task.name == "my_task"
    assert task.metric == metric
    assert task.higher_is_better is higher_is_better
    assert len(task.validation) + len(task.test) == len(records)
    assert all(isinstance(example, example_type) for example in task.validation + task.test)


def test_load_parses_fields(tmp_path):
    path = _write(tmp_path, CLASSIFICATION_RECORDS[2:3] + CLASSIFICATION_RECORDS[2:3])

    task = load_user_task(path)

    expected = ChoiceExample("Pick a colour:", (" red", " green", " blue"), 2)
    assert task.validation == [expected]
    assert task.test == [expected]


def test_split_is_seeded_and_disjoint(tmp_path):
    records = [{"text": f"Passage number {index} is here."} for index in range(20)]
    path = _write(tmp_path, records)

    task = load_user_task(path, seed=3, validation_fraction=0.25)
    again = load_user_task(path, seed=3, validation_fraction=0.25)
    other = load_user_task(path, seed=4, validation_fraction=0.25)

    assert len(task.validation) == 5
    assert len(task.test) == 15
    assert set(task.validation).isdisjoint(task.test)
    assert set(task.validation) | set(task.test) == {record["text"] for record in records}
    assert again == task
    assert other.validation != task.validation


def test_split_keeps_both_sides_non_empty(tmp_path):
    path = _write(tmp_path, TEXT_RECORDS[:2])

    small = load_user_task(path, validation_fraction=0.01)
    large = load_user_task(path, validation_fraction=0.99)

    assert (len(small.validation), len(small.test)) == (1, 1)
    assert (len(large.validation), len(large.test)) == (1, 1)


def test_blank_lines_and_byte_order_mark_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    lines = [json.dumps(record) for record in TEXT_RECORDS]
    path.write_text("\ufeff" + lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n   \n", "utf-8")

    kind, examples = read_user_examples(path)

    assert kind == "language_modeling"
    assert examples == [record["text"] for record in TEXT_RECORDS]


@pytest.mark.parametrize(
    ("lines", "line_number", "message"),
    [
        ([TEXT_RECORDS[0], '{"text": "unterminated'], 2, "invalid JSON"),
        ([TEXT_RECORDS[0], "[1, 2]"], 2, "expected a JSON object"),
        ([{"prompt": "Q", "label": 0}], 1, "missing field.*'choices'"),
        ([GENERATION_RECORDS[0], {"prompt": "Q"}], 2, "missing field.*'answer'"),
        (
            [CLASSIFICATION_RECORDS[0], {"prompt": "Q", "choices": [" a", " b"], "label": 2}],
            2,
            "label 2 is out of range",
        ),
        (
            [CLASSIFICATION_RECORDS[0], {"prompt": "Q", "choices": [" a", " b"], "label": "0"}],
            2,
            "label must be an integer",
        ),
        ([{"prompt": "Q", "choices": " a, b", "label": 0}], 1, "'choices' must be a list"),
        ([{"prompt": "Q", "choices": [" a"], "label": 0}], 1, "at least two"),
        ([{"prompt": "Q", "choices": [" a", " a"], "label": 0}], 1, "distinct"),
        ([GENERATION_RECORDS[0], {"prompt": "Q", "answer": "1\n2"}], 2, "newline"),
        ([GENERATION_RECORDS[0], {"prompt": "", "answer": "1"}], 2, "'prompt' must be"),
        ([TEXT_RECORDS[0], {"text": 42}], 2, "'text' must be a non-empty string"),
        ([TEXT_RECORDS[0], TEXT_RECORDS[1], GENERATION_RECORDS[0]], 3, "looks like a generation"),
        ([CLASSIFICATION_RECORDS[0], TEXT_RECORDS[0]], 2, "looks like a language_modeling"),
        ([{"question": "Q", "reply": "A"}], 1, "cannot detect the task kind"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, lines, line_number, message):
    path = _write(tmp_path, lines)

    with pytest.raises(ValueError, match=message) as error:
        load_user_task(path)

    assert f"{path} line {line_number}:" in str(error.value)


def test_empty_file_rejected(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n", encoding="utf-8")

    with pytest.raises(ValueError, match="contains no records") as error:
        load_user_task(path)

    assert str(path) in str(error.value)


def test_single_record_rejected(tmp_path):
    path = _write(tmp_path, TEXT_RECORDS[:1])

    with pytest.raises(ValueError, match="at least two"):
        load_user_task(path)


def test_missing_file_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_user_task(tmp_path / "missing.jsonl")


@pytest.mark.parametrize(
    "arguments", [{"seed": 1.5}, {"validation_fraction": 0}, {"validation_fraction": 1.0}]
)
def test_invalid_split_arguments_rejected(tmp_path, arguments):
    path = _write(tmp_path, TEXT_RECORDS)

    with pytest.raises(ValueError, match=next(iter(arguments))):
        load_user_task(path, **arguments)


def test_user_task_validates_fields():
    with pytest.raises(ValueError, match="kind"):
        UserTask(kind="ranking", name="t", validation=["a"], test=["b"])
    with pytest.raises(ValueError, match="validation is empty"):
        UserTask(kind="language_modeling", name="t", validation=[], test=["b"])


@pytest.fixture()
def tiny_llama(byte_tokenizer):
    return build_tiny_llama(len(byte_tokenizer), layers=2)


def test_classification_matches_per_example_scoring(tiny_llama, byte_tokenizer):
    examples = [
        ChoiceExample(r["prompt"], tuple(r["choices"]), r["label"]) for r in CLASSIFICATION_RECORDS
    ]

    score = evaluate_user_task(
        tiny_llama, byte_tokenizer, examples, "classification", show_progress=False
    )

    correct = 0
    for example in examples:
        scores = score_choices(
            tiny_llama, byte_tokenizer, [example.prompt], example.choices, show_progress=False
        )
        correct += int(scores[0].argmax().item() == example.label)
    assert score == pytest.approx(correct / len(examples))


def test_generation_scores_exact_match(tiny_llama, byte_tokenizer):
    prompts = [record["prompt"] for record in GENERATION_RECORDS]
    generated = generate_answers(
        tiny_llama, byte_tokenizer, prompts, max_new_tokens=3, show_progress=False
    )
    # Two expected answers are the model's own outputs, and the other two never match.
    answers = [generated[0].strip() or "x", "never", generated[2].strip() or "x", "never"]
    examples = [GenerationExample(p, a) for p, a in zip(prompts, answers, strict=True)]

    score = evaluate_user_task(
        tiny_llama, byte_tokenizer, examples, "generation", max_new_tokens=3, show_progress=False
    )

    expected = sum(int(g.strip() == a) for g, a in zip(generated, answers, strict=True)) / 4
    assert score == pytest.approx(expected)


def test_generation_default_token_budget(tiny_llama, byte_tokenizer):
    examples = [GenerationExample(r["prompt"], r["answer"]) for r in GENERATION_RECORDS]

    score = evaluate_user_task(
        tiny_llama, byte_tokenizer, examples, "generation", show_progress=False
    )

    assert 0.0 <= score <= 1.0


def test_language_modeling_matches_bits_per_byte(tiny_llama, byte_tokenizer):
    texts = [record["text"] for record in TEXT_RECORDS]

    score = evaluate_user_task(
        tiny_llama, byte_tokenizer, texts, "language_modeling", show_progress=False
    )

    expected = bits_per_byte(tiny_llama, byte_tokenizer, texts, show_progress=False)
    assert score == pytest.approx(expected)
    assert score > 0


def test_evaluate_rejects_mismatched_examples(tiny_llama, byte_tokenizer):
    with pytest.raises(ValueError, match="kind must be one of"):
        evaluate_user_task(tiny_llama, byte_tokenizer, ["text"], "ranking")
    with pytest.raises(ValueError, match="examples is empty"):
        evaluate_user_task(tiny_llama, byte_tokenizer, [], "generation")
    with pytest.raises(TypeError, match="example 0 is a str"):
        evaluate_user_task(tiny_llama, byte_tokenizer, ["text"], "classification")


def test_end_to_end_from_file(tmp_path, tiny_llama, byte_tokenizer):
    path = _write(tmp_path, CLASSIFICATION_RECORDS)
    task = load_user_task(path, seed=1)

    score = evaluate_user_task(
        tiny_llama, byte_tokenizer, task.test, task.kind, batch_size=2, show_progress=False
    )

    assert 0.0 <= score <= 1.0
