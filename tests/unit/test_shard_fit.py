"""Fitting from shards: moments equal the full-data fit, and a killed fit resumes exactly."""

from __future__ import annotations

import shutil

import pytest
import torch

from loracast import shard_fit
from loracast.architectures import Site
from loracast.bridge import BridgeConfig, fit_bridge_from_recording, record_corpus
from loracast.fit import HeadFitConfig, fit_head
from loracast.moments import Moments, ridge_head
from loracast.shard_fit import fit_bridge_from_shards
from loracast.streaming import ShardConfig, record_shards

SITES = [Site(0, "self_attn.q_proj"), Site(1, "self_attn.v_proj"), Site(3, "self_attn.q_proj")]


def _config(mlp_hidden: int) -> BridgeConfig:
    head = HeadFitConfig(mlp_hidden=mlp_hidden, mlp_steps=20, mlp_batch_size=64)
    return BridgeConfig(max_tokens=32, batch_size=4, max_positions=None, head=head)


def _assert_close_bridges(first, second, rtol: float, atol: float) -> None:
    first_tensors, second_tensors = first.tensors(), second.tensors()
    assert first_tensors.keys() == second_tensors.keys()
    for key, value in first_tensors.items():
        torch.testing.assert_close(second_tensors[key], value, rtol=rtol, atol=atol, msg=key)
    for site, heads in first.sites.items():
        for name, value in heads.metrics.items():
            assert second.sites[site].metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-5)


@pytest.fixture()
def recorded(tiny_source, tiny_target, tiny_corpus, tmp_path):
    folder = tmp_path / "record"
    record_shards(
        tiny_source,
        tiny_target,
        tiny_corpus,
        SITES,
        folder,
        _config(0),
        ShardConfig(shard_megabytes=0.02),
        show_progress=False,
    )
    return folder


