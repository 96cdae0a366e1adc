"""Recording activations with hooks: rows match a direct forward, hooks are always removed."""

from __future__ import annotations

import pytest
import torch

from loracast.align import aligned_positions, encode
from loracast.capture import record_pair, recording_hooks


def _hook_count(model) -> int:
    return sum(len(module._forward_hooks) for module in model.modules())


def test_hooks_removed_after_use(tiny_source):
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    index = {"batch": torch.tensor([0]), "position": torch.tensor([1])}
    store: dict = {}
    ids = torch.tensor([[5, 6, 7]])
    with recording_hooks(tiny_source.model, names, index, store):
        assert _hook_count(tiny_source.model) == 2
        tiny_source.model(input_ids=ids)
    assert _hook_count(tiny_source.model) == 0
    assert store[names[0]]["output"][0].shape == (1, 32)


def test_hooks_removed_on_error(tiny_source):
    index = {"batch": torch.tensor([0]), "position": torch.tensor([0])}
    with pytest.raises(RuntimeError, match="boom"):
        with recording_hooks(tiny_source.model, ["model.layers.0.self_attn.v_proj"], index, {}):
            raise RuntimeError("boom")
    assert _hook_count(tiny_source.model) == 0


def test_recorded_rows_match_direct_forward(tiny_source, tiny_target, tiny_corpus):
    site = "model.layers.1.self_attn.q_proj"
    anchor = "model.layers.1.self_attn.q_proj"
    texts = tiny_corpus[:3]
    recording = record_pair(
        tiny_source,
        tiny_target,
        texts,
        [site],
        [anchor],
        max_tokens=64,
        batch_size=2,
        show_progress=False,
    )
    assert _hook_count(tiny_source.model) == 0
    assert _hook_count(tiny_target.model) == 0

    first_text = texts[0]
    source_encoded = encode(tiny_source.tokenizer, first_text)
    target_encoded = encode(tiny_target.tokenizer, first_text)
    pairs = aligned_positions(source_encoded, target_encoded)
    captured = {}

    def keep(name):
        def hook(module, args, output):
            captured[name] = (args[0][0], output[0])

        return hook

    source_module = tiny_source.model.get_submodule(site)
    target_module = tiny_target.model.get_submodule(anchor)
    handles = [
        source_module.register_forward_hook(keep("source")),
        target_module.register_forward_hook(keep("target")),
    ]
    with torch.no_grad():
        tiny_source.model(input_ids=torch.tensor([source_encoded.input_ids]))
        tiny_target.model(input_ids=torch.tensor([target_encoded.input_ids]))
    for handle in handles:
        handle.remove()

    rows = len(pairs)
    source_rows = torch.tensor([i for i, _ in pairs])
    target_rows = torch.tensor([j for _, j in pairs])
    assert torch.allclose(
        recording.source[site]["input"][:rows], captured["source"][0][source_rows], atol=1e-5
    )
    assert torch.allclose(
        recording.source[site]["output"][:rows], captured["source"][1][source_rows], atol=1e-5
    )
    assert torch.allclose(
        recording.target[anchor]["output"][:rows], captured["target"][1][target_rows], atol=1e-5
    )
    assert recording.text_ids[:rows].eq(0).all()
    assert recording.stats["positions"] == recording.num_positions


def test_max_positions_caps_recording(tiny_source, tiny_target, tiny_corpus):
    name = "model.layers.0.self_attn.v_proj"
    recording = record_pair(
        tiny_source, tiny_target, tiny_corpus, [name], [name], max_positions=25, show_progress=False
    )
    assert recording.num_positions == 25
    assert recording.target[name]["input"].shape[0] == 25


def test_corpus_without_text_is_rejected(tiny_source, tiny_target):
    name = "model.layers.0.self_attn.v_proj"
    with pytest.raises(ValueError, match="no aligned positions"):
        record_pair(tiny_source, tiny_target, ["", "   "], [name], [name], show_progress=False)
