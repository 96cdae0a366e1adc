"""Evaluation tasks by name: held-out splits and one scoring function for each.

``load_task("sentiment")``, ``load_task("arithmetic")`` and ``load_task("shakespeare")`` give the
built-in tasks with their seeded validation and test splits; ``load_task("my_task.jsonl")``
reads a user task (see ``loracast.eval.user_tasks``). Every task scores a model the same way,
``task.score(model, tokenizer, examples)``, so the command line and the configurations table
handle all of them alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loracast.eval.arithmetic import arithmetic_splits, evaluate_generation
from loracast.eval.language_modeling import evaluate_language_modeling
from loracast.eval.sentiment import evaluate_sentiment, sentiment_splits
from loracast.eval.shakespeare import shakespeare_splits
from loracast.eval.user_tasks import (
    CLASSIFICATION,
    GENERATION,
    ChoiceExample,
    classification_correct,
    default_max_new_tokens,
    load_user_task,
)

BUILTIN_TASKS = ("sentiment", "arithmetic", "shakespeare")
# Passage lengths of the Shakespeare task, as in the benchmark: shorter passages keep
# language-model scoring affordable on a CPU.
SHAKESPEARE_CHARS = (200, 500)
MAX_TOKENS = 512


@dataclass(frozen=True)
class TaskScore:
    """A task score with the per-example results behind it.

    Attributes:
        score: the task metric over all examples.
        correct: whether each example was right, for tasks with right answers, else None.
    """

    score: float
    correct: list[bool] | None


# score(model, tokenizer, examples, show_progress) -> TaskScore
Scorer = Callable[[torch.nn.Module, Any, Sequence[Any], bool], TaskScore]


@dataclass(frozen=True)
class EvalTask:
    """A named task with held-out examples and its scoring function.

    Attributes:
        name: ``sentiment``, ``arithmetic``, ``shakespeare`` or a user task's file name.
        metric: ``accuracy``, ``exact match`` or ``bits per byte``.
        higher_is_better: False for bits per byte.
        validation: examples for choosing settings.
        test: examples for the final score, never used to choose settings.
        scorer: ``scorer(model, tokenizer, examples, show_progress)`` returning a ``TaskScore``.
    """

    name: str
    metric: str
    higher_is_better: bool
    validation: list[Any]
    test: list[Any]
    scorer: Scorer

    def split(self, name: str) -> list[Any]:
        """Return the ``validation`` or ``test`` examples."""
        if name not in ("validation", "test"):
            raise ValueError(f"split must be 'validation' or 'test', got {name!r}")
        return getattr(self, name)

    def score(
        self, model: torch.nn.Module, tokenizer, examples: Sequence[Any], *, show_progress=True
    ) -> TaskScore:
        """Score ``model`` on ``examples`` (a PeftModel, or a model with a cartridge attached)."""
        if len(examples) == 0:
            raise ValueError(f"examples is empty; pass examples of the {self.name} task")
        return self.scorer(model, tokenizer, examples, show_progress)


def sentiment_score(model, tokenizer, examples, show_progress) -> TaskScore:
    """Score tweet sentiment examples by accuracy, with per-example correctness."""
    result = evaluate_sentiment(model, tokenizer, examples, show_progress=show_progress)
    return TaskScore(score=result.accuracy, correct=result.correct)


def _generation_score(model, tokenizer, examples, show_progress, max_new_tokens=6) -> TaskScore:
    result = evaluate_generation(
        model,
        tokenizer,
        examples,
        max_new_tokens=max_new_tokens,
        batch_size=32,
        show_progress=show_progress,
    )
    return TaskScore(score=result.score, correct=result.correct)


def _bits_per_byte_score(model, tokenizer, texts, show_progress) -> TaskScore:
    result = evaluate_language_modeling(
        model, tokenizer, texts, max_tokens=MAX_TOKENS, show_progress=show_progress
    )
    return TaskScore(score=result.bits_per_byte, correct=None)


def _choice_score(model, tokenizer, examples: Sequence[ChoiceExample], show_progress) -> TaskScore:
    correct = classification_correct(model, tokenizer, examples, show_progress=show_progress)
    return TaskScore(score=sum(correct) / len(correct), correct=correct)


def _user_generation_score(model, tokenizer, examples, show_progress) -> TaskScore:
    max_new_tokens = default_max_new_tokens(tokenizer, examples)
    return _generation_score(model, tokenizer, examples, show_progress, max_new_tokens)


def builtin_task(name: str, seed: int = 0) -> EvalTask:
    """Return a built-in task with its seeded validation and test splits.

    Args:
        name: ``sentiment`` (tweets, 200 validation and 200 test), ``arithmetic`` (1- or
            2-digit addition and subtraction, 200 and 200) or ``shakespeare`` (passages of
            200-500 characters from held-out plays, 100 and 100).
        seed: selects the splits.
    """
    if name == "sentiment":
        splits = sentiment_splits(seed=seed)
        return EvalTask(name, "accuracy", True, splits.validation, splits.test, sentiment_score)
    if name == "arithmetic":
        splits = arithmetic_splits(seed=seed)
        return EvalTask(
            name, "exact match", True, splits.validation, splits.test, _generation_score
        )
    if name == "shakespeare":
        min_chars, max_chars = SHAKESPEARE_CHARS
        splits = shakespeare_splits(seed=seed, min_chars=min_chars, max_chars=max_chars)
        return EvalTask(
            name, "bits per byte", False, splits.validation, splits.test, _bits_per_byte_score
        )
    raise ValueError(
        f"unknown task {name!r}; use one of {', '.join(BUILTIN_TASKS)} or a .jsonl task file"
    )


def load_task(name_or_path: str | Path, seed: int = 0) -> EvalTask:
    """Return a built-in task by name, or a user task from a JSONL file.

    A user task's records are split in half into validation and test examples with ``seed``.
    Classification tasks score accuracy, generation tasks exact match and language-modelling
    tasks bits per byte.

    Raises:
        ValueError: the name is neither a built-in task nor a ``.jsonl`` path, or the file is
            invalid.
        FileNotFoundError: the ``.jsonl`` file does not exist.
    """
    text = str(name_or_path)
    if text in BUILTIN_TASKS:
        return builtin_task(text, seed)
    if not text.endswith(".jsonl"):
        raise ValueError(
            f"unknown task {text!r}; use one of {', '.join(BUILTIN_TASKS)} or a path to a "
            ".jsonl task file"
        )
    user = load_user_task(text, seed=seed)
    if user.kind == CLASSIFICATION:
        scorer: Scorer = _choice_score
    elif user.kind == GENERATION:
        scorer = _user_generation_score
    else:
        scorer = _bits_per_byte_score
    metric = user.metric.replace("_", " ")
    return EvalTask(user.name, metric, user.higher_is_better, user.validation, user.test, scorer)
