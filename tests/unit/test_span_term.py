"""The span term: the student's change of a span's log-likelihood matches the source's."""

from __future__ import annotations

import pytest
import torch

from loracast.align import aligned_positions, encode
from loracast.refine import (
    RefineConfig,
    _batch_loss,
    _Student,
    build_teacher,
    distil_lora,
    kernel_hooks,
)
from tests.unit.test_refine import setup  # noqa: F401  (fixture)


def _token_log_probs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        log_probs = model(input_ids=torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
    return log_probs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_span_targets_sum_source_changes(setup, tiny_source, tiny_target, tiny_corpus):  # noqa: F811
    _, adapter, shared = setup
    config = RefineConfig(max_positions=80, span_weight=1.0, span_tokens=6)
    teacher = build_teacher(
        tiny_source, tiny_target, adapter.kernels, tiny_corpus, shared, config, show_progress=False
    )
    assert len(teacher.spans) == len(teacher.texts)
    text, spans = teacher.texts[0], teacher.spans[0]
    source_ids = tiny_source.tokenizer(text)["input_ids"]
    target_ids = tiny_target.tokenizer(text)["input_ids"]
    base = _token_log_probs(tiny_source.model, source_ids)
    with kernel_hooks(tiny_source.model, adapter.kernels):
        adapted = _token_log_probs(tiny_source.model, source_ids)
    target_base = _token_log_probs(tiny_target.model, target_ids)
    pairs = aligned_positions(
        encode(tiny_source.tokenizer, text), encode(tiny_target.tokenizer, text)
    )
    bounds = {start[1]: (start, end) for start, end in zip(pairs, pairs[1:], strict=False)}

    assert 0 < len(spans.positions) <= 6
    assert spans.labels == [target_ids[position + 1] for position in spans.positions]
    torch.testing.assert_close(
        torch.tensor(spans.base), target_base[spans.positions], atol=1e-4, rtol=1e-4
    )
    firsts = [spans.positions[spans.span_of.index(k)] for k in range(len(spans.change))]
    for first, change in zip(firsts, spans.change, strict=True):
        start, end = bounds[first]
        expected = (adapted - base)[start[0] : end[0]].sum()
        assert change == pytest.approx(expected.item(), abs=1e-4)
        assert spans.span_of.count(spans.span_of[spans.positions.index(first)]) == end[1] - start[1]


def test_span_term_of_unchanged_target(setup, tiny_source, tiny_target, tiny_corpus):  # noqa: F811
    _, adapter, shared = setup
    config = RefineConfig(max_positions=60, span_weight=1.0)
    teacher = build_teacher(
        tiny_source, tiny_target, adapter.kernels, tiny_corpus, shared, config, show_progress=False
    )
    parameter = torch.nn.Parameter(torch.zeros(1))
    student = _Student(tiny_target.model, tiny_target.tokenizer, [parameter], None)
    with torch.no_grad():
        loss, terms, _ = _batch_loss(student, teacher, [0, 1], shared, config, True)
    # The student adds no change, so each span's error is the source's whole change.
    changes = torch.tensor(teacher.spans[0].change + teacher.spans[1].change)
    assert terms["span"] == pytest.approx((changes**2).mean().item(), rel=1e-4, abs=1e-6)
    assert float(loss) == pytest.approx(terms["kl"] + terms["span"], rel=1e-5)


def test_span_distillation_lowers_held_out_error(
    setup,  # noqa: F811
    tiny_source,
    tiny_target,
    tiny_corpus,
    tmp_path,  # noqa: F811
):
    _, adapter, shared = setup
    config = RefineConfig(
        max_positions=200,
        steps=8,
        batch_size=4,
        eval_every=4,
        learning_rate=3e-3,
        kl_weight=0.0,
        span_weight=1.0,
    )
    teacher = build_teacher(
        tiny_source, tiny_target, adapter.kernels, tiny_corpus, shared, config, show_progress=False
    )
    report = distil_lora(
        tiny_target, teacher, shared, tmp_path / "distilled", config, show_progress=False
    )
    assert report.best_step > 0
    assert report.best["span"] < report.initial["span"]


def test_span_weight_rejects_template_text():
    with pytest.raises(ValueError, match="span_weight > 0 needs text='general' or 'elicited'"):
        RefineConfig(text="template", template="Note: {text}\nLabel:", span_weight=1.0)
    with pytest.raises(ValueError, match="must be non-negative, got {'span_weight': -1.0}"):
        RefineConfig(span_weight=-1.0)
