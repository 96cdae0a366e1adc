"""Logit arithmetic across tokenizers: the target's logits plus the source adapter's change."""

from __future__ import annotations

import pytest
import torch

from loracast.align import aligned_positions, encode
from loracast.eval.classification import pad_left, pad_token_id
from loracast.eval.language_modeling import evaluate_language_modeling
from loracast.logit_arithmetic import LogitArithmetic
from loracast.refine import kernel_hooks
from tests.unit.test_refine import setup  # noqa: F401  (fixture)

TEXTS = ["The river ran past the old mill at dawn.", "A cold wind came down from the hills."]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def test_change_added_at_aligned_shared_tokens(setup, tiny_source, tiny_target):  # noqa: F811
    _, adapter, shared = setup
    wrapper = LogitArithmetic(tiny_source, tiny_target, adapter.kernels, shared, scale=0.5)
    text = TEXTS[0]
    source_ids = encode(tiny_source.tokenizer, text).input_ids
    target_ids = encode(tiny_target.tokenizer, text).input_ids
    base = _logits(tiny_source.model, source_ids)[:, shared.source_ids].log_softmax(-1)
    with kernel_hooks(tiny_source.model, adapter.kernels):
        adapted = _logits(tiny_source.model, source_ids)[:, shared.source_ids].log_softmax(-1)
    expected = _logits(tiny_target.model, target_ids)
    pairs = aligned_positions(
        encode(tiny_source.tokenizer, text), encode(tiny_target.tokenizer, text)
    )
    assert pairs
    for source_position, target_position in pairs:
        expected[target_position, shared.target_ids] += 0.5 * (
            adapted[source_position] - base[source_position]
        )

    with torch.no_grad():
        got = wrapper(torch.tensor([target_ids])).logits[0]

    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, _logits(tiny_target.model, target_ids))


def test_padding_does_not_change_logits(setup, tiny_source, tiny_target):  # noqa: F811
    _, adapter, shared = setup
    wrapper = LogitArithmetic(tiny_source, tiny_target, adapter.kernels, shared)
    rows = [tiny_target.tokenizer(text)["input_ids"] for text in TEXTS]
    ids, mask = pad_left(rows, pad_token_id(tiny_target.tokenizer))
    with torch.no_grad():
        batch = wrapper(ids, attention_mask=mask).logits
        for index, row in enumerate(rows):
            alone = wrapper(torch.tensor([row])).logits[0]
            torch.testing.assert_close(batch[index, -len(row) :], alone, atol=1e-4, rtol=1e-4)


def test_zero_scale_is_the_target(setup, tiny_source, tiny_target):  # noqa: F811
    _, adapter, shared = setup
    wrapper = LogitArithmetic(tiny_source, tiny_target, adapter.kernels, shared, scale=0.0)
    ids = tiny_target.tokenizer(TEXTS[1])["input_ids"]
    with torch.no_grad():
        got = wrapper(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(got, _logits(tiny_target.model, ids))


def test_scores_bits_per_byte(setup, tiny_source, tiny_target):  # noqa: F811
    _, adapter, shared = setup
    wrapper = LogitArithmetic(tiny_source, tiny_target, adapter.kernels, shared, scale=4.0)
    shifted = evaluate_language_modeling(wrapper, tiny_target.tokenizer, TEXTS, show_progress=False)
    plain = evaluate_language_modeling(
        tiny_target.model, tiny_target.tokenizer, TEXTS, show_progress=False
    )
    assert shifted.bytes == plain.bytes
    assert shifted.bits_per_byte != pytest.approx(plain.bits_per_byte)


def test_ids_not_from_text_are_rejected(setup, tiny_source, tiny_target):  # noqa: F811
    _, adapter, shared = setup
    wrapper = LogitArithmetic(tiny_source, tiny_target, adapter.kernels, shared)
    ids = tiny_target.tokenizer(TEXTS[0])["input_ids"]
    # Single characters where the tokenizer writes one merged token for "The".
    assert tiny_target.tokenizer.convert_ids_to_tokens(ids[1]) == "The"
    pieces = tiny_target.tokenizer.convert_tokens_to_ids(list("The"))
    with pytest.raises(ValueError, match="gives other ids"):
        wrapper(torch.tensor([ids[:1] + pieces + ids[2:]]))
