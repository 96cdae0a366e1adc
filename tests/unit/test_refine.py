"""Behaviour refinement: shared vocabulary, teacher distributions, refined heads, distilled LoRA."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from peft import PeftModel

from loracast.adapters import load_adapter
from loracast.cartridge import Cartridge
from loracast.models import LoadedModel
from loracast.refine import (
    RefineConfig,
    build_teacher,
    distil_lora,
    kernel_hooks,
    learning_rate_factor,
    refine_cartridge,
)
from loracast.vocabulary import restricted_logits, shared_vocabulary
from tests.conftest import build_tiny_gemma3
from tests.unit.test_adapters import save_random_adapter
from tests.unit.test_cartridge import PROMPT, _logits, _make_cartridge

QUICK = {"max_positions": 300, "steps": 12, "batch_size": 4, "eval_every": 4}


@pytest.fixture()
def setup(tiny_source, tiny_target, tiny_corpus, tmp_path):
    cartridge = _make_cartridge(tiny_source, tiny_target, tiny_corpus, tmp_path)
    adapter = load_adapter(tmp_path / "adapter")
    shared = shared_vocabulary(tiny_source.tokenizer, tiny_target.tokenizer)
    return cartridge, adapter, shared


def test_shared_vocabulary_pairs_tokens_with_equal_strings(byte_tokenizer, metaspace_tokenizer):
    shared = shared_vocabulary(byte_tokenizer, metaspace_tokenizer)
    assert len(shared) > 20
    specials = set(byte_tokenizer.all_special_ids)
    for source_id, target_id in zip(
        shared.source_ids.tolist(), shared.target_ids.tolist(), strict=True
    ):
        assert source_id not in specials
        assert byte_tokenizer.decode([source_id]) == metaspace_tokenizer.decode([target_id])
    assert len(set(shared.source_ids.tolist())) == len(shared)


def test_restricted_logits_match_the_full_head(tiny_target):
    ids = tiny_target.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    chosen = torch.tensor([3, 17, 5, 40])
    with torch.no_grad():
        output = tiny_target.model(input_ids=ids, output_hidden_states=True)
        hidden = output.hidden_states[-1][0]
        restricted = restricted_logits(tiny_target.model, hidden, chosen)
    assert torch.allclose(restricted, output.logits[0][:, chosen], atol=1e-5)


def test_kernel_hooks_match_peft(setup, tiny_source, tmp_path):
    _, adapter, _ = setup
    with kernel_hooks(tiny_source.model, adapter.kernels):
        hooked = _logits(tiny_source)
    peft_model = PeftModel.from_pretrained(tiny_source.model, str(tmp_path / "adapter"))
    with torch.no_grad():
        reference = peft_model(**tiny_source.tokenizer(PROMPT, return_tensors="pt")).logits
    tiny_source.model = peft_model.unload()
    assert torch.allclose(hooked, reference, atol=1e-5)
    assert not torch.allclose(_logits(tiny_source), reference)


def test_teacher_without_adapter_effect_is_target(setup, tiny_source, tiny_target, tiny_corpus):
    _, adapter, shared = setup
    config = RefineConfig(max_positions=200)
    teacher = build_teacher(
        tiny_source, tiny_target, adapter.kernels, tiny_corpus, shared, config, show_progress=False
    )
    n = teacher.log_teacher.shape[0]
    assert n == sum(len(positions) for positions in teacher.positions) <= 200
    assert torch.allclose(teacher.log_teacher.float().logsumexp(-1), torch.zeros(n), atol=1e-2)
    assert (teacher.weights >= 0).all()
    assert teacher.weights.sum() > 0

    zero = {site: type(kernel)(kernel.A, kernel.B, 0.0) for site, kernel in adapter.kernels.items()}
    flat = build_teacher(
        tiny_source, tiny_target, zero, tiny_corpus[:4], shared, config, show_progress=False
    )
    assert torch.allclose(flat.weights, torch.zeros_like(flat.weights), atol=1e-6)
    text, positions = flat.texts[0], flat.positions[0]
    ids = tiny_target.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = tiny_target.model(input_ids=ids).logits[0, positions][:, shared.target_ids]
    expected = logits.log_softmax(-1)
    assert torch.allclose(flat.log_teacher[flat.rows(0)].float(), expected, atol=1e-2)


def test_template_teacher_uses_only_the_last_position(setup, tiny_source, tiny_target, tiny_corpus):
    _, adapter, shared = setup
    config = RefineConfig(text="template", template="Note: {text}\nLabel:", max_positions=50)
    teacher = build_teacher(
        tiny_source, tiny_target, adapter.kernels, tiny_corpus, shared, config, show_progress=False
    )
    assert all(text.endswith("\nLabel:") for text in teacher.texts)
    for text, positions in zip(teacher.texts, teacher.positions, strict=True):
        assert positions == [len(tiny_target.tokenizer(text)["input_ids"]) - 1]


def test_refined_heads_lower_kl_and_reload(setup, tiny_source, tiny_target, tiny_corpus, tmp_path):
    cartridge, adapter, shared = setup
    config = RefineConfig(learning_rate=1e-2, **QUICK)
    teacher = build_teacher(
        tiny_source, tiny_target, adapter.kernels, tiny_corpus, shared, config, show_progress=False
    )
    with cartridge.attached(tiny_target):
        before = _logits(tiny_target)
    refined, report = refine_cartridge(
        cartridge, tiny_target, teacher, shared, config, show_progress=False
    )
    assert report.best["kl"] < report.initial["kl"]
    assert report.best_step > 0
    assert -1.0 <= report.best["behaviour_cosine"] <= 1.0
    with cartridge.attached(tiny_target):
        assert torch.equal(_logits(tiny_target), before)
    assert not any(p.requires_grad for p in tiny_target.model.parameters())

    with refined.attached(tiny_target):
        after = _logits(tiny_target)
    assert not torch.allclose(after, before)
    refined.save(tmp_path / "refined")
    loaded = Cartridge.load(tmp_path / "refined", target=tiny_target)
    assert loaded.refinement["text"] == "general"
    with loaded.attached(tiny_target):
        assert torch.allclose(_logits(tiny_target), after, atol=1e-6)


@pytest.fixture()
def self_distillation(tiny_target, metaspace_tokenizer, tiny_corpus, tmp_path):
    """Return ``(config, teacher, shared)`` for a rank-4 student of a tiny Gemma-3.

    The target is its own source here, so a rank-4 LoRA can represent the adapter's effect.
    """
    source = LoadedModel(
        model=build_tiny_gemma3(len(metaspace_tokenizer)).requires_grad_(False),
        tokenizer=metaspace_tokenizer,
        name="tiny-gemma3",
    )
    save_random_adapter(build_tiny_gemma3(len(metaspace_tokenizer)), tmp_path / "adapter")
    kernels = load_adapter(tmp_path / "adapter").kernels
    shared = shared_vocabulary(metaspace_tokenizer, metaspace_tokenizer)
    config = RefineConfig(learning_rate=1e-2, lora_rank=4, **QUICK)
    teacher = build_teacher(
        source, tiny_target, kernels, tiny_corpus, shared, config, show_progress=False
    )
    return config, teacher, shared


def test_distilled_lora_learns_representable_effect(tiny_target, self_distillation, tmp_path):
    config, teacher, shared = self_distillation
    base = _logits(tiny_target)
    report = distil_lora(
        tiny_target, teacher, shared, tmp_path / "distilled", config, show_progress=False
    )
    assert report.initial["behaviour_cosine"] == pytest.approx(0.0, abs=1e-6)
    assert report.best["kl"] < 0.9 * report.initial["kl"]
    assert report.best["behaviour_cosine"] > 0.3
    assert torch.equal(_logits(tiny_target), base)
    assert not any(p.requires_grad for p in tiny_target.model.parameters())
    peft_model = PeftModel.from_pretrained(tiny_target.model, str(tmp_path / "distilled"))
    with torch.no_grad():
        distilled = peft_model(**tiny_target.tokenizer(PROMPT, return_tensors="pt")).logits
    tiny_target.model = peft_model.unload()
    assert not torch.allclose(distilled, base)


def test_refine_config_reports_every_error():
    with pytest.raises(ValueError) as error:
        RefineConfig(text="template", steps=0, learning_rate=-1.0, max_grad_norm=0.0)
    message = str(error.value)
    assert "{text}" in message
    assert "steps" in message
    assert "learning_rate" in message
    assert "max_grad_norm" in message


def test_schedule_options_are_checked():
    with pytest.raises(ValueError) as error:
        RefineConfig(steps=10, lr_schedule="linear", warmup_steps=10, weight_decay=-0.1)
    message = str(error.value)
    assert "lr_schedule must be one of ('constant', 'cosine'), got 'linear'" in message
    assert "warmup_steps must be an integer from 0 to steps - 1 (9), got 10" in message
    assert "weight_decay must be non-negative, got -0.1" in message


def test_cosine_schedule_warms_up_then_decays():
    config = RefineConfig(steps=10, lr_schedule="cosine", warmup_steps=3)
    factors = [learning_rate_factor(step, config) for step in range(1, 11)]

    assert factors[:4] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    assert all(later < earlier for earlier, later in zip(factors[3:-1], factors[4:], strict=True))
    assert 0 < factors[-1] < 0.05
    constant = RefineConfig(steps=10)
    assert {learning_rate_factor(step, constant) for step in range(1, 11)} == {1.0}


def test_refinement_follows_the_schedule(setup, tiny_source, tiny_target, tiny_corpus):
    cartridge, adapter, shared = setup
    config = RefineConfig(learning_rate=1e-2, lr_schedule="cosine", warmup_steps=4, **QUICK)
    teacher = build_teacher(
        tiny_source, tiny_target, adapter.kernels, tiny_corpus, shared, config, show_progress=False
    )

    _, report = refine_cartridge(
        cartridge, tiny_target, teacher, shared, config, show_progress=False
    )

    used = {entry["step"]: entry["learning_rate"] for entry in report.history[1:]}
    expected = {step: 1e-2 * learning_rate_factor(step, config) for step in (4, 8, 12)}
    assert used == pytest.approx(expected)
    assert used[12] < used[8] < used[4]
    assert report.best["kl"] < report.initial["kl"]


def test_weight_decay_shrinks_the_distilled_change(tiny_target, self_distillation, tmp_path):
    config, teacher, shared = self_distillation
    norms = {}
    for decay in (0.0, 20.0):
        folder = tmp_path / f"decay-{decay}"
        decayed = replace(config, weight_decay=decay)
        distil_lora(tiny_target, teacher, shared, folder, decayed, show_progress=False)
        change = load_adapter(folder).kernels.values()
        norms[decay] = sum(float((kernel.B @ kernel.A).norm()) for kernel in change)

    assert 0 < norms[20.0] < 0.5 * norms[0.0]


def test_clipped_refinement_lowers_kl(setup, tiny_source, tiny_target, tiny_corpus):
    cartridge, adapter, shared = setup
    config = RefineConfig(learning_rate=1e-2, max_grad_norm=0.5, **QUICK)
    teacher = build_teacher(
        tiny_source, tiny_target, adapter.kernels, tiny_corpus, shared, config, show_progress=False
    )

    _, report = refine_cartridge(
        cartridge, tiny_target, teacher, shared, config, show_progress=False
    )

    assert report.best_step > 0
    assert report.best["kl"] < report.initial["kl"]


def test_refinement_without_progress_warns(setup, tiny_source, tiny_target, tiny_corpus, caplog):
    cartridge, adapter, shared = setup
    config = RefineConfig(learning_rate=1e3, **QUICK)
    teacher = build_teacher(
        tiny_source, tiny_target, adapter.kernels, tiny_corpus, shared, config, show_progress=False
    )

    with caplog.at_level("WARNING", logger="loracast.refine"):
        _, report = refine_cartridge(
            cartridge, tiny_target, teacher, shared, config, show_progress=False
        )

    assert report.best_step == 0
    assert "never lowered the held-out loss" in caplog.text
    assert "learning_rate (now 1000)" in caplog.text


def test_batched_loss_matches_one_text_at_a_time(setup, tiny_source, tiny_target, tiny_corpus):
    from loracast.refine import _batch_loss, _Student

    _, adapter, shared = setup
    config = RefineConfig(max_positions=300)
    teacher = build_teacher(
        tiny_source, tiny_target, adapter.kernels, tiny_corpus, shared, config, show_progress=False
    )
    lengths = [len(text) for text in teacher.texts[:4]]
    assert len(set(lengths)) > 1, "texts of different lengths exercise the padding"
    parameter = torch.nn.Parameter(torch.zeros(1))
    student = _Student(tiny_target.model, tiny_target.tokenizer, [parameter], None)
    with torch.no_grad():
        batched, _, batched_log_probs = _batch_loss(
            student, teacher, [0, 1, 2, 3], shared, config, False
        )
        singles = [_batch_loss(student, teacher, [i], shared, config, False) for i in range(4)]
    for (_, _, log_probs), together in zip(singles, batched_log_probs, strict=True):
        assert torch.allclose(log_probs[0], together, atol=1e-4)
    counts = [len(teacher.positions[i]) for i in range(4)]
    mean = sum(loss * n for (loss, _, _), n in zip(singles, counts, strict=True)) / sum(counts)
    assert torch.allclose(batched, mean, atol=1e-5)


def test_centred_teacher_removes_the_mean_shift(setup, tiny_source, tiny_target, tiny_corpus):
    _, adapter, shared = setup
    plain = build_teacher(
        tiny_source,
        tiny_target,
        adapter.kernels,
        tiny_corpus,
        shared,
        RefineConfig(max_positions=200),
        show_progress=False,
    )
    centred = build_teacher(
        tiny_source,
        tiny_target,
        adapter.kernels,
        tiny_corpus,
        shared,
        RefineConfig(max_positions=200, centre_shift=True),
        show_progress=False,
    )
    # Recover each teacher's tilt against the target: log q* minus the target's log-probs,
    # centred per position. Centring must remove the mean tilt over positions.
    assert torch.equal(plain.weights, centred.weights)
    difference = plain.log_teacher.float() - centred.log_teacher.float()
    difference = difference - difference.mean(-1, keepdim=True)
    mean_shift = plain.source_change.float().mean(0)
    expected = mean_shift - mean_shift.mean()
    assert torch.allclose(difference, expected.expand_as(difference), atol=0.05)
    assert expected.abs().max() > 0.05
