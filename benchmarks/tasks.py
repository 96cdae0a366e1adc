"""Benchmark tasks: splits, training pairs and per-example scoring behind one interface.

Every task returns per-example values whose weighted mean is the task score, so the
benchmark's metrics and bootstrap intervals treat all tasks alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from loracast.eval.arithmetic import (
    arithmetic_splits,
    arithmetic_training_pairs,
    evaluate_generation,
)
from loracast.eval.language_modeling import evaluate_language_modeling
from loracast.eval.sentiment import evaluate_sentiment, sentiment_splits, sentiment_training_pairs
from loracast.eval.shakespeare import shakespeare_splits, shakespeare_training_pairs


@dataclass
class Scores:
    """Per-example values of one evaluation.

    Attributes:
        values: one value per held-out example (1/0 for correct/incorrect, or bits per byte).
        weights: per-example weights of the mean (UTF-8 bytes for bits per byte), or None.
        correct: per-example correctness for tasks with a right answer, else None.
    """

    values: np.ndarray
    weights: np.ndarray | None
    correct: list[bool] | None

    @property
    def score(self) -> float:
        return float(np.average(self.values, weights=self.weights))


@dataclass
class BenchTask:
    """A benchmark task.

    Attributes:
        name: task name used in tables and ``benchmarks.json``.
        metric: name of the score.
        higher_is_better: False for losses (bits per byte).
        splits: ``splits(seed, n_train, n_test)`` returning train and test examples.
        validation: ``validation(seed, n_train, n_test)`` returning the validation examples of
            the same draw, disjoint from both, for choosing settings without the test split.
        training_pairs: turns training examples into ``(prompt, completion)`` pairs.
        evaluate: ``evaluate(model, tokenizer, examples)`` returning ``Scores``.
        held_out_texts: the raw text of held-out examples, for the corpus overlap check.
    """

    name: str
    metric: str
    higher_is_better: bool
    splits: Callable
    validation: Callable
    training_pairs: Callable
    evaluate: Callable
    held_out_texts: Callable


def _correct_scores(correct: list[bool]) -> Scores:
    return Scores(values=np.array(correct, dtype=float), weights=None, correct=list(correct))


def _sentiment_splits(seed, n_train, n_test):
    splits = sentiment_splits(seed=seed, n_train=n_train, n_test=n_test)
    return splits.train, splits.test


def _sentiment_validation(seed, n_train, n_test):
    return sentiment_splits(seed=seed, n_train=n_train, n_test=n_test).validation


def _arithmetic_splits(seed, n_train, n_test):
    splits = arithmetic_splits(seed=seed, n_train=n_train, n_test=n_test)
    return splits.train, splits.test


def _arithmetic_validation(seed, n_train, n_test):
    return arithmetic_splits(seed=seed, n_train=n_train, n_test=n_test).validation


# Short passages keep language-model training affordable on a CPU (see Settings in run.py).
SHAKESPEARE_CHARS = (200, 500)


def _shakespeare_draw(seed, n_train, n_test):
    min_chars, max_chars = SHAKESPEARE_CHARS
    return shakespeare_splits(
        seed=seed, n_train=n_train, n_test=n_test, min_chars=min_chars, max_chars=max_chars
    )


def _shakespeare_splits(seed, n_train, n_test):
    splits = _shakespeare_draw(seed, n_train, n_test)
    return splits.train, splits.test


def _shakespeare_validation(seed, n_train, n_test):
    return _shakespeare_draw(seed, n_train, n_test).validation


def _evaluate_sentiment(model, tokenizer, examples) -> Scores:
    result = evaluate_sentiment(model, tokenizer, examples, show_progress=False)
    return _correct_scores(result.correct)


def _evaluate_arithmetic(model, tokenizer, examples) -> Scores:
    # Larger batches cut the per-call overhead of ``generate``: 48 prompts took 7 s in one batch
    # and 15 s in batches of 8 on 2 CPU cores.
    result = evaluate_generation(model, tokenizer, examples, batch_size=32, show_progress=False)
    return _correct_scores(result.correct)


def _evaluate_shakespeare(model, tokenizer, passages) -> Scores:
    result = evaluate_language_modeling(
        model, tokenizer, passages, max_tokens=512, show_progress=False
    )
    return Scores(
        values=np.array(result.per_text, dtype=float),
        weights=np.array(result.bytes, dtype=float),
        correct=None,
    )


TASKS = {
    "sentiment": BenchTask(
        name="sentiment",
        metric="accuracy",
        higher_is_better=True,
        splits=_sentiment_splits,
        validation=_sentiment_validation,
        training_pairs=sentiment_training_pairs,
        evaluate=_evaluate_sentiment,
        held_out_texts=lambda examples: [example.text for example in examples],
    ),
    "arithmetic": BenchTask(
        name="arithmetic",
        metric="exact match",
        higher_is_better=True,
        splits=_arithmetic_splits,
        validation=_arithmetic_validation,
        training_pairs=arithmetic_training_pairs,
        evaluate=_evaluate_arithmetic,
        held_out_texts=lambda examples: [example.prompt for example in examples],
    ),
    "shakespeare": BenchTask(
        name="shakespeare",
        metric="bits per byte",
        higher_is_better=False,
        splits=_shakespeare_splits,
        validation=_shakespeare_validation,
        training_pairs=shakespeare_training_pairs,
        evaluate=_evaluate_shakespeare,
        held_out_texts=lambda passages: list(passages),
    ),
}
