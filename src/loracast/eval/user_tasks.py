"""Evaluation tasks read from a user's JSONL file, so a transfer can be measured on any data.

Each non-blank line of the file is one JSON object of one of three kinds:

- classification: ``{"prompt": str, "choices": [str, ...], "label": int}``. Each choice is
  appended to the prompt as is, so it usually starts with a space (``" yes"``), and the
  prediction is the choice with the highest summed log-likelihood. ``label`` indexes
  ``choices``. Scored by accuracy, higher is better.
- generation: ``{"prompt": str, "answer": str}``. The model generates greedily after the prompt,
  the output is cut at the first newline and compared with ``answer`` after stripping
  whitespace. Scored by exact match, higher is better.
- language modelling: ``{"text": str}``. Scored by bits per byte, lower is better.

The kind is detected from the first record, and every other line must be of the same kind.
Other fields (an ``"id"``, say) are ignored.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from loracast.eval.arithmetic import GenerationExample, evaluate_generation
from loracast.eval.classification import encode_completions, score_choices
from loracast.eval.language_modeling import bits_per_byte

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

CLASSIFICATION = "classification"
GENERATION = "generation"
LANGUAGE_MODELING = "language_modeling"
TASK_KINDS = (CLASSIFICATION, GENERATION, LANGUAGE_MODELING)

# The fields each kind requires.
KIND_FIELDS = {
    CLASSIFICATION: ("prompt", "choices", "label"),
    GENERATION: ("prompt", "answer"),
    LANGUAGE_MODELING: ("text",),
}
# A record's kind is the first kind with any of these fields, so a record that lacks a required
# field is still recognised and the error can name that field.
KIND_MARKERS = {
    CLASSIFICATION: ("choices", "label"),
    GENERATION: ("answer",),
    LANGUAGE_MODELING: ("text",),
}
METRICS = {
    CLASSIFICATION: "accuracy",
    GENERATION: "exact_match",
    LANGUAGE_MODELING: "bits_per_byte",
}

# Generated answers may tokenize into more tokens than the reference answer, so generation gets
# this many tokens beyond the longest answer.
EXTRA_NEW_TOKENS = 4


@dataclass(frozen=True)
class ChoiceExample:
    """One example of a classification task whose choices are given per example.

    Attributes:
        prompt: the text the choices are appended to.
        choices: the candidate completions, each appended to the prompt as is.
        label: the index of the correct choice in ``choices``.
    """

    prompt: str
    choices: tuple[str, ...]
    label: int

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt:
            raise ValueError(f"prompt must be a non-empty string, got {self.prompt!r}")
        if len(self.choices) < 2 or not all(
            isinstance(choice, str) and choice for choice in self.choices
        ):
            raise ValueError(
                f"choices must be at least two non-empty strings, got {list(self.choices)!r}"
            )
        if len(set(self.choices)) != len(self.choices):
            raise ValueError(
                f"choices must be distinct, got {list(self.choices)!r}; remove the repeated choice"
            )
        if isinstance(self.label, bool) or not isinstance(self.label, int):
            raise ValueError(f"label must be an integer index into choices, got {self.label!r}")
        if not 0 <= self.label < len(self.choices):
            raise ValueError(
                f"label {self.label} is out of range for {len(self.choices)} choices; "
                f"expected an index from 0 to {len(self.choices) - 1}"
            )


@dataclass(frozen=True)
class UserTask:
    """A task read from a JSONL file, split into validation and test examples.

    Attributes:
        kind: ``"classification"``, ``"generation"`` or ``"language_modeling"``.
        name: the task's name, the file name without its extension.
        validation: examples for choosing settings: ``ChoiceExample``, ``GenerationExample`` or
            text strings, depending on ``kind``.
        test: examples for the final score, of the same type as ``validation``.
    """

    kind: str
    name: str
    validation: list[Any]
    test: list[Any]

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"kind must be one of {TASK_KINDS}, got {self.kind!r}")
        for split in ("validation", "test"):
            if not getattr(self, split):
                raise ValueError(f"{split} is empty; a user task needs examples in both splits")

    @property
    def metric(self) -> str:
        """The metric name: ``"accuracy"``, ``"exact_match"`` or ``"bits_per_byte"``."""
        return METRICS[self.kind]

    @property
    def higher_is_better(self) -> bool:
        """False for language modelling, whose bits per byte are better when lower."""
        return self.kind != LANGUAGE_MODELING


def _detect_kind(record: dict[str, Any]) -> str | None:
    for kind, markers in KIND_MARKERS.items():
        if any(field in record for field in markers):
            return kind
    return None


def _expected_fields(kind: str) -> str:
    return ", ".join(KIND_FIELDS[kind])


def _check_string(record: dict[str, Any], field: str, where: str) -> str:
    value = record[field]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: field {field!r} must be a non-empty string, got {value!r}")
    return value


def _parse_record(record: dict[str, Any], kind: str, where: str, kind_line: int) -> Any:
    """Build the example of ``kind`` (detected from line ``kind_line``) from one parsed line.

    ``where`` names the file and line for error messages.
    """
    missing = [field for field in KIND_FIELDS[kind] if field not in record]
    if missing:
        other = _detect_kind(record)
        hint = ""
        if other is not None and other != kind:
            hint = (
                f" The line looks like a {other} record, but every line must be of the kind "
                f"detected from the first record ({kind}, line {kind_line})."
            )
        raise ValueError(
            f"{where}: missing field(s) {missing}; a {kind} record needs the fields "
            f"{_expected_fields(kind)}.{hint}"
        )

    if kind == LANGUAGE_MODELING:
        return _check_string(record, "text", where)

    prompt = _check_string(record, "prompt", where)
    if kind == GENERATION:
        answer = _check_string(record, "answer", where)
        try:
            return GenerationExample(prompt=prompt, answer=answer)
        except ValueError as error:
            raise ValueError(f"{where}: invalid field 'answer': {error}") from None

    choices = record["choices"]
    if not isinstance(choices, list):
        raise ValueError(
            f'{where}: field \'choices\' must be a list of strings such as [" yes", " no"], '
            f"got {choices!r}"
        )
    try:
        return ChoiceExample(prompt=prompt, choices=tuple(choices), label=record["label"])
    except ValueError as error:
        raise ValueError(f"{where}: invalid classification record: {error}") from None


def read_user_examples(path: str | Path) -> tuple[str, list[Any]]:
    """Read and validate every record of a JSONL task file.

    Blank lines are skipped. A UTF-8 byte order mark at the start of the file is ignored.

    Args:
        path: the JSONL file (see the module docstring for the record formats).

    Returns:
        ``(kind, examples)`` in file order.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file has no records, or a line is not a JSON object, lacks a field,
            has an invalid value, or is of another kind than the first record. The message
            names the file and the line number.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} not found; pass an existing JSONL file")

    kind: str | None = None
    kind_line = 0
    examples: list[Any] = []
    with path.open(encoding="utf-8-sig") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path} line {line_number}"
            try:
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{where}: invalid JSON at column {error.colno} ({error.msg}); write one "
                    "JSON object per line"
                ) from None
            if not isinstance(record, dict):
                raise ValueError(
                    f"{where}: expected a JSON object, got {type(record).__name__} {record!r}"
                )

            if kind is None:
                kind, kind_line = _detect_kind(record), line_number
                if kind is None:
                    raise ValueError(
                        f"{where}: cannot detect the task kind from the fields {sorted(record)}; "
                        "expected classification (prompt, choices, label), generation "
                        "(prompt, answer) or language modelling (text)"
                    )
            examples.append(_parse_record(record, kind, where, kind_line))

    if kind is None:
        raise ValueError(f"{path} contains no records; write one JSON object per line")
    return kind, examples


