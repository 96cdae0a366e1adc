"""Every family in the role table: module names, fused layouts, transfers between families."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from loracast.architectures import (
    FAMILIES,
    Family,
    Site,
    anchor_for,
    expand_sites,
    family_of,
    layers_path,
    linear_shape,
    lora_target_modules,
    num_layers,
    output_rows,
    parse_site,
    relative_depth_layer_map,
    role_of,
)
from loracast.bake import BakeConfig, bake
from loracast.bridge import BridgeConfig
from loracast.cartridge import Cartridge
from loracast.fit import HeadFitConfig
from loracast.models import LoadedModel
from loracast.transfer import transfer
from tests.conftest import TINY_FAMILIES, build_tiny_family
from tests.unit.test_adapters import save_random_adapter

VOCAB = 600  # at least the size of both test tokenizers
PROMPT = "Markets rallied on Tuesday as investors cheered."

# Each family is the source of one transfer and the target of another.
RING = [
    "gpt2",
    "llama",
    "gpt_neox",
    "phi3",
    "gemma3_text",
    "opt",
    "qwen2",
    "mistral",
    "qwen3",
    "gemma",
    "gemma2",
    "phi",
    "falcon_new",
    "falcon_classic",
    "falcon",
]
PAIRS = [(RING[i], RING[(i + 1) % len(RING)]) for i in range(len(RING))]

FUSED_QKV = ["gpt2", "gpt_neox", "phi3", "falcon", "falcon_new", "falcon_classic"]

_captured: dict[str, torch.Tensor] = {}


def _capture_attention(module, query, key, value, attention_mask, **options):
    # Keep the first layer's query, key and value as the attention function receives them.
    for name, tensor in (("q", query), ("k", key), ("v", value)):
        _captured.setdefault(name, tensor)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **options)


AttentionInterface.register("loracast_test_capture", _capture_attention)


def _loaded(name, tokenizer, seed=0, layers=2) -> LoadedModel:
    model = build_tiny_family(name, VOCAB, seed=seed, layers=layers)
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, name=f"tiny-{name}")


def _logits(target: LoadedModel) -> torch.Tensor:
    ids = target.tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        return target.model(**ids).logits


def _carry(source, target, corpus, folder, **lora_options):
    """Save an all-linear LoRA on ``source`` and carry it to ``target``; return the result."""
    options = {"target_modules": "all-linear", **lora_options}
    source.model = save_random_adapter(source.model, folder / "adapter", **options).unload()
    config = BridgeConfig(max_positions=240, head=HeadFitConfig(mlp_hidden=0))
    return transfer(
        source,
        target,
        folder / "adapter",
        corpus,
        folder / "cartridge",
        config=config,
        show_progress=False,
    )


@pytest.mark.parametrize("name", list(TINY_FAMILIES))
def test_role_table_matches_model(name):
    model = build_tiny_family(name, VOCAB)
    family = family_of(model)
    assert family is not None
    assert num_layers(model) == model.config.num_hidden_layers
    layer = model.get_submodule(layers_path(model))[0]
    linear = {path for path, module in layer.named_modules() if linear_shape(module)}
    assert linear == set(family.modules.values()) | set(family.fused)
    for path, projection in family.fused.items():
        rows = projection.rows(model.config)
        out_features = linear_shape(layer.get_submodule(path))[0]
        covered = torch.cat([rows[role] for role in projection.roles]).sort().values
        assert torch.equal(covered, torch.arange(out_features)), path
    roles = set(family.modules) | {role for p in family.fused.values() for role in p.roles}
    assert roles >= {"q", "k", "v", "o", "up", "down"}


@pytest.mark.parametrize("name", FUSED_QKV)
def test_fused_qkv_rows_match_model_code(name):
    model = build_tiny_family(name, VOCAB)
    model.set_attn_implementation("loracast_test_capture")
    path = next(path for path, p in family_of(model).fused.items() if "q" in p.roles)
    module = model.get_submodule(f"{layers_path(model)}.0.{path}")

    def column_numbers(module, args, output):
        return torch.arange(output.shape[-1], dtype=output.dtype).expand_as(output).clone()

    _captured.clear()
    handle = module.register_forward_hook(column_numbers)
    with torch.no_grad():
        # One token: rotary embeddings are the identity at position 0.
        model(input_ids=torch.tensor([[5]]))
    handle.remove()
    for role in ("q", "k", "v"):
        # (batch, heads, seq, head_dim) → the row numbers in head order
        received = _captured[role][0, :, 0, :].reshape(-1)
        rows = output_rows(model, Site(0, path, layers_path(model), role))
        assert torch.equal(received, rows.float()), role


def test_phi3_gate_up_rows_match_model_code():
    model = build_tiny_family("phi3", VOCAB)
    layer = model.get_submodule("model.layers.0")
    rows = output_rows(model, Site(0, "mlp.gate_up_proj", part="gate"))
    seen = []

    def fill(module, args, output):
        values = torch.ones_like(output)
        values[..., rows] = 10.0
        return values

    handles = [
        layer.mlp.gate_up_proj.register_forward_hook(fill),
        layer.mlp.down_proj.register_forward_hook(lambda m, args, out: seen.append(args[0])),
    ]
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6]]))
    for handle in handles:
        handle.remove()
    # down_proj reads up · act(gate): 1 · silu(10) when the gate rows are the ones set to 10.
    assert torch.allclose(seen[0], F.silu(torch.tensor(10.0)).expand_as(seen[0]))


def test_site_names_round_trip():
    for name in (
        "model.layers.3.self_attn.q_proj",
        "transformer.h.11.attn.c_attn:q",
        "model.decoder.layers.0.fc1",
        "gpt_neox.layers.2.attention.query_key_value:v",
        "model.layers.4",
    ):
        assert parse_site(name).name == name
    site = parse_site("transformer.h.11.attn.c_attn:k")
    assert (site.layers, site.layer, site.module, site.part) == (
        "transformer.h",
        11,
        "attn.c_attn",
        "k",
    )
    assert site.module_name == "transformer.h.11.attn.c_attn"
    # Names saved before sites knew their layer list still mean model.layers.
    assert parse_site("model.layers.3.mlp.up_proj") == Site(3, "mlp.up_proj")


def test_site_outside_layers_is_named():
    with pytest.raises(ValueError, match="'lm_head' is not inside a decoder layer"):
        parse_site("lm_head")
    with pytest.raises(ValueError, match="part 'qk'"):
        parse_site("transformer.h.0.attn.c_attn:qk")


@pytest.mark.parametrize(
    ("source", "target", "site", "expected"),
    [
        (
            "gpt2",
            "llama",
            Site(1, "attn.c_attn", "transformer.h", "k"),
            "model.layers.1.self_attn.k_proj",
        ),
        ("llama", "gpt2", Site(1, "mlp.gate_proj"), "transformer.h.1.mlp.c_fc"),
        ("llama", "phi3", Site(0, "self_attn.v_proj"), "model.layers.0.self_attn.qkv_proj:v"),
        ("llama", "phi3", Site(0, "mlp.up_proj"), "model.layers.0.mlp.gate_up_proj:up"),
        ("phi3", "opt", Site(1, "self_attn.o_proj"), "model.decoder.layers.1.self_attn.out_proj"),
        (
            "gpt_neox",
            "falcon",
            Site(0, "attention.query_key_value", "gpt_neox.layers", "q"),
            "transformer.h.0.self_attention.query_key_value:q",
        ),
        (
            "opt",
            "gpt_neox",
            Site(1, "fc2", "model.decoder.layers"),
            "gpt_neox.layers.1.mlp.dense_4h_to_h",
        ),
    ],
)
def test_anchor_has_same_role(source, target, site, expected):
    source_model = build_tiny_family(source, VOCAB)
    target_model = build_tiny_family(target, VOCAB)
    assert anchor_for(source_model, target_model, site, [0, 1]).name == expected


def test_missing_role_goes_to_residual_writer(monkeypatch):
    llama = build_tiny_family("llama", VOCAB)
    # A family whose table lacks the key projection carries keys to the attention output.
    reduced = {role: path for role, path in FAMILIES["llama"].modules.items() if role != "k"}
    monkeypatch.setitem(FAMILIES, "mistral", Family("model.layers", reduced))
    mistral = build_tiny_family("mistral", VOCAB)
    anchor = anchor_for(llama, mistral, Site(1, "self_attn.k_proj"), [0, 1])
    assert anchor.name == "model.layers.1.self_attn.o_proj"


def test_fused_site_splits_into_roles():
    model = build_tiny_family("gpt2", VOCAB)
    parts = expand_sites(
        model, [Site(0, "attn.c_attn", "transformer.h"), Site(0, "mlp.c_fc", "transformer.h")]
    )
    assert [site.name for site in parts] == [
        "transformer.h.0.attn.c_attn:q",
        "transformer.h.0.attn.c_attn:k",
        "transformer.h.0.attn.c_attn:v",
        "transformer.h.0.mlp.c_fc",
    ]


def _check_carried_outputs(cartridge: Cartridge, target: LoadedModel) -> None:
    """Check, in one attached forward pass, that every anchor gains exactly its delta."""
    by_module: dict[str, list[str]] = {}
    for anchor in cartridge.anchors:
        by_module.setdefault(cartridge.anchor_site(anchor).module_name, []).append(anchor)
    raw, carried, handles = {}, {}, []

    def keep(store, name, with_input):
        def hook(module, args, output):
            # Cloned because Falcon adds the attention output to the MLP output in place.
            store[name] = (args[0].clone(), output.clone()) if with_input else output.clone()

        return hook

    # Hooks run in registration order: the first receives the module's own output, and the last
    # receives it after every cartridge hook.
    for name in by_module:
        module = target.model.get_submodule(name)
        handles.append(module.register_forward_hook(keep(raw, name, True)))
    with cartridge.attached(target):
        for name in by_module:
            module = target.model.get_submodule(name)
            handles.append(module.register_forward_hook(keep(carried, name, False)))
        _logits(target)
    for handle in handles:
        handle.remove()
    for name, anchors in by_module.items():
        x, expected = raw[name]
        for anchor in anchors:
            delta = cartridge.anchor_delta(anchor, x)
            rows = cartridge.anchor_rows(anchor)
            expected = expected + delta if rows is None else expected.index_add(-1, rows, delta)
        assert torch.allclose(carried[name], expected, atol=1e-5), name


@pytest.mark.parametrize(
    ("source_name", "target_name"), PAIRS, ids=[f"{s}-to-{t}" for s, t in PAIRS]
)
def test_transfer_between_families(
    source_name, target_name, byte_tokenizer, metaspace_tokenizer, tiny_corpus, tmp_path
):
    source = _loaded(source_name, byte_tokenizer, seed=0, layers=3)
    target = _loaded(target_name, metaspace_tokenizer, seed=1, layers=2)
    result = _carry(source, target, tiny_corpus, tmp_path)
    cartridge = result.cartridge

    adapter_sites = {site.whole() for site in cartridge.kernels}
    expected_sites = expand_sites(source.model, sorted(adapter_sites, key=lambda s: s.sort_key))
    assert sorted(site.name for site in cartridge.kernels) == sorted(s.name for s in expected_sites)
    for site, heads in cartridge.bridge.sites.items():
        before, after = role_of(source.model, site), role_of(target.model, heads.anchor)
        assert after == before or (before, after) == ("gate", "up"), site.name

    base = _logits(target)
    _check_carried_outputs(cartridge, target)
    with cartridge.attached(target):
        carried = _logits(target)
    assert not torch.allclose(carried, base)
    assert torch.equal(_logits(target), base)
    assert sum(len(m._forward_hooks) for m in target.model.modules()) == 0

    loaded = Cartridge.load(result.path, target=target)
    with loaded.attached(target):
        assert torch.equal(_logits(target), carried)


def test_modules_to_save_reported_not_carried(
    byte_tokenizer, metaspace_tokenizer, tiny_corpus, tmp_path, caplog
):
    source = _loaded("opt", byte_tokenizer)
    target = _loaded("qwen2", metaspace_tokenizer, seed=1)
    with caplog.at_level(logging.WARNING, logger="loracast.adapters"):
        result = _carry(
            source, target, tiny_corpus, tmp_path, modules_to_save=["lm_head"], use_rslora=True
        )
    assert "lm_head" in caplog.text
    assert result.cartridge.adapter_info["not_carried"] == ["lm_head.weight"]
    saved = json.loads((result.path / "cartridge.json").read_text())
    assert saved["adapter"]["not_carried"] == ["lm_head.weight"]
    assert saved["adapter"]["use_rslora"] is True


@pytest.mark.parametrize("target_name", ["gpt2", "phi3", "gpt_neox", "falcon_new"])
def test_bake_into_fused_target(
    target_name, byte_tokenizer, metaspace_tokenizer, tiny_corpus, tmp_path
):
    from peft import PeftModel

    source = _loaded("llama", byte_tokenizer)
    target = _loaded(target_name, metaspace_tokenizer, seed=1)
    cartridge = _carry(source, target, tiny_corpus, tmp_path).cartridge
    with cartridge.attached(target):
        carried = _logits(target)
    change = float((carried - _logits(target)).abs().max())

    bake(
        cartridge,
        target,
        tiny_corpus,
        tmp_path / "baked",
        config=BakeConfig(bias=True, max_positions=300),
        show_progress=False,
    )
    config = json.loads((tmp_path / "baked" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is (target_name == "gpt2")
    table = family_of(target.model)
    assert {name.split(".0.", 1)[-1] for name in config["target_modules"] if ".0." in name} == (
        set(table.modules.values()) | set(table.fused)
    )
    peft_model = PeftModel.from_pretrained(target.model, str(tmp_path / "baked")).eval()
    ids = target.tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        baked = peft_model(**ids).logits
    assert change > 1e-3
    assert (baked - carried).abs().max() < 1e-4 * max(1.0, change)
    if target_name == "gpt2":
        # Merging writes B·A into the transposed Conv1D weight, so a wrong fan_in_fan_out shows.
        with torch.no_grad():
            merged = peft_model.merge_and_unload()(**ids).logits
        assert torch.allclose(merged, baked, atol=1e-5)


def test_unknown_family_carries_to_layer_output(
    monkeypatch, byte_tokenizer, metaspace_tokenizer, tiny_corpus, tmp_path
):
    monkeypatch.delitem(FAMILIES, "qwen2")
    source = _loaded("llama", byte_tokenizer)
    target = _loaded("qwen2", metaspace_tokenizer, seed=1)
    cartridge = _carry(source, target, tiny_corpus, tmp_path).cartridge
    assert sorted(cartridge.anchors) == ["model.layers.0", "model.layers.1"]
    base = _logits(target)
    _check_carried_outputs(cartridge, target)
    with cartridge.attached(target):
        assert not torch.allclose(_logits(target), base)
    assert torch.equal(_logits(target), base)
    with pytest.raises(ValueError, match=r"anchor model\.layers\.0 is a Qwen2DecoderLayer"):
        bake(cartridge, target, tiny_corpus, tmp_path / "baked", show_progress=False)


def test_unknown_source_family_is_carried(
    monkeypatch, byte_tokenizer, metaspace_tokenizer, tiny_corpus, tmp_path
):
    monkeypatch.delitem(FAMILIES, "opt")
    source = _loaded("opt", byte_tokenizer, layers=3)
    target = _loaded("phi3", metaspace_tokenizer, seed=1)
    result = _carry(source, target, tiny_corpus, tmp_path, target_modules=["q_proj", "fc2"])
    assert sorted(result.cartridge.anchors) == ["model.layers.0", "model.layers.1"]
    assert len(result.cartridge.kernels) == 6


def test_unknown_family_without_layer_list_is_named(monkeypatch):
    monkeypatch.delitem(FAMILIES, "llama")
    model = build_tiny_family("llama", VOCAB)
    model.config.num_hidden_layers = 5
    with pytest.raises(ValueError, match="'llama' is not in loracast.architectures.FAMILIES"):
        layers_path(model)


def test_relative_depth_with_new_layer_lists():
    gpt2 = build_tiny_family("gpt2", VOCAB, layers=3)
    opt = build_tiny_family("opt", VOCAB, layers=2)
    assert relative_depth_layer_map(num_layers(gpt2), num_layers(opt)) == [0, 0, 1]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("llama", ["q_proj", "v_proj"]),
        ("opt", ["q_proj", "v_proj"]),
        ("gpt2", ["attn.c_attn"]),
        ("gpt_neox", ["attention.query_key_value"]),
        ("falcon", ["self_attention.query_key_value"]),
        ("phi3", ["self_attn.qkv_proj"]),
    ],
)
def test_lora_targets_follow_family(name, expected):
    model = build_tiny_family(name, vocab_size=64)

    assert lora_target_modules(model, ("q_proj", "v_proj")) == expected


def test_lora_targets_keep_present_names():
    model = build_tiny_family("gpt2", vocab_size=64)

    assert lora_target_modules(model, ("c_proj", "down_proj")) == ["c_proj", "mlp.c_proj"]


def test_lora_targets_reject_unknown_names():
    model = build_tiny_family("gpt2", vocab_size=64)

    with pytest.raises(ValueError, match="c_attn"):
        lora_target_modules(model, ("query",))
