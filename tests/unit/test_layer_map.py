"""Layer maps: linear CKA, the monotone map it chooses, and bridges fitted with it."""

from __future__ import annotations

import itertools

import pytest
import torch

from loracast.adapters import load_adapter
from loracast.architectures import num_layers
from loracast.bridge import BridgeConfig, fit_bridge, fit_bridge_from_recording, record_corpus
from loracast.fit import HeadFitConfig
from loracast.layer_map import (
    cka_layer_map,
    cka_matrix,
    linear_cka,
    monotone_layer_map,
    standardise_streams,
)
from loracast.models import LoadedModel
from loracast.streaming import record_shards
from tests.conftest import build_tiny_llama
from tests.unit.test_adapters import save_random_adapter


def test_cka_of_rotated_scaled_copy_is_one():
    torch.manual_seed(0)
    x = torch.randn(200, 8)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * x @ rotation + 1.0) == pytest.approx(1.0)


def test_cka_of_unrelated_features_is_small():
    torch.manual_seed(0)
    x, y = torch.randn(2000, 4), torch.randn(2000, 6)
    assert linear_cka(x, y) < 0.05
    # A feature set that shares half of its directions lies in between.
    partly = torch.cat([x[:, :2], y[:, :2]], dim=1)
    assert linear_cka(x, partly) > 0.2
    assert linear_cka(x, partly) < 0.8


def test_cka_of_constant_features_is_zero():
    x = torch.randn(50, 3)
    assert linear_cka(x, torch.ones(50, 2)) == 0.0


def test_standardised_ignores_huge_dimension():
    torch.manual_seed(0)
    x = torch.randn(500, 6)
    y = x @ torch.randn(6, 6) + 0.5 * torch.randn(500, 6)
    # A dimension a thousand times larger than the rest, unrelated to the other stream.
    loud = torch.cat([x, 1000.0 * (1.0 + 0.01 * torch.randn(500, 1))], dim=1)
    raw = linear_cka(loud, y)
    standardised = linear_cka(standardise_streams(loud), standardise_streams(y))
    assert raw < 0.1
    assert standardised > 0.5
    features = standardise_streams(loud)
    assert torch.allclose(features.std(0), torch.ones(7, dtype=torch.float64))


def test_standardised_zero_feature_stays_zero():
    states = torch.cat([torch.randn(20, 3), torch.zeros(20, 1)], dim=1)
    assert torch.equal(standardise_streams(states)[:, 3], torch.zeros(20, dtype=torch.float64))


def test_cka_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="same rows"):
        cka_matrix([torch.randn(10, 2)], [torch.randn(11, 2)])
    with pytest.raises(ValueError, match="at least 2 rows"):
        linear_cka(torch.randn(1, 2), torch.randn(1, 2))


def _best_monotone(similarity: torch.Tensor) -> float:
    rows, columns = similarity.shape
    return max(
        sum(float(similarity[i, j]) for i, j in enumerate(chosen))
        for chosen in itertools.combinations_with_replacement(range(columns), rows)
    )


def test_monotone_map_maximises_summed_similarity():
    torch.manual_seed(0)
    for _ in range(20):
        similarity = torch.rand(5, 4)
        layer_map = monotone_layer_map(similarity)
        assert layer_map == sorted(layer_map)
        total = sum(float(similarity[i, j]) for i, j in enumerate(layer_map))
        assert total == pytest.approx(_best_monotone(similarity))


def test_monotone_map_never_goes_back_in_depth():
    # Row 1's best column (0) lies before row 0's (2), so the row-wise argmax is not monotone.
    similarity = torch.tensor([[0.1, 0.2, 0.9], [0.8, 0.1, 0.3], [0.1, 0.1, 0.9]])
    assert monotone_layer_map(similarity) == [2, 2, 2]
    with pytest.raises(ValueError, match="non-empty 2-D"):
        monotone_layer_map(torch.zeros(0, 3))


