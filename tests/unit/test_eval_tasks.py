"""Tasks by name and from JSONL files (loracast.eval.tasks) on a tiny model."""

from __future__ import annotations

import json

import pytest

from loracast.eval.tasks import builtin_task, load_task
from loracast.eval.user_tasks import evaluate_user_task
from tests.conftest import build_tiny_llama


def test_arithmetic_task_splits():
    task = load_task("arithmetic", seed=3)

    assert task.metric == "exact match"
    assert task.higher_is_better
    assert len(task.validation) == 200
    assert len(task.test) == 200
    assert not {example.prompt for example in task.test} & {e.prompt for e in task.validation}


def test_unknown_task_and_split_rejected():
    with pytest.raises(ValueError, match="unknown task 'poetry'"):
        load_task("poetry")
    with pytest.raises(ValueError, match="unknown task"):
        builtin_task("tasks.jsonl")
    with pytest.raises(ValueError, match="split must be"):
        load_task("arithmetic").split("train")


def test_user_classification_scores_each_example(tmp_path, byte_tokenizer):
    records = [
        {"prompt": f"Item {i} is", "choices": [" red", " blue", " green"], "label": i % 3}
        for i in range(12)
    ]
    records += [
        {"prompt": f"Answer {i}:", "choices": [" yes", " no"], "label": i % 2} for i in range(6)
    ]
    path = tmp_path / "colours.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    model = build_tiny_llama(len(byte_tokenizer))

    task = load_task(path)
    result = task.score(model, byte_tokenizer, task.test, show_progress=False)
    expected = evaluate_user_task(
        model, byte_tokenizer, task.test, "classification", show_progress=False
    )

    assert task.name == "colours"
    assert task.metric == "accuracy"
    assert len(result.correct) == len(task.test)
    assert result.score == pytest.approx(expected)
    assert result.score == pytest.approx(sum(result.correct) / len(result.correct))


def test_empty_examples_rejected(byte_tokenizer):
    task = load_task("arithmetic")

    with pytest.raises(ValueError, match="examples is empty"):
        task.score(build_tiny_llama(len(byte_tokenizer)), byte_tokenizer, [])
