"""Cartridges: exact deltas at anchors, bit-exact detach, save/load round trips, target checks."""

from __future__ import annotations

import json

import pytest
import torch

from loracast.adapters import load_adapter
from loracast.bridge import Bridge, BridgeConfig, fit_bridge
from loracast.cartridge import Cartridge, build_cartridge
from loracast.fit import HeadFitConfig
from loracast.serialization import FormatError
from tests.conftest import build_tiny_gemma3
from tests.unit.test_adapters import save_random_adapter

PROMPT = "Markets rallied on Tuesday as investors cheered."


def _make_cartridge(source, target, corpus, folder, mlp_hidden=0, modules=("q_proj", "v_proj")):
    # get_peft_model injects LoRA layers into the model itself; unload them again.
    peft_model = save_random_adapter(source.model, folder / "adapter", target_modules=list(modules))
    source.model = peft_model.unload()
    adapter = load_adapter(folder / "adapter")
    config = BridgeConfig(
        max_positions=400, head=HeadFitConfig(mlp_hidden=mlp_hidden, mlp_steps=20)
    )
    bridge = fit_bridge(source, target, corpus, list(adapter.kernels), config, show_progress=False)
    return build_cartridge(bridge, adapter)


def _logits(target, text=PROMPT):
    ids = target.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return target.model(**ids).logits


@pytest.mark.parametrize("mlp_hidden", [0, 16])
def test_attach_adds_exact_delta_at_anchor(
    tiny_source, tiny_target, tiny_corpus, tmp_path, mlp_hidden
):
    cartridge = _make_cartridge(tiny_source, tiny_target, tiny_corpus, tmp_path, mlp_hidden)
    anchor = next(iter(cartridge.anchors))
    module = tiny_target.model.get_submodule(anchor)
    seen = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    _logits(tiny_target)
    (base_input, base_output) = seen.pop()
    with cartridge.attached(tiny_target):
        # Hooks run in registration order, so the recording hook sees the base output first;
        # a second hook registered after the cartridge's sees the carried output.
        after = []
        late = module.register_forward_hook(lambda m, args, out: after.append(out))
        _logits(tiny_target)
        late.remove()
    handle.remove()
    expected = base_output + cartridge.anchor_delta(anchor, base_input)
    assert torch.allclose(after[0], expected, atol=1e-5)
    assert not torch.allclose(after[0], base_output)


def test_detach_restores_base_bit_exact(tiny_source, tiny_target, tiny_corpus, tmp_path):
    cartridge = _make_cartridge(tiny_source, tiny_target, tiny_corpus, tmp_path)
    base = _logits(tiny_target)
    cartridge.attach(tiny_target)
    carried = _logits(tiny_target)
    cartridge.detach()
    assert not torch.equal(base, carried)
    assert torch.equal(_logits(tiny_target), base)
    assert sum(len(m._forward_hooks) for m in tiny_target.model.modules()) == 0


def test_scale_and_enabled(tiny_source, tiny_target, tiny_corpus, tmp_path):
    cartridge = _make_cartridge(tiny_source, tiny_target, tiny_corpus, tmp_path)
    anchor = next(iter(cartridge.anchors))
    x = torch.randn(3, tiny_target.model.config.hidden_size)
    single = cartridge.anchor_delta(anchor, x)
    cartridge.scale = 2.0
    assert torch.allclose(cartridge.anchor_delta(anchor, x), 2 * single, atol=1e-6)
    base = _logits(tiny_target)
    with cartridge.attached(tiny_target):
        cartridge.enabled = False
        assert torch.equal(_logits(tiny_target), base)
        cartridge.enabled = True
        assert not torch.equal(_logits(tiny_target), base)


@pytest.mark.parametrize("mlp_hidden", [0, 16])
def test_save_load_round_trip(tiny_source, tiny_target, tiny_corpus, tmp_path, mlp_hidden):
    cartridge = _make_cartridge(tiny_source, tiny_target, tiny_corpus, tmp_path, mlp_hidden)
    with cartridge.attached(tiny_target):
        expected = _logits(tiny_target)
    folder = cartridge.save(tmp_path / "cartridge")
    config = json.loads((folder / "cartridge.json").read_text())
    assert config["format_version"] == 1
    assert config["target"]["name"] == "tiny-gemma3"
    assert "encoder_r2" in config["sites"][0]["metrics"]
    assert config["provenance"]["loracast"]
    loaded = Cartridge.load(folder, target=tiny_target)
    with loaded.attached(tiny_target):
        assert torch.equal(_logits(tiny_target), expected)


