"""Elicited text: general prefixes continued by sampling from the model with its adapter."""

from __future__ import annotations

import pytest
import torch

from loracast.align import truncate_text
from loracast.elicit import ElicitConfig, elicit_texts
from loracast.refine import RefineConfig, build_teacher, kernel_hooks
from tests.unit.test_refine import setup  # noqa: F401  (fixture)

SMALL = ElicitConfig(prefix_tokens=4, new_tokens=12, batch_size=3)


def test_texts_continue_their_prefixes(tiny_source, tiny_corpus):
    passages = tiny_corpus[:5]
    texts = list(
        elicit_texts(tiny_source.model, tiny_source.tokenizer, passages, SMALL, show_progress=False)
    )
    assert len(texts) == len(passages)
    for passage, text in zip(passages, texts, strict=True):
        prefix = truncate_text(tiny_source.tokenizer, passage, SMALL.prefix_tokens)
        assert text.startswith(prefix.strip()[:4])
        assert len(text) > len(prefix)
        assert not passage.startswith(text)


def test_sampling_is_seeded(tiny_source, tiny_corpus):
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    first = list(
        elicit_texts(
            tiny_source.model, tiny_source.tokenizer, tiny_corpus[:4], SMALL, show_progress=False
        )
    )
    assert torch.equal(torch.rand(1), expected)
    again = list(
        elicit_texts(
            tiny_source.model, tiny_source.tokenizer, tiny_corpus[:4], SMALL, show_progress=False
        )
    )
    other = ElicitConfig(prefix_tokens=4, new_tokens=12, batch_size=3, seed=1)
    reseeded = list(
        elicit_texts(
            tiny_source.model, tiny_source.tokenizer, tiny_corpus[:4], other, show_progress=False
        )
    )
    assert first == again
    assert first != reseeded


def test_adapter_changes_the_samples(setup, tiny_source, tiny_corpus):  # noqa: F811
    _, adapter, _ = setup
    plain = list(
        elicit_texts(
            tiny_source.model, tiny_source.tokenizer, tiny_corpus[:6], SMALL, show_progress=False
        )
    )
    with kernel_hooks(tiny_source.model, adapter.kernels):
        adapted = list(
            elicit_texts(
                tiny_source.model,
                tiny_source.tokenizer,
                tiny_corpus[:6],
                SMALL,
                show_progress=False,
            )
        )
    assert plain != adapted


def test_elicited_teacher_reads_sampled_text(setup, tiny_source, tiny_target, tiny_corpus):  # noqa: F811
    _, adapter, shared = setup
    config = RefineConfig(text="elicited", max_positions=60, elicit=SMALL)
    teacher = build_teacher(
        tiny_source, tiny_target, adapter.kernels, tiny_corpus, shared, config, show_progress=False
    )
    assert 0 < sum(len(positions) for positions in teacher.positions) <= 60
    # Generation stops once enough positions are gathered, far before the corpus ends.
    assert len(teacher.texts) < len(tiny_corpus)
    assert not set(teacher.texts) & set(tiny_corpus)


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match="new_tokens must be a positive integer, got 0"):
        ElicitConfig(new_tokens=0)
    with pytest.raises(ValueError, match="temperature must be positive"):
        ElicitConfig(temperature=0.0)
    assert RefineConfig(elicit={"prefix_tokens": 3}).elicit == ElicitConfig(prefix_tokens=3)
