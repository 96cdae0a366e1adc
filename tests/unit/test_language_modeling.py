"""Tests for bits per byte (loracast.eval.language_modeling)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from loracast.eval.language_modeling import bits_per_byte, evaluate_language_modeling
from tests.conftest import build_tiny_gemma3, build_tiny_llama

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A small café in Zürich serves crêpes and naïve jazz every night.",
    "Rain, wind and snow: the forecast looks grim.",
    "Numbers like 42 and 3.14 appear.",
    "Why? 𝔘nusual glyphs cost four bytes each.",
]

CASES = [("byte_tokenizer", build_tiny_llama), ("metaspace_tokenizer", build_tiny_gemma3)]


def _reference(model, tokenizer, text: str) -> tuple[float, int]:
    """Score one text with a plain forward pass: (bits of tokens after the first, counted bytes)."""
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits[0]
    nats = F.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum").item()
    starts_with_bos = ids[0, 0].item() == tokenizer.bos_token_id
    context = "" if starts_with_bos else tokenizer.decode(ids[0, :1])
    return nats / math.log(2), len(text.encode("utf-8")) - len(context.encode("utf-8"))


@pytest.mark.parametrize(("tokenizer_name", "build"), CASES)
def test_matches_reference_per_text(request, tokenizer_name, build):
    tokenizer = request.getfixturevalue(tokenizer_name)
    model = build(len(tokenizer))

    result = evaluate_language_modeling(model, tokenizer, TEXTS, batch_size=2, show_progress=False)

    references = [_reference(model, tokenizer, text) for text in TEXTS]
    for index, (bits, n_bytes) in enumerate(references):
        assert result.bits[index] == pytest.approx(bits, rel=1e-4), index
        assert result.bytes[index] == n_bytes, index
        assert result.per_text[index] == pytest.approx(bits / n_bytes, rel=1e-4), index
    total = sum(bits for bits, _ in references) / sum(n for _, n in references)
    assert result.bits_per_byte == pytest.approx(total, rel=1e-4)


@pytest.mark.parametrize(("tokenizer_name", "build"), CASES)
def test_positive_finite_for_each_tokenizer(request, tokenizer_name, build):
    tokenizer = request.getfixturevalue(tokenizer_name)
    model = build(len(tokenizer))

    value = bits_per_byte(model, tokenizer, TEXTS[:2], show_progress=False)

    assert math.isfinite(value)
    assert value > 0


def test_bos_tokenizer_counts_every_byte(metaspace_tokenizer):
    model = build_tiny_gemma3(len(metaspace_tokenizer))

    result = evaluate_language_modeling(model, metaspace_tokenizer, TEXTS, show_progress=False)

    assert result.bytes == [len(text.encode("utf-8")) for text in TEXTS]


def test_metric_divides_by_bytes_not_tokens(metaspace_tokenizer):
    model = build_tiny_gemma3(len(metaspace_tokenizer))
    text = "café crêpes naïve Zürich 𝔘𝔘"
    n_tokens = len(metaspace_tokenizer(text, add_special_tokens=False)["input_ids"])

    result = evaluate_language_modeling(model, metaspace_tokenizer, [text], show_progress=False)

    assert result.bytes[0] == len(text.encode("utf-8"))
    assert result.bytes[0] > len(text)
    assert result.bytes[0] != n_tokens
    assert result.bits_per_byte == pytest.approx(result.bits[0] / result.bytes[0])


def test_batching_and_order_do_not_change_values(byte_tokenizer):
    model = build_tiny_llama(len(byte_tokenizer))

    one_by_one = evaluate_language_modeling(
        model, byte_tokenizer, TEXTS, batch_size=1, show_progress=False
    )
    batched = evaluate_language_modeling(
        model, byte_tokenizer, TEXTS[::-1], batch_size=4, show_progress=False
    )

    assert batched.bytes == one_by_one.bytes[::-1]
    assert batched.bits == pytest.approx(one_by_one.bits[::-1], rel=1e-4)


@pytest.mark.parametrize(("tokenizer_name", "build"), CASES)
def test_truncation_counts_kept_characters(request, tokenizer_name, build):
    tokenizer = request.getfixturevalue(tokenizer_name)
    model = build(len(tokenizer))
    text = TEXTS[1]
    max_tokens = 8
    encoding = tokenizer(text, return_offsets_mapping=True)
    ids = encoding["input_ids"]
    assert len(ids) > max_tokens

    result = evaluate_language_modeling(
        model, tokenizer, [text], max_tokens=max_tokens, show_progress=False
    )

    kept_ids = torch.tensor([ids[:max_tokens]])
    with torch.no_grad():
        logits = model(kept_ids).logits[0]
    bits = F.cross_entropy(logits[:-1], kept_ids[0, 1:], reduction="sum").item() / math.log(2)
    end = encoding["offset_mapping"][max_tokens - 1][1]
    start = 0 if ids[0] == tokenizer.bos_token_id else encoding["offset_mapping"][0][1]
    assert result.bits[0] == pytest.approx(bits, rel=1e-4)
    assert result.bytes[0] == len(text[start:end].encode("utf-8"))
    assert result.bytes[0] < len(text.encode("utf-8"))


def test_truncation_never_splits_a_character(byte_tokenizer):
    model = build_tiny_llama(len(byte_tokenizer), layers=1)
    text = "ab 𝔘𝔘𝔘 cd"
    encoding = byte_tokenizer(text, return_offsets_mapping=True)
    offsets = encoding["offset_mapping"]
    # Find a cut that falls inside the byte tokens of a four-byte character.
    cut = next(
        position
        for position in range(2, len(offsets))
        if offsets[position][0] < offsets[position - 1][1]
    )

    result = evaluate_language_modeling(
        model, byte_tokenizer, [text], max_tokens=cut, show_progress=False
    )

    whole_characters = [offsets[p][1] for p in range(1, cut) if offsets[p][1] <= offsets[cut][0]]
    end = max(whole_characters)
    assert result.bytes[0] == len(text[offsets[0][1] : end].encode("utf-8"))


def test_skips_eos_added_by_tokenizer(metaspace_tokenizer):
    model = build_tiny_gemma3(len(metaspace_tokenizer))
    text = TEXTS[0]

    class AddEos:
        """Wrap the tokenizer so it appends an EOS marked as special, like some tokenizers do."""

        is_fast = True
        pad_token_id = metaspace_tokenizer.pad_token_id
        eos_token_id = metaspace_tokenizer.eos_token_id

        def __call__(self, texts, **kwargs):
            encoding = metaspace_tokenizer(texts, **kwargs)
            for index in range(len(texts)):
                encoding["input_ids"][index].append(self.eos_token_id)
                encoding["special_tokens_mask"][index].append(1)
                encoding["offset_mapping"][index].append((0, 0))
            return encoding

    plain = evaluate_language_modeling(model, metaspace_tokenizer, [text], show_progress=False)
    result = evaluate_language_modeling(model, AddEos(), [text], show_progress=False)

    assert result.bits == pytest.approx(plain.bits)
    assert result.bytes == plain.bytes


def test_rejects_texts_without_scored_tokens(byte_tokenizer, metaspace_tokenizer):
    model = build_tiny_llama(len(byte_tokenizer), layers=1)
    with pytest.raises(ValueError, match="texts is empty"):
        bits_per_byte(model, byte_tokenizer, [], show_progress=False)
    with pytest.raises(ValueError, match="text 1"):
        bits_per_byte(model, byte_tokenizer, ["fine text", "a"], show_progress=False)
    with pytest.raises(ValueError, match="text 0"):
        bits_per_byte(model, byte_tokenizer, [""], show_progress=False)
    with pytest.raises(ValueError, match="max_tokens"):
        bits_per_byte(model, byte_tokenizer, ["text"], max_tokens=1, show_progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        bits_per_byte(model, byte_tokenizer, ["text"], batch_size=0, show_progress=False)


def test_restores_training_mode(byte_tokenizer):
    model = build_tiny_llama(len(byte_tokenizer), layers=1)
    model.train()

    bits_per_byte(model, byte_tokenizer, TEXTS[:1], show_progress=False)

    assert model.training