def test_save_refuses_existing_folder(tiny_source, tiny_target, tiny_corpus, tmp_path):
    cartridge = _make_cartridge(tiny_source, tiny_target, tiny_corpus, tmp_path)
    folder = cartridge.save(tmp_path / "cartridge")
    with pytest.raises(FileExistsError, match="--overwrite"):
        cartridge.save(folder)
    cartridge.save(folder, overwrite=True)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".cartridge")]
    assert leftovers == []


def test_load_onto_other_target_fails(tiny_source, tiny_target, tiny_corpus, tmp_path):
    cartridge = _make_cartridge(tiny_source, tiny_target, tiny_corpus, tmp_path)
    folder = cartridge.save(tmp_path / "cartridge")
    other = build_gemma_like(tiny_target)
    with pytest.raises(ValueError, match="fitted for target 'tiny-gemma3'"):
        Cartridge.load(folder, target=other)
    with pytest.raises(ValueError, match="fitted for target"):
        cartridge.attach(other.model)


def build_gemma_like(tiny_target):
    from loracast.models import LoadedModel

    model = build_tiny_gemma3(len(tiny_target.tokenizer), layers=4)
    return LoadedModel(model=model, tokenizer=tiny_target.tokenizer, name="other")


def test_load_with_other_tokenizer_fails(
    tiny_source, tiny_target, tiny_corpus, tmp_path, byte_tokenizer
):
    from loracast.models import LoadedModel

    cartridge = _make_cartridge(tiny_source, tiny_target, tiny_corpus, tmp_path)
    folder = cartridge.save(tmp_path / "cartridge")
    swapped = LoadedModel(model=tiny_target.model, tokenizer=byte_tokenizer, name="x")
    with pytest.raises(ValueError, match="tokenizer"):
        Cartridge.load(folder, target=swapped)


def test_newer_format_version_is_rejected(tiny_source, tiny_target, tiny_corpus, tmp_path):
    cartridge = _make_cartridge(tiny_source, tiny_target, tiny_corpus, tmp_path)
    folder = cartridge.save(tmp_path / "cartridge")
    config_path = folder / "cartridge.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(FormatError, match="upgrade loracast"):
        Cartridge.load(folder)


def test_bridge_round_trip_and_reuse(tiny_source, tiny_target, tiny_corpus, tmp_path):
    cartridge = _make_cartridge(tiny_source, tiny_target, tiny_corpus, tmp_path)
    folder = cartridge.bridge.save(tmp_path / "bridge")
    bridge = Bridge.load(folder)
    assert bridge.layer_map == cartridge.bridge.layer_map
    rebound = build_cartridge(bridge, load_adapter(tmp_path / "adapter"))
    with cartridge.attached(tiny_target):
        expected = _logits(tiny_target)
    with rebound.attached(tiny_target):
        assert torch.equal(_logits(tiny_target), expected)


def test_two_cartridges_compose(tiny_source, tiny_target, tiny_corpus, tmp_path):
    first = _make_cartridge(tiny_source, tiny_target, tiny_corpus, tmp_path / "first")
    second = _make_cartridge(
        tiny_source, tiny_target, tiny_corpus, tmp_path / "second", modules=("q_proj", "o_proj")
    )
    base = _logits(tiny_target)
    with second.attached(tiny_target):
        second_only = _logits(tiny_target)
    with first.attached(tiny_target):
        first_only = _logits(tiny_target)

    first.attach(tiny_target)
    second.attach(tiny_target)
    both = _logits(tiny_target)
    assert not torch.allclose(both, first_only)
    assert not torch.allclose(both, second_only)
    # Both add their delta at a shared anchor, each computed from the anchor's own input.
    anchor = "model.layers.0.self_attn.q_proj"
    module = tiny_target.model.get_submodule(anchor)
    x = torch.randn(2, 5, module.in_features)
    with torch.no_grad():
        expected = module(x)
    first.enabled, second.enabled = False, False
    with torch.no_grad():
        plain = module(x)
    first.enabled, second.enabled = True, True
    summed = plain + first.anchor_delta(anchor, x) + second.anchor_delta(anchor, x)
    assert torch.allclose(expected, summed, atol=1e-5)

    first.scale = 0.0
    assert torch.equal(_logits(tiny_target), second_only)
    first.scale = 1.0
    second.enabled = False
    assert torch.equal(_logits(tiny_target), first_only)
    second.enabled = True
    first.detach()
    assert torch.equal(_logits(tiny_target), second_only)
    second.detach()
    assert torch.equal(_logits(tiny_target), base)
