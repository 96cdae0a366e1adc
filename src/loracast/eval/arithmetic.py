"""Addition and subtraction of small integers, scored by exact match of a greedy generation.

Each question is ``"Question: {a} {op} {b} =\\nAnswer:"`` with ``op`` either ``+`` or ``-``. By
default each operand has 1 or 2 digits (1 to 99); ``operand_digits=(2, 3)`` asks for 10 to 999.
The expected completion is a space and the result, e.g. ``" 43"`` or ``" -26"``, because
subtraction may give a negative number. The model generates greedily after the prompt, the
generated text is cut at the first newline, and a prediction is correct when it equals the
answer after stripping whitespace.

The default is 1 or 2 digits because the benchmark models do not learn 2- or 3-digit questions
from 400 examples with the benchmark's LoRA recipe. Gemma-3-270M reached 0.025 exact match
after one epoch (200 questions), 0.021 after three epochs at a learning rate of 3e-3 and 0.062
after one epoch of 1,200 examples (96 questions each). On 96 questions with 1 or 2 digits it
went from 0.010 to 0.396 after one epoch of 400 examples.

The generation helpers (``generate_answers``, ``exact_match``, ``evaluate_generation``) work for
any ``GenerationExample`` task, not only arithmetic.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from loracast.eval.classification import encode_prompts, model_device, pad_left, pad_token_id
from loracast.eval.sentiment import TaskSplits

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

ARITHMETIC_PROMPT_TEMPLATE = "Question: {a} {op} {b} =\nAnswer:"
ARITHMETIC_OPERATORS = ("+", "-")
# Each operand first draws one of these digit counts with equal probability, then a uniform
# value with that many digits.
DEFAULT_OPERAND_DIGITS = (1, 2)
MAX_OPERAND_DIGITS = 6


@dataclass(frozen=True)
class GenerationExample:
    """One example of a generation task.

    Attributes:
        prompt: the text the model continues.
        answer: the expected generation, compared after stripping whitespace. It contains no
            newline, because generations are cut at the first newline.
    """

    prompt: str
    answer: str

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt:
            raise ValueError(f"prompt must be a non-empty string, got {self.prompt!r}")
        if not isinstance(self.answer, str) or not self.answer.strip():
            raise ValueError(
                f"answer must be a string with a non-space character, got {self.answer!r}"
            )
        if "\n" in self.answer:
            raise ValueError(
                f"answer {self.answer!r} contains a newline; generations are cut at the first "
                "newline, so such an answer never matches. Use a single-line answer"
            )


@dataclass(frozen=True)
class GenerationResult:
    """Exact-match score of a generation task with the per-example outputs behind it.

    Attributes:
        score: the fraction of predictions equal to their answers after stripping whitespace.
        predictions: the generated text of each example, cut at the first newline.
        answers: the expected answer of each example.
        correct: whether each prediction matched, in input order.
    """

    score: float
    predictions: list[str]
    answers: list[str]
    correct: list[bool]


def format_arithmetic_prompt(a: int, operator: str, b: int) -> str:
    """Build the prompt for ``a operator b``, e.g. ``"Question: 347 + 85 =\\nAnswer:"``."""
    return ARITHMETIC_PROMPT_TEMPLATE.format(a=a, op=operator, b=b)


def operand_range(digits: int) -> tuple[int, int]:
    """Return the smallest and largest operand with ``digits`` digits: 1..9, 10..99, 100..999."""
    return (1 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _check_operand_digits(operand_digits: object) -> tuple[int, ...]:
    digits = tuple(operand_digits) if isinstance(operand_digits, (list, tuple)) else ()
    valid = all(
        not isinstance(d, bool) and isinstance(d, int) and 1 <= d <= MAX_OPERAND_DIGITS
        for d in digits
    )
    if not digits or not valid or len(set(digits)) != len(digits):
        raise ValueError(
            f"operand_digits must be a non-empty tuple of distinct integers from 1 to "
            f"{MAX_OPERAND_DIGITS}, got {operand_digits!r}; for example (1, 2) or (2, 3)"
        )
    return digits


def n_distinct_questions(operand_digits: Sequence[int] = DEFAULT_OPERAND_DIGITS) -> int:
    """Return how many distinct questions ``arithmetic_splits`` can draw with these digit counts."""
    values = sum(high - low + 1 for low, high in map(operand_range, operand_digits))
    return len(ARITHMETIC_OPERATORS) * values * values


def _draw_operand(rng: random.Random, operand_digits: tuple[int, ...]) -> int:
    low, high = operand_range(operand_digits[rng.randrange(len(operand_digits))])
    return rng.randint(low, high)


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def arithmetic_splits(
    seed: int = 0,
    n_train: int = 400,
    n_validation: int = 200,
    n_test: int = 200,
    operand_digits: Sequence[int] = DEFAULT_OPERAND_DIGITS,
) -> TaskSplits:
    """Generate disjoint train, validation and test splits of arithmetic questions.

    Questions are drawn with ``random.Random(seed)``. Each question picks ``+`` or ``-`` with
    equal probability, and each operand draws one of ``operand_digits`` with equal probability
    and is then uniform over the values with that many digits (1..9 for one digit). A question
    already drawn is drawn again, so no ``(a, op, b)`` appears twice in or across splits. The
    test split is drawn first, then validation, then train, so the test split depends only on
    ``seed``, ``n_test`` and ``operand_digits``. The same arguments always give the same splits.

    Args:
        seed: any integer, which selects the questions.
        n_train: the number of training examples.
        n_validation: the number of validation examples.
        n_test: the number of test examples.
        operand_digits: the digit counts an operand may have, e.g. ``(1, 2)`` or ``(2, 3)``.

    Returns:
        Splits of ``GenerationExample`` whose answers are the results as decimal strings
        without a leading space, e.g. ``"43"`` or ``"-26"``.

    Raises:
        ValueError: a count is not a positive integer, the counts add up to more than the
            distinct questions there are (19,602 for 1 or 2 digits), ``seed`` is not an
            integer, or ``operand_digits`` is not a tuple of distinct integers from 1 to 6.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    for name, value in (("n_train", n_train), ("n_validation", n_validation), ("n_test", n_test)):
        _check_count(name, value)
    digits = _check_operand_digits(operand_digits)
    total = n_train + n_validation + n_test
    available = n_distinct_questions(digits)
    if total > available:
        raise ValueError(
            f"n_train + n_validation + n_test is {total}, but operand_digits={digits} gives "
            f"only {available} distinct questions; request fewer examples or more digits"
        )

    # Duplicates are redrawn. That is cheap while the splits use a small share of all questions.
    rng = random.Random(seed)
    seen: set[tuple[int, str, int]] = set()
    splits: dict[str, list[GenerationExample]] = {}
    for name, size in (("test", n_test), ("validation", n_validation), ("train", n_train)):
        examples: list[GenerationExample] = []
        while len(examples) < size:
            operator = ARITHMETIC_OPERATORS[rng.randrange(len(ARITHMETIC_OPERATORS))]
            a, b = _draw_operand(rng, digits), _draw_operand(rng, digits)
            if (a, operator, b) in seen:
                continue
            seen.add((a, operator, b))
            result = a + b if operator == "+" else a - b
            prompt = format_arithmetic_prompt(a, operator, b)
            examples.append(GenerationExample(prompt=prompt, answer=str(result)))
        splits[name] = examples

    return TaskSplits(train=splits["train"], validation=splits["validation"], test=splits["test"])