def test_cka_map_self_is_identity(tiny_source, tiny_corpus):
    layer_map, similarity = cka_layer_map(
        tiny_source, tiny_source, tiny_corpus, max_positions=300, show_progress=False
    )
    assert layer_map == list(range(num_layers(tiny_source.model)))
    assert torch.allclose(similarity.diagonal(), torch.ones(len(layer_map), dtype=torch.float64))


def test_cka_map_deeper_copy(byte_tokenizer, tiny_corpus):
    # Target layer 2l + 1 is a copy of source layer l, and every even target layer writes
    # nothing to the residual stream. So target layers 2l and 2l + 1 read the stream that
    # source layer l reads, and ties go to the earlier layer.
    source_model = build_tiny_llama(len(byte_tokenizer), layers=3)
    target_model = build_tiny_llama(len(byte_tokenizer), layers=6)
    target_model.model.embed_tokens.load_state_dict(source_model.model.embed_tokens.state_dict())
    for index, layer in enumerate(target_model.model.layers):
        layer.load_state_dict(source_model.model.layers[index // 2].state_dict())
        if index % 2 == 0:
            layer.self_attn.o_proj.weight.data.zero_()
            layer.mlp.down_proj.weight.data.zero_()
    source = LoadedModel(model=source_model, tokenizer=byte_tokenizer, name="three")
    target = LoadedModel(model=target_model, tokenizer=byte_tokenizer, name="six")
    layer_map, similarity = cka_layer_map(
        source, target, tiny_corpus, max_positions=300, show_progress=False
    )
    assert layer_map == [0, 2, 4]
    for layer, chosen in enumerate(layer_map):
        assert float(similarity[layer, chosen]) == pytest.approx(1.0)


def _sites(source, folder):
    peft_model = save_random_adapter(source.model, folder / "adapter")
    source.model = peft_model.unload()
    return list(load_adapter(folder / "adapter").kernels)


def test_bridge_anchors_follow_cka_map(tiny_source, tiny_target, tiny_corpus, tmp_path):
    sites = _sites(tiny_source, tmp_path)
    config = BridgeConfig(layer_map="cka", max_positions=300, head=HeadFitConfig(mlp_hidden=0))
    expected, _ = cka_layer_map(tiny_source, tiny_target, tiny_corpus, show_progress=False)
    bridge = fit_bridge(tiny_source, tiny_target, tiny_corpus, sites, config, show_progress=False)
    assert bridge.layer_map == expected
    assert bridge.describe()["layer_map"] == expected
    for site, heads in bridge.sites.items():
        assert heads.anchor.layer == expected[site.layer]


def test_cka_fit_needs_recorded_map(tiny_source, tiny_target, tiny_corpus, tmp_path):
    sites = _sites(tiny_source, tmp_path)
    recording = record_corpus(
        tiny_source,
        tiny_target,
        tiny_corpus,
        sites,
        BridgeConfig(max_positions=200),
        show_progress=False,
    )
    recording.layer_map = None
    config = BridgeConfig(layer_map="cka", head=HeadFitConfig(mlp_hidden=0))
    with pytest.raises(ValueError, match="no layer map"):
        fit_bridge_from_recording(tiny_source, tiny_target, recording, sites, config)


def test_sharded_recording_rejects_cka_map(tiny_source, tiny_target, tiny_corpus, tmp_path):
    sites = _sites(tiny_source, tmp_path)
    with pytest.raises(ValueError, match="record in memory"):
        record_shards(
            tiny_source,
            tiny_target,
            tiny_corpus,
            sites,
            tmp_path / "shards",
            BridgeConfig(layer_map="cka"),
        )
    assert not (tmp_path / "shards").exists()


def test_bridge_config_rejects_unknown_layer_map():
    with pytest.raises(ValueError, match="relative-depth"):
        BridgeConfig(layer_map="nearest")
