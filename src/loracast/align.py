"""Token alignment across tokenizers by character offsets (pure functions).

Two models have read the same text at a pair of positions when both tokenizers end a token at
the same character offset and every earlier token lies before that offset. Special tokens added
by one tokenizer (a BOS, for example) are not text and are never aligned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Encoded:
    """A text encoded for alignment: token ids, character offsets and a special-token mask."""

    input_ids: list[int]
    offsets: list[tuple[int, int]]
    special: list[bool]


def encode(tokenizer, text: str, max_tokens: int | None = None) -> Encoded:
    """Encode ``text`` with the tokenizer's own special tokens and character offsets.

    Raises:
        ValueError: the tokenizer cannot return offsets (a slow, Python-only tokenizer).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no offset mapping; load a fast tokenizer "
            "(AutoTokenizer.from_pretrained(..., use_fast=True))"
        )
    encoding = tokenizer(
        text,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        truncation=max_tokens is not None,
        max_length=max_tokens,
    )
    return Encoded(
        input_ids=list(encoding["input_ids"]),
        offsets=[tuple(pair) for pair in encoding["offset_mapping"]],
        special=[bool(flag) for flag in encoding["special_tokens_mask"]],
    )


def prefix_ends(encoded: Encoded) -> dict[int, int]:
    """Map each character offset at which the text before it is fully read to its token index.

    Token ``i`` qualifies when it is not special, its end ``e`` is positive, every earlier text
    token ends at or before ``e`` and every later text token starts at or after ``e``. Tokens that
    share a character (byte-fallback pieces of one emoji) thus qualify only at the last piece.
    """
    text_positions = [i for i, special in enumerate(encoded.special) if not special]
    ends: dict[int, int] = {}
    if not text_positions:
        return ends

    later_min_start = [0] * len(text_positions)
    running = float("inf")
    for k in range(len(text_positions) - 1, -1, -1):
        later_min_start[k] = running
        running = min(running, encoded.offsets[text_positions[k]][0])

    running_max_end = 0
    for k, position in enumerate(text_positions):
        start, end = encoded.offsets[position]
        running_max_end = max(running_max_end, end)
        if end > 0 and end >= running_max_end and later_min_start[k] >= end and end > start:
            ends[end] = position
    return ends


def aligned_positions(first: Encoded, second: Encoded) -> list[tuple[int, int]]:
    """Return ``(i, j)`` token index pairs that end the same text prefix, in text order."""
    first_ends = prefix_ends(first)
    second_ends = prefix_ends(second)
    shared = sorted(set(first_ends) & set(second_ends))
    return [(first_ends[end], second_ends[end]) for end in shared]


def truncate_text(tokenizer, text: str, max_tokens: int) -> str:
    """Cut ``text`` after the last character read within ``max_tokens`` tokens of ``tokenizer``.

    Both models then read the same characters even though their token counts differ.
    """
    encoded = encode(tokenizer, text, max_tokens=max_tokens)
    ends = prefix_ends(encoded)
    if not ends:
        return ""
    return text[: max(ends)]


def alignment_coverage(pairs: Sequence[tuple[int, int]], encoded: Encoded) -> float:
    """Return the fraction of ``encoded``'s text tokens that take part in an aligned pair."""
    text_tokens = sum(1 for special in encoded.special if not special)
    return len(pairs) / text_tokens if text_tokens else 0.0