def load_user_task(
    path: str | Path, *, seed: int = 0, validation_fraction: float = 0.5
) -> UserTask:
    """Read a JSONL task file and split its records into validation and test examples.

    The records are shuffled with ``random.Random(seed)``. The first
    ``round(n * validation_fraction)`` (at least 1 and at most ``n - 1``) become the validation
    split and the rest the test split. The same file and arguments always give the same splits.

    Args:
        path: the JSONL file (see the module docstring for the record formats).
        seed: any integer, which selects the split.
        validation_fraction: the share of records in the validation split, between 0 and 1.

    Returns:
        The task, named after the file without its extension.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is invalid (see ``read_user_examples``), has fewer than two
            records, or ``seed`` or ``validation_fraction`` is invalid.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if (
        isinstance(validation_fraction, bool)
        or not isinstance(validation_fraction, (int, float))
        or not 0 < validation_fraction < 1
    ):
        raise ValueError(
            f"validation_fraction must be a number between 0 and 1 (exclusive), "
            f"got {validation_fraction!r}"
        )

    path = Path(path)
    kind, examples = read_user_examples(path)
    if len(examples) < 2:
        raise ValueError(
            f"{path} has {len(examples)} record; a task needs at least two, one for the "
            "validation split and one for the test split"
        )

    random.Random(seed).shuffle(examples)
    n_validation = min(max(round(len(examples) * validation_fraction), 1), len(examples) - 1)
    task = UserTask(
        kind=kind,
        name=path.stem,
        validation=examples[:n_validation],
        test=examples[n_validation:],
    )
    logger.info(
        "loaded %s task %r from %s: %d validation and %d test examples",
        kind,
        task.name,
        path,
        len(task.validation),
        len(task.test),
    )
    return task


def classification_correct(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[ChoiceExample],
    batch_size: int = 8,
    show_progress: bool = True,
) -> list[bool]:
    """Return whether the most likely choice of each example is its label, in input order.

    Examples that share a choice list are scored together.
    """
    groups: dict[tuple[str, ...], list[int]] = {}
    for index, example in enumerate(examples):
        groups.setdefault(example.choices, []).append(index)

    correct = [False] * len(examples)
    for choices, indices in groups.items():
        scores = score_choices(
            model,
            tokenizer,
            [examples[index].prompt for index in indices],
            choices,
            batch_size=batch_size,
            show_progress=show_progress,
        )  # (len(indices), len(choices))
        for index, predicted in zip(indices, scores.argmax(dim=1).tolist(), strict=True):
            correct[index] = predicted == examples[index].label
    return correct


def default_max_new_tokens(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[GenerationExample]
) -> int:
    answers = [" " + example.answer.strip() for example in examples]
    longest = max(len(ids) for ids in encode_completions(tokenizer, answers))
    return longest + EXTRA_NEW_TOKENS


def evaluate_user_task(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Any],
    kind: str,
    *,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    max_tokens: int = 256,
    show_progress: bool = True,
) -> float:
    """Score a model on examples of a user task, e.g. ``task.test`` with ``task.kind``.

    Args:
        model: a causal LM (a transformers model or a PeftModel around one).
        tokenizer: the model's tokenizer.
        examples: ``ChoiceExample``, ``GenerationExample`` or text strings, matching ``kind``.
        kind: ``"classification"``, ``"generation"`` or ``"language_modeling"``.
        batch_size: sequences per forward pass (or per ``generate`` call). By default 8 for
            classification and generation and 4 for language modelling, whose batches hold
            logits at every position.
        max_new_tokens: generation only, the maximum tokens generated per example. By default
            the token count of the longest answer (with a leading space) plus 4.
        max_tokens: language modelling only, the maximum tokens per text.
        show_progress: show tqdm progress bars.

    Returns:
        Accuracy or exact match (higher is better), or bits per byte (lower is better), as
        ``UserTask.metric`` names.

    Raises:
        ValueError: ``kind`` is unknown or ``examples`` is empty.
        TypeError: an example is not of the type that ``kind`` needs.
    """
    if kind not in TASK_KINDS:
        raise ValueError(f"kind must be one of {TASK_KINDS}, got {kind!r}")
    if len(examples) == 0:
        raise ValueError("examples is empty; pass at least one example, e.g. task.test")
    expected_type = {CLASSIFICATION: ChoiceExample, GENERATION: GenerationExample}.get(kind, str)
    for index, example in enumerate(examples):
        if not isinstance(example, expected_type):
            raise TypeError(
                f"example {index} is a {type(example).__name__}, but a {kind} task needs "
                f"{expected_type.__name__} examples; pass the examples of a task of that kind"
            )

    if batch_size is None:
        batch_size = 4 if kind == LANGUAGE_MODELING else 8

    if kind == CLASSIFICATION:
        correct = classification_correct(model, tokenizer, examples, batch_size, show_progress)
        return sum(correct) / len(correct)
    if kind == GENERATION:
        if max_new_tokens is None:
            max_new_tokens = default_max_new_tokens(tokenizer, examples)
        return evaluate_generation(
            model,
            tokenizer,
            examples,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            show_progress=show_progress,
        ).score
    return bits_per_byte(
        model,
        tokenizer,
        examples,
        max_tokens=max_tokens,
        batch_size=batch_size,
        show_progress=show_progress,
    )
