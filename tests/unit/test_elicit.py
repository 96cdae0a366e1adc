"""Elicited text: general prefixes continued by sampling from the model with its adapter."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.nn import functional as F

from loracast.align import encode, truncate_text
from loracast.elicit import ElicitConfig, elicit_texts
from loracast.refine import (
    RefineConfig,
    _batch_loss,
    _Student,
    build_teacher,
    distil_lora,
    kernel_hooks,
)
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


def test_further_samples_follow_the_first_pass(tiny_source, tiny_corpus):
    passages = tiny_corpus[:4]
    model, tokenizer = tiny_source.model, tiny_source.tokenizer
    once = list(elicit_texts(model, tokenizer, passages, SMALL, show_progress=False))
    twice = replace(SMALL, samples_per_prefix=2)

    texts = list(elicit_texts(model, tokenizer, passages, twice, show_progress=False))

    assert len(texts) == 2 * len(passages)
    assert texts[: len(passages)] == once
    for first, second in zip(once, texts[len(passages) :], strict=True):
        assert first != second
        assert first[:4] == second[:4]


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
    with pytest.raises(ValueError, match="samples_per_prefix must be a positive integer, got 0"):
        ElicitConfig(samples_per_prefix=0)
    assert RefineConfig(elicit={"prefix_tokens": 3}).elicit == ElicitConfig(prefix_tokens=3)


SEQUENCE = {"text": "elicited", "elicit": SMALL, "sequence_weight": 1.0, "sequence_tokens": 5}


def test_sequence_term_scores_only_sampled_tokens(setup, tiny_source, tiny_target, tiny_corpus):  # noqa: F811
    _, adapter, shared = setup
    config = RefineConfig(max_positions=60, **SEQUENCE)
    teacher = build_teacher(
        tiny_source, tiny_target, adapter.kernels, tiny_corpus, shared, config, show_progress=False
    )
    assert len(teacher.sequence_positions) == len(teacher.texts)
    for text, positions, labels in zip(
        teacher.texts, teacher.sequence_positions, teacher.sequence_labels, strict=True
    ):
        assert 0 < len(positions) <= 5
        encoded = encode(tiny_target.tokenizer, text)
        prompt = truncate_text(tiny_source.tokenizer, text, SMALL.prefix_tokens)
        for position, label in zip(positions, labels, strict=True):
            assert encoded.input_ids[position + 1] == label
            assert encoded.offsets[position + 1][0] >= len(prompt)


def test_sequence_term_is_the_models_cross_entropy(setup, tiny_source, tiny_target, tiny_corpus):  # noqa: F811
    _, adapter, shared = setup
    config = RefineConfig(max_positions=60, **SEQUENCE)
    teacher = build_teacher(
        tiny_source, tiny_target, adapter.kernels, tiny_corpus, shared, config, show_progress=False
    )
    parameter = torch.nn.Parameter(torch.zeros(1))
    student = _Student(tiny_target.model, tiny_target.tokenizer, [parameter], None)
    with torch.no_grad():
        _, terms, _ = _batch_loss(student, teacher, [0, 1], shared, config, True)
        losses = []
        for index in (0, 1):
            ids = tiny_target.tokenizer(teacher.texts[index], return_tensors="pt")["input_ids"]
            logits = tiny_target.model(input_ids=ids).logits[0, teacher.sequence_positions[index]]
            labels = torch.tensor(teacher.sequence_labels[index])
            losses.append(F.cross_entropy(logits, labels, reduction="none"))
    assert terms["sequence_ce"] == pytest.approx(torch.cat(losses).mean().item(), rel=1e-4)


def test_sequence_distillation_lowers_held_out_cross_entropy(
    setup,  # noqa: F811
    tiny_source,
    tiny_target,
    tiny_corpus,
    tmp_path,  # noqa: F811
):
    _, adapter, shared = setup
    config = RefineConfig(
        max_positions=200,
        steps=12,
        batch_size=4,
        eval_every=4,
        learning_rate=1e-2,
        kl_weight=0.0,
        **SEQUENCE,
    )
    teacher = build_teacher(
        tiny_source, tiny_target, adapter.kernels, tiny_corpus, shared, config, show_progress=False
    )
    report = distil_lora(
        tiny_target, teacher, shared, tmp_path / "distilled", config, show_progress=False
    )
    assert report.best_step > 0
    assert report.best["sequence_ce"] < report.initial["sequence_ce"]
    assert report.best["loss"] == pytest.approx(report.best["sequence_ce"])


def test_sequence_weight_needs_elicited_text():
    with pytest.raises(ValueError, match="sequence_weight > 0 needs text='elicited'"):
        RefineConfig(sequence_weight=1.0)
    with pytest.raises(ValueError, match="are all 0"):
        RefineConfig(text="elicited", kl_weight=0.0)


def _last_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0, -1].float()


def test_amplifier_scales_adapter_change(setup, tiny_source):  # noqa: F811
    from loracast.elicit import AdapterAmplifier
    from loracast.eval.classification import pad_left, pad_token_id

    _, adapter, _ = setup
    model, tokenizer = tiny_source.model, tiny_source.tokenizer
    rows = [[5, 9, 14, 3, 22], [7, 11]]
    ids, mask = pad_left(rows, pad_token_id(tokenizer))
    with kernel_hooks(model, adapter.kernels) as switch:
        amplifier = AdapterAmplifier(model, switch, mask, amplification=3.0, temperature=0.5)
        for step in range(3):
            adapted = torch.stack([_last_logits(model, row) for row in rows])
            switch.multiplier = 0.0
            base = torch.stack([_last_logits(model, row) for row in rows])
            switch.multiplier = 1.0
            expected = (base + 3.0 * (adapted - base)) / 0.5
            written = torch.tensor([row[len(row) - step :] for row in rows], dtype=torch.long)
            got = amplifier(torch.cat([ids, written], 1), adapted)
            assert switch.multiplier == 1.0
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
            new_tokens = got.argmax(-1).tolist()
            rows = [row + [token] for row, token in zip(rows, new_tokens, strict=True)]


def test_amplified_sampling_needs_switch(setup, tiny_source, tiny_corpus):  # noqa: F811
    _, adapter, _ = setup
    amplified = ElicitConfig(prefix_tokens=4, new_tokens=12, batch_size=3, amplification=4.0)
    with pytest.raises(ValueError, match="amplification 4.0 needs the adapter's switch"):
        next(elicit_texts(tiny_source.model, tiny_source.tokenizer, tiny_corpus[:3], amplified))
    with kernel_hooks(tiny_source.model, adapter.kernels) as switch:
        plain, pushed = (
            list(
                elicit_texts(
                    tiny_source.model,
                    tiny_source.tokenizer,
                    tiny_corpus[:6],
                    config,
                    adapter=switch,
                    show_progress=False,
                )
            )
            for config in (SMALL, amplified)
        )
    assert len(pushed) == len(plain)
    assert pushed != plain
    for text, passage in zip(pushed, tiny_corpus[:6], strict=True):
        prefix = truncate_text(tiny_source.tokenizer, passage, amplified.prefix_tokens)
        assert text.startswith(prefix.strip()[:4])


def test_tiny_nucleus_samples_the_most_likely_token(setup, tiny_source, tiny_corpus):  # noqa: F811
    _, adapter, _ = setup
    with kernel_hooks(tiny_source.model, adapter.kernels) as switch:
        for amplification in (1.0, 3.0):
            texts = [
                list(
                    elicit_texts(
                        tiny_source.model,
                        tiny_source.tokenizer,
                        tiny_corpus[:4],
                        ElicitConfig(
                            prefix_tokens=4,
                            new_tokens=12,
                            batch_size=2,
                            top_p=1e-6,
                            seed=seed,
                            amplification=amplification,
                        ),
                        adapter=switch,
                        show_progress=False,
                    )
                )
                for seed in (0, 1)
            ]
            # Only the argmax survives the nucleus, so the seed no longer matters.
            assert texts[0] == texts[1]
    with pytest.raises(ValueError, match="top_p must be in \\(0, 1\\], got 1.5"):
        ElicitConfig(top_p=1.5)
