"""Bits per byte of a causal LM on held-out passages, comparable across tokenizers.

Dividing the negative log-likelihood by UTF-8 bytes instead of tokens makes models with different
tokenizers comparable: a tokenizer with longer tokens has fewer, harder tokens per passage, but
the same bytes.

Which tokens and bytes count, for each text:

- The text is tokenized with the tokenizer's special tokens. The special tokens it adds (BOS,
  EOS) are never scored.
- If the tokenizer puts a special token (a BOS) before the first text token, every text token is
  scored, and every byte of the kept text counts.
- Otherwise the first text token has no token before it to predict it, so it is context only:
  it is not scored, and the bytes up to the end of its character span do not count.
  A character that the first token shares with the next one (byte-level BPE can split a
  multi-byte character) does not count either, although its remaining bytes are scored.
- A text longer than ``max_tokens`` tokens (special tokens included) is cut at a token boundary.
  Kept tokens that share a character with the first dropped token are dropped too, and only the
  characters up to the end of the last kept token's span count.
- A text kept whole counts to its last character, even where the tokenizer's offsets leave out
  trailing whitespace.
- Every token from the first scored one to the last kept one is scored, including a special
  token spelled out inside the text (such as a literal ``<eos>``). Added special tokens after the
  text (an EOS) are not run.

So ``bits_per_byte = sum of -log2 p(token) over scored tokens / UTF-8 bytes of counted text``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from loracast.eval.classification import model_device, pad_right, pad_token_id

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LanguageModelingResult:
    """Bits per byte over a set of texts, with the per-text totals behind it.

    Attributes:
        bits_per_byte: ``sum(bits) / sum(bytes)``, lower is better.
        per_text: ``bits[i] / bytes[i]`` for each text.
        bytes: the number of UTF-8 bytes counted in each text (see the module docstring).
        bits: the summed negative log2-likelihood of the scored tokens of each text.
    """

    bits_per_byte: float
    per_text: list[float]
    bytes: list[int]
    bits: list[float]


@dataclass(frozen=True)
class _ScoredText:
    """The token ids run for one text, the first scored position, and the counted bytes."""

    input_ids: list[int]
    first_scored: int
    n_bytes: int


def _check_positive_int(name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer of at least {minimum}, got {value!r}")


def _prepare_text(
    index: int,
    text: str,
    ids: Sequence[int],
    special: Sequence[int],
    offsets: Sequence[tuple[int, int]],
    max_tokens: int,
) -> _ScoredText:
    """Cut one tokenized text to ``max_tokens`` and count the bytes its scored tokens cover.

    ``special`` is the tokenizer's special-tokens mask: 1 for tokens it added (BOS, EOS), 0 for
    tokens of the text, including a special token spelled out inside the text.
    """
    text_positions = [position for position, flag in enumerate(special) if not flag]
    if not text_positions:
        raise ValueError(f"text {index} ({text!r}) has no text tokens; pass non-empty texts")

    kept_positions = [position for position in text_positions if position < max_tokens]
    if len(kept_positions) < len(text_positions):
        # A character can span several tokens (byte fallback, or byte-level BPE splitting a
        # multi-byte character). Drop kept tokens that share a character with the first dropped
        # one, so every counted character was scored in full.
        next_start = offsets[text_positions[len(kept_positions)]][0]
        while kept_positions and offsets[kept_positions[-1]][1] > next_start:
            kept_positions.pop()
        end = offsets[kept_positions[-1]][1] if kept_positions else 0
    else:
        # A whole text counts to its end, including trailing characters outside every token's
        # offset span (whitespace that the tokenizer trims from offsets).
        end = len(text)

    first_text = text_positions[0]
    # Position 0 has nothing before it. With a BOS the first text token is at position 1 or later.
    first_scored = max(first_text, 1)
    if not kept_positions or first_scored > kept_positions[-1]:
        raise ValueError(
            f"text {index} ({text[:60]!r}) leaves no token to score: max_tokens={max_tokens} "
            f"keeps {len(kept_positions)} of its tokens, and without a BOS the first token is "
            "context only. Pass longer texts or a larger max_tokens"
        )

    # Without a BOS the characters of the first token (and any character it shares with the
    # second token) are context, not counted.
    start = 0 if first_text >= 1 else offsets[first_text][1]
    n_bytes = len(text[start:end].encode("utf-8"))
    if n_bytes == 0:
        raise ValueError(
            f"text {index} ({text[:60]!r}) has scored tokens but no counted bytes, because its "
            "only character after the first token is shared with that token; pass longer texts"
        )
    return _ScoredText(
        input_ids=list(ids[: kept_positions[-1] + 1]), first_scored=first_scored, n_bytes=n_bytes
    )


def _tokenize_texts(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_tokens: int
) -> list[_ScoredText]:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"bits per byte needs character offsets, which {type(tokenizer).__name__} does not "
            "provide; load the model's fast tokenizer (AutoTokenizer with use_fast=True)"
        )
    encoding = tokenizer(list(texts), return_offsets_mapping=True, return_special_tokens_mask=True)
    return [
        _prepare_text(
            index,
            text,
            encoding["input_ids"][index],
            encoding["special_tokens_mask"][index],
            [tuple(pair) for pair in encoding["offset_mapping"][index]],
            max_tokens,
        )
        for index, text in enumerate(texts)
    ]


def _batch_bits(
    model: torch.nn.Module, batch: Sequence[_ScoredText], pad_id: int, device: torch.device
) -> list[float]:
    """Return the summed negative log2-likelihood of the scored tokens of each text in a batch."""
    input_ids, attention_mask = pad_right([item.input_ids for item in batch], pad_id)
    input_ids = input_ids.to(device)
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask.to(device), use_cache=False
    ).logits  # (batch, seq, vocab)

    bits = []
    for row, item in enumerate(batch):
        # Logits at position t predict token t + 1. The float32 log-softmax is taken one row at
        # a time, so only one (seq, vocab) float32 copy exists besides the model's logits.
        length = len(item.input_ids)
        row_logits = logits[row, item.first_scored - 1 : length - 1].float()  # (n_scored, vocab)
        targets = input_ids[row, item.first_scored : length]  # (n_scored,)
        log_probs = row_logits.log_softmax(dim=-1).gather(-1, targets[:, None]).squeeze(-1)
        bits.append(-log_probs.sum().item() / math.log(2))
    return bits


def evaluate_language_modeling(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_tokens: int = 256,
    batch_size: int = 4,
    show_progress: bool = True,
) -> LanguageModelingResult:
    """Measure bits per byte of a causal LM on held-out texts, with per-text totals.

    Which tokens are scored and which bytes are counted is described in the module docstring.
    Texts are sorted by length and run in right-padded batches under ``torch.no_grad()`` with
    the model in eval mode. The model's previous train/eval mode is restored afterwards.

    NOTE: the model returns logits at every position, so a batch costs
    ``batch_size x max_tokens x vocab`` logits in the model's dtype. Keep ``batch_size`` small
    for large vocabularies (Gemma 3 has 262k tokens).

    Args:
        model: a causal LM (a transformers model or a PeftModel around one).
        tokenizer: the model's fast tokenizer, which must return character offsets.
        texts: the passages to score.
        max_tokens: the maximum tokens per text, special tokens included. Longer texts are cut
            at a token boundary and only the kept characters count.
        batch_size: the number of texts per forward pass.
        show_progress: show a tqdm progress bar over batches.

    Returns:
        The bits per byte over all texts and the bits, bytes and bits per byte of each text,
        in the order of ``texts``.

    Raises:
        ValueError: ``texts`` is empty, ``max_tokens`` is below 2, ``batch_size`` is not a
            positive integer, the tokenizer is not a fast tokenizer, or a text leaves no token
            to score.
    """
    if len(texts) == 0:
        raise ValueError("texts is empty; pass at least one text to score")
    _check_positive_int("max_tokens", max_tokens, minimum=2)
    _check_positive_int("batch_size", batch_size)

    prepared = _tokenize_texts(tokenizer, texts, max_tokens)
    order = sorted(range(len(texts)), key=lambda index: len(prepared[index].input_ids))

    bits = [0.0] * len(texts)
    device = model_device(model)
    pad_id = pad_token_id(tokenizer)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            starts = range(0, len(order), batch_size)
            for start in tqdm(
                starts, desc="Scoring texts", unit="batch", disable=not show_progress
            ):
                batch = order[start : start + batch_size]
                batch_bits = _batch_bits(model, [prepared[i] for i in batch], pad_id, device)
                for index, value in zip(batch, batch_bits, strict=True):
                    bits[index] = value
    finally:
        model.train(was_training)

    n_bytes = [item.n_bytes for item in prepared]
    return LanguageModelingResult(
        bits_per_byte=sum(bits) / sum(n_bytes),
        per_text=[value / count for value, count in zip(bits, n_bytes, strict=True)],
        bytes=n_bytes,
        bits=bits,
    )


def bits_per_byte(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_tokens: int = 256,
    batch_size: int = 4,
    show_progress: bool = True,
) -> float:
    """Return the bits per byte of a causal LM on ``texts``, lower is better.

    Takes the same arguments and raises the same errors as ``evaluate_language_modeling``,
    which also returns the per-text values.
    """
    return evaluate_language_modeling(
        model,
        tokenizer,
        texts,
        max_tokens=max_tokens,
        batch_size=batch_size,
        show_progress=show_progress,
    ).bits_per_byte
