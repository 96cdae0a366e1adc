"""Reading PEFT LoRA folders into kernels and validating them against the source model."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from peft import (
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PromptTuningConfig,
    get_peft_model,
)

from loracast.adapters import load_adapter, validate_adapter
from loracast.architectures import Site
from tests.conftest import build_tiny_family, build_tiny_llama


def save_random_adapter(model, folder, **lora_options):
    """Save a PEFT LoRA with random A and B on ``model`` and return the plain model again."""
    options = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "init_lora_weights": False,
    }
    options.update(lora_options)
    torch.manual_seed(3)
    peft_model = get_peft_model(model, LoraConfig(**options))
    peft_model.save_pretrained(str(folder))
    return peft_model


def test_kernel_delta_matches_peft(tmp_path, byte_tokenizer):
    model = build_tiny_llama(len(byte_tokenizer))
    peft_model = save_random_adapter(model, tmp_path / "adapter")
    adapter = load_adapter(tmp_path / "adapter")
    assert len(adapter.kernels) == 2 * 4
    site = Site(layer=2, module="self_attn.q_proj")
    lora_module = peft_model.base_model.model.get_submodule(site.name)
    x = torch.randn(3, 32)
    with torch.no_grad():
        expected = lora_module(x) - lora_module.base_layer(x)
    assert torch.allclose(adapter.kernels[site].delta(x), expected, atol=1e-5)
    assert adapter.kernels[site].scale == pytest.approx(2.0)


def test_rslora_scale(tmp_path, byte_tokenizer):
    model = build_tiny_llama(len(byte_tokenizer))
    save_random_adapter(model, tmp_path / "adapter", use_rslora=True)
    adapter = load_adapter(tmp_path / "adapter")
    kernel = next(iter(adapter.kernels.values()))
    assert kernel.scale == pytest.approx(8 / math.sqrt(4))


def test_adapter_for_other_base_model_is_rejected(tmp_path, byte_tokenizer):
    other = build_tiny_llama(len(byte_tokenizer))
    other_config = other.config
    other_config.hidden_size = 16
    from transformers import LlamaForCausalLM

    save_random_adapter(LlamaForCausalLM(other_config), tmp_path / "adapter")
    adapter = load_adapter(tmp_path / "adapter")
    source = build_tiny_llama(len(byte_tokenizer))
    with pytest.raises(ValueError, match=r"shape mismatch at model\.layers\.0\.self_attn\.q_proj"):
        validate_adapter(adapter, source)
    with pytest.raises(ValueError, match="trained for another base model"):
        validate_adapter(adapter, source)


def test_adapter_on_missing_module_is_rejected(tmp_path, byte_tokenizer):
    save_random_adapter(build_tiny_llama(len(byte_tokenizer), layers=6), tmp_path / "adapter")
    adapter = load_adapter(tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"model\.layers\.4\.self_attn\..*not found"):
        validate_adapter(adapter, build_tiny_llama(len(byte_tokenizer), layers=4))


def test_pickle_weights_are_refused_without_opt_in(tmp_path, byte_tokenizer):
    folder = tmp_path / "adapter"
    save_random_adapter(build_tiny_llama(len(byte_tokenizer)), folder)
    from safetensors.torch import load_file

    weights = load_file(str(folder / "adapter_model.safetensors"))
    (folder / "adapter_model.safetensors").unlink()
    torch.save(weights, folder / "adapter_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        load_adapter(folder)
    assert len(load_adapter(folder, allow_pickle=True).kernels) == 8


def test_missing_and_corrupt_files(tmp_path, byte_tokenizer):
    folder = tmp_path / "adapter"
    save_random_adapter(build_tiny_llama(len(byte_tokenizer)), folder)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_adapter(folder)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(folder)


def test_non_lora_and_dora_are_rejected(tmp_path, byte_tokenizer):
    folder = tmp_path / "adapter"
    save_random_adapter(build_tiny_llama(len(byte_tokenizer)), folder)
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="DoRA"):
        load_adapter(folder)
    config_path.write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="'IA3'"):
        load_adapter(folder)


def _peft_delta(peft_model, site: Site, x: torch.Tensor) -> torch.Tensor:
    module = peft_model.base_model.model.get_submodule(site.module_name)
    with torch.no_grad():
        return module(x) - module.base_layer(x)


def test_conv1d_kernel_delta_matches_peft(tmp_path):
    peft_model = save_random_adapter(
        build_tiny_family("gpt2", 600), tmp_path / "adapter", target_modules=["c_attn", "c_fc"]
    )
    adapter = load_adapter(tmp_path / "adapter")
    site = Site(1, "attn.c_attn", "transformer.h")
    x = torch.randn(3, 32)
    assert torch.allclose(
        adapter.kernels[site].delta(x), _peft_delta(peft_model, site, x), atol=1e-5
    )
    assert adapter.kernels[site].B.shape == (96, 4)
    validate_adapter(adapter, peft_model.unload())


def test_rslora_with_patterns_matches_peft(tmp_path, byte_tokenizer):
    peft_model = save_random_adapter(
        build_tiny_llama(len(byte_tokenizer)),
        tmp_path / "adapter",
        use_rslora=True,
        rank_pattern={"q_proj": 2},
        alpha_pattern={r"layers\.1\.self_attn\.v_proj": 3, "v_proj": 5},
    )
    adapter = load_adapter(tmp_path / "adapter")
    x = torch.randn(3, 32)
    for site, kernel in adapter.kernels.items():
        assert torch.allclose(kernel.delta(x), _peft_delta(peft_model, site, x), atol=1e-5), site
    assert adapter.kernels[Site(0, "self_attn.q_proj")].scale == pytest.approx(8 / math.sqrt(2))
    assert adapter.kernels[Site(1, "self_attn.v_proj")].scale == pytest.approx(3 / 2)
    assert adapter.kernels[Site(2, "self_attn.v_proj")].scale == pytest.approx(5 / 2)


@pytest.mark.parametrize(
    "config",
    [
        LoHaConfig(target_modules=["q_proj"]),
        LoKrConfig(target_modules=["q_proj"]),
        IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    ],
    ids=lambda config: config.peft_type.value,
)
def test_other_peft_types_are_rejected(tmp_path, byte_tokenizer, config):
    model = get_peft_model(build_tiny_llama(len(byte_tokenizer)), config)
    model.save_pretrained(str(tmp_path / "adapter"))
    message = f"peft_type is '{config.peft_type.value}', which is not supported; loracast carries"
    with pytest.raises(ValueError, match=message):
        load_adapter(tmp_path / "adapter")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"use_dora": True}, "use_dora is True, which makes the adapter DoRA"),
        ({"lora_bias": True}, "lora_bias is True, which makes the adapter a bias on lora_B"),
    ],
)
def test_lora_variants_are_rejected(tmp_path, byte_tokenizer, options, message):
    save_random_adapter(build_tiny_llama(len(byte_tokenizer)), tmp_path / "adapter", **options)
    with pytest.raises(ValueError, match=message):
        load_adapter(tmp_path / "adapter")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"alora_invocation_tokens": [5, 6]}, "activated LoRA"),
        ({"init_lora_weights": "pissa_niter_4"}, "path_initial_model_for_weight_conversion"),
        ({"peft_type": None}, "peft_type is None"),
    ],
)
def test_edited_configs_are_rejected(tmp_path, byte_tokenizer, edit, message):
    folder = tmp_path / "adapter"
    save_random_adapter(build_tiny_llama(len(byte_tokenizer)), folder)
    config_path = folder / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **edit}))
    with pytest.raises(ValueError, match=message):
        load_adapter(folder)


def test_lora_outside_decoder_layers_is_named(tmp_path, byte_tokenizer):
    model = build_tiny_llama(len(byte_tokenizer))
    save_random_adapter(model, tmp_path / "head", target_modules=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="'lm_head' is not inside a decoder layer"):
        load_adapter(tmp_path / "head")
    model = build_tiny_llama(len(byte_tokenizer))
    save_random_adapter(model, tmp_path / "embedding", target_modules=["embed_tokens"])
    with pytest.raises(ValueError, match="LoRA on the embedding 'model.embed_tokens'"):
        load_adapter(tmp_path / "embedding")


def test_trained_biases_are_reported(tmp_path, caplog):
    model = build_tiny_family("qwen2", 600)
    save_random_adapter(model, tmp_path / "adapter", target_modules=["q_proj"], bias="lora_only")
    with caplog.at_level(logging.WARNING, logger="loracast.adapters"):
        adapter = load_adapter(tmp_path / "adapter")
    expected = [f"model.layers.{layer}.self_attn.q_proj.bias" for layer in range(2)]
    assert adapter.not_carried == expected
    assert f"are not carried, only the LoRA weights are: {', '.join(expected)}" in caplog.text
    assert len(adapter.kernels) == 2
