"""Baking a cartridge into a PEFT LoRA: exactness for linear heads, merging, rank reports."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from peft import PeftModel

from loracast.bake import BAKE_FILE, CARD_FILE, BakeConfig, bake, reduced_rank_regression
from tests.unit.test_cartridge import PROMPT, _logits, _make_cartridge


def _peft_logits(target, folder, merge=False):
    model = PeftModel.from_pretrained(target.model, str(folder))
    model.eval()
    try:
        if merge:
            merged = model.merge_and_unload()
            return _logits_of(merged, target.tokenizer)
        return _logits_of(model, target.tokenizer)
    finally:
        if not merge:
            target.model = model.unload()


def _logits_of(model, tokenizer):
    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


def test_linear_heads_bake_exactly_with_bias(tiny_source, tiny_target, tiny_corpus, tmp_path):
    cartridge = _make_cartridge(tiny_source, tiny_target, tiny_corpus, tmp_path)
    base = _logits(tiny_target)
    with cartridge.attached(tiny_target):
        carried = _logits(tiny_target)
    result = bake(
        cartridge,
        tiny_target,
        tiny_corpus,
        tmp_path / "baked",
        config=BakeConfig(bias=True, max_positions=300),
        show_progress=False,
    )
    baked = _peft_logits(tiny_target, tmp_path / "baked")
    change = (carried - base).abs().max()
    assert change > 1e-3
    assert (baked - carried).abs().max() < 1e-4 * max(1.0, float(change))
    assert result.worst_error < 1e-6
    # Four source layers map onto three target layers, so two sites share an anchor there.
    ranks = sorted(report.kernel_rank for report in result.anchors)
    assert ranks == [4, 4, 4, 4, 8, 8]
    assert all(report.rank == report.kernel_rank for report in result.anchors)

    config = json.loads((tmp_path / "baked" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tiny_target.name
    assert config["lora_bias"] is True
    assert sorted(config["target_modules"]) == sorted(cartridge.anchors)
    card = (tmp_path / "baked" / CARD_FILE).read_text()
    assert tiny_target.name in card
    assert "PeftModel.from_pretrained" in card


def test_bake_without_bias_merges_to_the_same_logits(
    tiny_source, tiny_target, tiny_corpus, tmp_path
):
    cartridge = _make_cartridge(tiny_source, tiny_target, tiny_corpus, tmp_path, mlp_hidden=16)
    result = bake(
        cartridge,
        tiny_target,
        tiny_corpus,
        tmp_path / "baked",
        config=BakeConfig(max_positions=300),
        show_progress=False,
    )
    base = _logits(tiny_target)
    unmerged = _peft_logits(tiny_target, tmp_path / "baked")
    merged = _peft_logits(tiny_target, tmp_path / "baked", merge=True)
    assert not torch.allclose(unmerged, base)
    assert torch.allclose(merged, unmerged, atol=1e-5)
    record = json.loads((tmp_path / "baked" / BAKE_FILE).read_text())
    assert len(record["anchors"]) == len(result.anchors) == len(cartridge.anchors)
    assert all(0 <= entry["relative_error"] < 1 for entry in record["anchors"])


def test_too_low_a_rank_is_reported(tiny_source, tiny_target, tiny_corpus, tmp_path, caplog):
    cartridge = _make_cartridge(tiny_source, tiny_target, tiny_corpus, tmp_path)
    with caplog.at_level(logging.WARNING, logger="loracast.bake"):
        result = bake(
            cartridge,
            tiny_target,
            tiny_corpus,
            tmp_path / "baked",
            config=BakeConfig(rank=1, bias=True, max_positions=300),
            show_progress=False,
        )
    assert all(report.rank == 1 for report in result.anchors)
    assert all(report.energy_kept < 0.999 for report in result.anchors)
    assert result.worst_error > 1e-3
    assert "Raise --rank" in caplog.text
    assert "at 6 of 6 anchors" in caplog.text
    config = json.loads((tmp_path / "baked" / "adapter_config.json").read_text())
    assert config["r"] == 1


def test_bake_refuses_an_existing_folder_and_another_target(
    tiny_source, tiny_target, tiny_corpus, tmp_path
):
    cartridge = _make_cartridge(tiny_source, tiny_target, tiny_corpus, tmp_path)
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        bake(cartridge, tiny_target, tiny_corpus, tmp_path / "taken", show_progress=False)
    with pytest.raises(ValueError, match="fitted for target"):
        bake(cartridge, tiny_source, tiny_corpus, tmp_path / "other", show_progress=False)
    assert not (tmp_path / "other").exists()


def test_bake_config_reports_every_error():
    with pytest.raises(ValueError) as error:
        BakeConfig(rank=0, max_positions=-1, validation_fraction=1.5)
    message = str(error.value)
    assert "rank" in message
    assert "max_positions" in message
    assert "validation_fraction" in message


@pytest.mark.parametrize("bias", [False, True])
def test_reduced_rank_regression_matches_numpy(bias):
    generator = np.random.default_rng(0)
    x = generator.normal(size=(200, 12)) + (3.0 if bias else 0.0)
    truth = generator.normal(size=(12, 9)) @ np.diag([5, 4, 3, 2, 1, 0.5, 0.2, 0.1, 0.05])
    y = x @ truth + generator.normal(scale=0.01, size=(200, 9)) + (2.0 if bias else 0.0)
    rank = 3
    A, B, constant, kept = reduced_rank_regression(
        torch.from_numpy(x), torch.from_numpy(y), rank, bias=bias, ridge=0.0
    )

    xm = x.mean(0) if bias else np.zeros(12)
    ym = y.mean(0) if bias else np.zeros(9)
    coefficients = np.linalg.lstsq(x - xm, y - ym, rcond=None)[0]
    _, singular, vt = np.linalg.svd((x - xm) @ coefficients, full_matrices=False)
    expected = coefficients @ vt[:rank].T @ vt[:rank]
    assert np.allclose((B @ A).numpy().T, expected, atol=1e-8)
    assert kept == pytest.approx((singular[:rank] ** 2).sum() / (singular**2).sum())
    if bias:
        assert np.allclose(constant.numpy(), ym - xm @ expected, atol=1e-8)
    else:
        assert constant is None