def arithmetic_training_pairs(examples: Sequence[GenerationExample]) -> list[tuple[str, str]]:
    """Turn examples into ``(prompt, completion)`` pairs for ``loracast.train.train_lora``.

    The completion is a space, the answer and a newline, e.g. ``" 43\\n"``. The newline teaches
    the model where to stop: generations are cut at the first newline, so a model trained on
    the bare answer keeps writing after a right result (``" 149 = "``) and never matches.
    """
    return [(example.prompt, " " + example.answer + "\n") for example in examples]


def _generate_batch(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    sequences: Sequence[list[int]],
    max_new_tokens: int,
    pad_id: int,
    device: torch.device,
) -> list[str]:
    """Greedily continue one batch of prompts and return each new text up to its first newline."""
    # Left padding puts every prompt's last token in the last column, so each row's first new
    # token is generated from its own prompt. The attention mask hides the padding, and
    # transformers derives position ids from it.
    input_ids, attention_mask = pad_left(sequences, pad_id)
    # The tokenizer decides which id ends text: a tiny or converted model's generation config
    # may carry a default EOS id that means something else in this vocabulary.
    output = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    new_tokens = output[:, input_ids.shape[1] :].cpu()  # (batch, <= max_new_tokens)
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [text.split("\n", 1)[0] for text in texts]