def test_moments_ridge_equals_fit_head():
    generator = torch.Generator().manual_seed(0)
    # Large offsets, as in real activations, test the shifted sums.
    x = torch.randn(700, 12, generator=generator) * 3 + 40
    weight = torch.randn(12, 5, generator=generator)
    y = x @ weight + torch.randn(700, 5, generator=generator) + 500
    config = HeadFitConfig(mlp_hidden=0)
    expected, expected_metrics = fit_head(x[:600], y[:600], x[600:], y[600:], config)

    train = Moments.zeros(x[:50].mean(0), y[:50].mean(0))
    val = Moments.zeros(train.shift_x, train.shift_y)
    for start in range(0, 600, 128):
        train.add(x[start : min(start + 128, 600)], y[start : min(start + 128, 600)])
    val.add(x[600:], y[600:])
    head, metrics = ridge_head(train, val, config.ridge_alphas, mlp_hidden=0)

    assert metrics["ridge_alpha"] == expected_metrics["ridge_alpha"]
    assert metrics["r2_linear"] == pytest.approx(expected_metrics["r2_linear"], rel=1e-5)
    torch.testing.assert_close(head(x[600:]), expected(x[600:]), rtol=1e-4, atol=1e-3)
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(head.state_dict()[key], value, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mlp_hidden", [0, 8])
def test_bridge_equals_in_memory_fit(tiny_source, tiny_target, tiny_corpus, recorded, mlp_hidden):
    config = _config(mlp_hidden)
    recording = record_corpus(
        tiny_source, tiny_target, tiny_corpus, SITES, config, show_progress=False
    )
    expected = fit_bridge_from_recording(
        tiny_source, tiny_target, recording, SITES, config, show_progress=False
    )
    bridge = fit_bridge_from_shards(
        tiny_source, tiny_target, recorded, SITES, config, show_progress=False
    )
    # Moments and the in-memory fit sum the same float32 products in different orders. On
    # some CPUs, weights of order 1 then differ by up to about 3e-4.
    _assert_close_bridges(expected, bridge, rtol=1e-3, atol=1e-3)
    assert bridge.stats["train_positions"] == expected.stats["train_positions"]
    assert bridge.stats["validation_positions"] == expected.stats["validation_positions"]


def test_killed_fit_resumes_to_same_bridge(tiny_source, tiny_target, recorded, monkeypatch):
    config = _config(8)
    fitted = []
    ridge = shard_fit.ridge_head

    def ridge_until_fourth(*args, **kwargs):
        fitted.append(1)
        if len(fitted) == 4:
            raise KeyboardInterrupt  # killed while fitting the fourth head
        return ridge(*args, **kwargs)

    monkeypatch.setattr(shard_fit, "ridge_head", ridge_until_fourth)
    with pytest.raises(KeyboardInterrupt):
        fit_bridge_from_shards(
            tiny_source, tiny_target, recorded, SITES, config, show_progress=False
        )
    (checkpoints,) = recorded.glob("fit-*")
    assert len(list(checkpoints.glob("*.safetensors"))) == 3

    fitted.clear()
    resumed = fit_bridge_from_shards(
        tiny_source, tiny_target, recorded, SITES, config, show_progress=False
    )
    # Three shared-input encoders and three decoders: the resumed run fits only the last three.
    assert len(fitted) == 3
    monkeypatch.setattr(shard_fit, "ridge_head", ridge)
    shutil.rmtree(checkpoints)
    uninterrupted = fit_bridge_from_shards(
        tiny_source, tiny_target, recorded, SITES, config, show_progress=False
    )
    _assert_close_bridges(uninterrupted, resumed, rtol=0, atol=0)


def test_fit_rejects_other_models(tiny_source, tiny_target, recorded, byte_tokenizer):
    from loracast.models import LoadedModel
    from tests.conftest import build_tiny_llama

    wider = LoadedModel(build_tiny_llama(len(byte_tokenizer), layers=5), byte_tokenizer, "other")
    with pytest.raises(ValueError, match="another source model .*fingerprint"):
        fit_bridge_from_shards(wider, tiny_target, recorded, SITES, _config(0), show_progress=False)
    unrecorded = [Site(2, "self_attn.q_proj")]
    with pytest.raises(ValueError, match=r"source modules \['model.layers.2.self_attn.q_proj'\]"):
        fit_bridge_from_shards(
            tiny_source, tiny_target, recorded, unrecorded, _config(0), show_progress=False
        )


def test_checkpoints_of_another_recording_rejected(tiny_source, tiny_target, tiny_corpus, recorded):
    fit_bridge_from_shards(
        tiny_source, tiny_target, recorded, SITES, _config(0), show_progress=False
    )
    # Record again in place, keeping the old checkpoints.
    for path in recorded.iterdir():
        if path.is_file():
            path.unlink()
    record_shards(
        tiny_source,
        tiny_target,
        tiny_corpus[:20],
        SITES,
        recorded,
        _config(0),
        ShardConfig(shard_megabytes=0.02),
        show_progress=False,
    )
    with pytest.raises(ValueError, match="belong to an earlier recording.*delete"):
        fit_bridge_from_shards(
            tiny_source, tiny_target, recorded, SITES, _config(0), show_progress=False
        )


# A fused source projection (GPT-2's c_attn) meets separate q, k and v projections, and a
# separate source MLP meets a fused target projection (Phi-3's gate_up_proj).
FUSED_PAIRS = [("gpt2", "llama"), ("llama", "phi3")]


@pytest.mark.parametrize(
    ("source_name", "target_name"), FUSED_PAIRS, ids=[f"{s}-to-{t}" for s, t in FUSED_PAIRS]
)
def test_fused_parts_equal_in_memory_fit(
    source_name, target_name, byte_tokenizer, metaspace_tokenizer, tiny_corpus, tmp_path
):
    from loracast.adapters import load_adapter
    from loracast.architectures import expand_sites, linear_weight, output_rows
    from loracast.models import LoadedModel
    from loracast.shards import Manifest
    from tests.conftest import build_tiny_family
    from tests.unit.test_adapters import save_random_adapter

    vocab = 600  # at least the size of both test tokenizers
    source_model = build_tiny_family(source_name, vocab, seed=0, layers=3).requires_grad_(False)
    target_model = build_tiny_family(target_name, vocab, seed=1, layers=2).requires_grad_(False)
    source = LoadedModel(source_model, byte_tokenizer, f"tiny-{source_name}")
    target = LoadedModel(target_model, metaspace_tokenizer, f"tiny-{target_name}")
    peft_model = save_random_adapter(
        source.model, tmp_path / "adapter", target_modules="all-linear"
    )
    source.model = peft_model.unload()
    sites = sorted(load_adapter(tmp_path / "adapter").kernels, key=lambda site: site.sort_key)
    config = _config(8)

    folder = tmp_path / "record"
    manifest = record_shards(
        source,
        target,
        tiny_corpus,
        sites,
        folder,
        config,
        ShardConfig(shard_megabytes=0.05),
        show_progress=False,
    )
    bridge = fit_bridge_from_shards(source, target, folder, sites, config, show_progress=False)
    recording = record_corpus(source, target, tiny_corpus, sites, config, show_progress=False)
    expected = fit_bridge_from_recording(
        source, target, recording, sites, config, show_progress=False
    )

    # Each fused module is recorded once, under its module name, for all of its parts.
    parts = expand_sites(source.model, sites)
    modules = sorted({site.module_name for site in parts})
    assert manifest.identity["site_modules"] == modules
    assert Manifest.load(folder).identity["site_modules"] == modules
    assert set(bridge.sites) == set(parts)
    anchors = {heads.anchor.module_name for heads in bridge.sites.values()}
    assert manifest.identity["anchor_modules"] == sorted(anchors)
    # The attention-output (o) sites choose the smallest ridge penalty, where the float32
    # Gram matrix of the in-memory fit moves weights of size about 1 by up to about 7e-4.
    _assert_close_bridges(expected, bridge, rtol=1e-2, atol=1e-3)

    fused_sites = [site for site in parts if site.part is not None]
    fused_anchors = [h.anchor for h in bridge.sites.values() if h.anchor.part is not None]
    assert fused_sites or fused_anchors
    for site, heads in bridge.sites.items():
        weight = linear_weight(source.model.get_submodule(site.module_name))  # (d_out, d_in)
        rows = output_rows(source.model, site)
        if rows is not None:
            weight = weight[rows]
        assert torch.equal(heads.source_weight, weight), site.name
        assert heads.decoder.d_in == weight.shape[0], site.name
        anchor_rows = output_rows(target.model, heads.anchor)
        if anchor_rows is not None:
            assert heads.decoder.d_out == len(anchor_rows), site.name

    # One decoder checkpoint per site, parts of one module included.
    (checkpoints,) = folder.glob("fit-*")
    assert len(list(checkpoints.glob("decoder-*.safetensors"))) == len(parts)