def generate_answers(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 6,
    batch_size: int = 8,
    show_progress: bool = True,
) -> list[str]:
    """Generate a greedy continuation of each prompt, cut at the first newline.

    Prompts are tokenized with ``encode_prompts``, as ``train_lora`` tokenizes training
    prompts, sorted by length and run in left-padded batches under ``torch.no_grad()`` with the
    model in eval mode. The model's previous train/eval mode is restored afterwards. Padding is
    built here, so the tokenizer's ``padding_side`` is never changed. Generation stops at the
    tokenizer's EOS token or after ``max_new_tokens``. Only the new tokens are decoded, with
    special tokens skipped.

    Args:
        model: a causal LM (a transformers model or a PeftModel around one).
        tokenizer: the model's tokenizer.
        prompts: the prompts to continue.
        max_new_tokens: the maximum number of generated tokens per prompt.
        batch_size: the number of prompts per ``generate`` call.
        show_progress: show a tqdm progress bar over batches.

    Returns:
        The generated text of each prompt, in input order, up to (not including) the first
        newline. Surrounding whitespace is kept, e.g. ``" 432"``.

    Raises:
        ValueError: ``prompts`` is empty, ``max_new_tokens`` or ``batch_size`` is not a
            positive integer, or a prompt tokenizes to no tokens.
    """
    if len(prompts) == 0:
        raise ValueError("prompts is empty; pass at least one prompt to generate from")
    _check_count("max_new_tokens", max_new_tokens)
    _check_count("batch_size", batch_size)

    prompt_ids = encode_prompts(tokenizer, prompts)
    # Similar lengths in a batch mean less padding.
    order = sorted(range(len(prompts)), key=lambda index: len(prompt_ids[index]), reverse=True)

    generated: list[str] = [""] * len(prompts)
    device = model_device(model)
    pad_id = pad_token_id(tokenizer)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            starts = range(0, len(order), batch_size)
            for start in tqdm(starts, desc="Generating", unit="batch", disable=not show_progress):
                batch = order[start : start + batch_size]
                texts = _generate_batch(
                    model,
                    tokenizer,
                    [prompt_ids[index] for index in batch],
                    max_new_tokens,
                    pad_id,
                    device,
                )
                for index, text in zip(batch, texts, strict=True):
                    generated[index] = text
    finally:
        model.train(was_training)
    return generated


def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Return the fraction of predictions equal to their answers after stripping whitespace.

    Raises:
        ValueError: the lists have different lengths or are empty.
    """
    if len(predictions) != len(answers):
        raise ValueError(
            f"predictions has {len(predictions)} entries but answers has {len(answers)}; "
            "pass one answer per prediction"
        )
    if len(predictions) == 0:
        raise ValueError("predictions is empty; exact match needs at least one example")
    correct = sum(
        int(prediction.strip() == answer.strip())
        for prediction, answer in zip(predictions, answers, strict=True)
    )
    return correct / len(predictions)


def evaluate_generation(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[GenerationExample],
    *,
    max_new_tokens: int = 6,
    batch_size: int = 8,
    show_progress: bool = True,
) -> GenerationResult:
    """Generate an answer for every example and score the answers by exact match.

    Args:
        model: a causal LM (a transformers model or a PeftModel around one).
        tokenizer: the model's tokenizer.
        examples: the examples, e.g. ``arithmetic_splits().test``.
        max_new_tokens: the maximum number of generated tokens per example. The default of 6
            fits arithmetic answers such as ``" -989"`` even with one token per character.
        batch_size: the number of prompts per ``generate`` call.
        show_progress: show a tqdm progress bar.

    Returns:
        The exact-match score with the predictions, answers and per-example correctness, in
        the order of ``examples``.

    Raises:
        ValueError: ``examples`` is empty, or an argument is invalid (see ``generate_answers``).
    """
    if len(examples) == 0:
        raise ValueError("examples is empty; pass at least one GenerationExample")

    generated = generate_answers(
        model,
        tokenizer,
        [example.prompt for example in examples],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        show_progress=show_progress,
    )
    answers = [example.answer for example in examples]
    correct = [
        prediction.strip() == answer.strip()
        for prediction, answer in zip(generated, answers, strict=True)
    ]
    return GenerationResult(
        score=exact_match(generated, answers),
        predictions=generated,
        answers=answers,
        correct=correct,
    )
