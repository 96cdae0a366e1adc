"""Weight-space baselines: singular-coordinate projection and plain copy into PEFT folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from loracast.adapters import load_adapter
from loracast.architectures import Site
from loracast.baselines import (
    BASELINE_FILE,
    COPY_METHOD,
    WEIGHT_PROJECTION_METHOD,
    WeightProjectionConfig,
    copy_transfer,
    project_delta,
    refactor_low_rank,
    weight_space_transfer,
)
from loracast.models import LoadedModel
from tests.conftest import build_tiny_family, build_tiny_gemma3, build_tiny_llama


def save_source_adapter(model, folder, **lora_options) -> None:
    """Save a PEFT LoRA with random A and B for ``model``, leaving ``model`` without LoRA layers."""
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
    peft_model.unload()


def random_orthogonal(size: int, generator: torch.Generator) -> torch.Tensor:
    matrix = torch.randn(size, size, dtype=torch.float64, generator=generator)
    Q, R = torch.linalg.qr(matrix)
    return Q * torch.sign(torch.diagonal(R))


def numpy_projection(delta, weight_source, weight_target, k) -> np.ndarray:
    """Reference ``U_t,k (U_s,kᵀ ΔW V_s,k) V_t,kᵀ`` with numpy's SVD and the same sign rule."""

    def top(weight):
        U, _, Vh = np.linalg.svd(weight, full_matrices=False)
        U_k, V_k = U[:, :k], Vh[:k].T
        signs = np.sign(U_k[np.abs(U_k).argmax(axis=0), np.arange(k)])
        return U_k * signs, V_k * signs

    U_s, V_s = top(weight_source)
    U_t, V_t = top(weight_target)
    return U_t @ (U_s.T @ delta @ V_s) @ V_t.T


def peft_module_delta(peft_model, name: str, d_in: int) -> torch.Tensor:
    """Return the LoRA update ``ΔW`` of a PEFT-wrapped module, shape ``(d_out, d_in)``."""
    module = peft_model.base_model.model.get_submodule(name)
    identity = torch.eye(d_in)
    with torch.no_grad():
        return (module(identity) - module.base_layer(identity)).T


def test_config_rejects_bad_rank_k():
    with pytest.raises(ValueError, match="rank_k must be at least 1, got 0"):
        WeightProjectionConfig(rank_k=0)
    with pytest.raises(TypeError, match="rank_k must be an int or None"):
        WeightProjectionConfig(rank_k=2.5)
    assert WeightProjectionConfig().rank_k is None


def test_project_delta_identity_full_k():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(12, 12, generator=generator)
    delta = torch.randn(12, 12, generator=generator)
    projected = project_delta(delta, weight, weight, k=12)
    assert projected.shape == (12, 12)
    assert projected.dtype == delta.dtype
    assert torch.allclose(projected, delta, atol=1e-5)


def test_project_delta_orthogonal_reparameterisation():
    # A target weight Q1 · W · Q2ᵀ has singular vectors Q1·u_i and Q2·v_i. An update that is
    # diagonal in the source's singular coordinates is carried to Q1 · ΔW · Q2ᵀ whatever the
    # sign of each singular pair.
    generator = torch.Generator().manual_seed(1)
    weight_source = torch.randn(10, 8, dtype=torch.float64, generator=generator)
    Q1 = random_orthogonal(10, generator)
    Q2 = random_orthogonal(8, generator)
    weight_target = Q1 @ weight_source @ Q2.T
    U, _, Vh = torch.linalg.svd(weight_source, full_matrices=False)
    k = 5
    coordinates = torch.randn(k, dtype=torch.float64, generator=generator)
    delta = U[:, :k] @ torch.diag(coordinates) @ Vh[:k]
    projected = project_delta(delta, weight_source, weight_target, k)
    assert torch.allclose(projected, Q1 @ delta @ Q2.T, atol=1e-10)


def test_project_delta_matches_numpy_reference():
    generator = torch.Generator().manual_seed(2)
    weight_source = torch.randn(16, 12, dtype=torch.float64, generator=generator)
    weight_target = torch.randn(20, 24, dtype=torch.float64, generator=generator)
    delta = torch.randn(16, 12, dtype=torch.float64, generator=generator)
    for k in (1, 6, 12):
        projected = project_delta(delta, weight_source, weight_target, k)
        expected = numpy_projection(delta.numpy(), weight_source.numpy(), weight_target.numpy(), k)
        assert projected.shape == (20, 24)
        assert np.allclose(projected.numpy(), expected, atol=1e-10), f"k={k}"


def test_svd_cache_reuses_same_projection():
    generator = torch.Generator().manual_seed(3)
    weight_source = torch.randn(16, 12, dtype=torch.float64, generator=generator)
    weight_target = torch.randn(20, 24, dtype=torch.float64, generator=generator)
    cache: dict = {}
    for _ in range(2):
        delta = torch.randn(16, 12, dtype=torch.float64, generator=generator)
        cached = project_delta(delta, weight_source, weight_target, 6, svd_cache=cache)
        assert torch.equal(cached, project_delta(delta, weight_source, weight_target, 6))
    assert len(cache) == 2

    # An in-place edit of a weight must not reuse its old singular vectors.
    weight_source.mul_(-1.0)
    edited = project_delta(delta, weight_source, weight_target, 6, svd_cache=cache)
    assert torch.equal(edited, project_delta(delta, weight_source, weight_target, 6))
    assert len(cache) == 3


def test_project_delta_rejects_bad_input():
    weight = torch.randn(6, 4)
    with pytest.raises(ValueError, match="k must be an integer from 1 to 4"):
        project_delta(torch.randn(6, 4), weight, torch.randn(8, 8), k=5)
    with pytest.raises(ValueError, match="k must be an integer from 1 to 4"):
        project_delta(torch.randn(6, 4), weight, torch.randn(8, 8), k=0)
    with pytest.raises(ValueError, match=r"delta_source has shape \(4, 6\)"):
        project_delta(torch.randn(4, 6), weight, torch.randn(8, 8), k=2)
    with pytest.raises(ValueError, match="weight_target must be a 2-D matrix"):
        project_delta(torch.randn(6, 4), weight, torch.randn(8), k=2)


def test_refactor_low_rank_error():
    generator = torch.Generator().manual_seed(4)
    left = torch.randn(9, 3, dtype=torch.float64, generator=generator)
    low_rank = left @ torch.randn(3, 7, dtype=torch.float64, generator=generator)
    A, B, error = refactor_low_rank(low_rank, 3)
    assert A.shape == (3, 7)
    assert B.shape == (9, 3)
    assert error < 1e-10
    assert torch.allclose(B @ A, low_rank, atol=1e-10)
    _, _, truncated_error = refactor_low_rank(low_rank, 2)
    assert truncated_error > 1e-3
    _, _, zero_error = refactor_low_rank(torch.zeros(4, 4), 2)
    assert zero_error == 0.0


def test_weight_space_transfer_loads_in_peft(tmp_path, tiny_source, tiny_target):
    save_source_adapter(tiny_source.model, tmp_path / "adapter")
    target_weights = {name: p.clone() for name, p in tiny_target.model.state_dict().items()}
    inputs = torch.randint(0, 200, (2, 7))
    with torch.no_grad():
        logits_before = tiny_target.model(inputs).logits

    out = weight_space_transfer(
        tiny_source, tiny_target, tmp_path / "adapter", tmp_path / "baseline"
    )

    with torch.no_grad():
        logits_after = tiny_target.model(inputs).logits
    assert torch.equal(logits_before, logits_after)
    state = tiny_target.model.state_dict()
    assert set(state) == set(target_weights)
    for name, tensor in target_weights.items():
        assert torch.equal(state[name], tensor), name

    # Source layers 0..3 map to target layers 0, 1, 1, 2.
    adapter = load_adapter(tmp_path / "adapter")
    expected_deltas = {}
    for layer, source_layers in ((0, [0]), (1, [1, 2]), (2, [3])):
        for module in ("self_attn.q_proj", "self_attn.v_proj"):
            anchor = Site(layer, module)
            weight_target = tiny_target.model.get_submodule(anchor.name).weight
            total = torch.zeros(weight_target.shape, dtype=torch.float64)
            for source_layer in source_layers:
                site = Site(source_layer, module)
                kernel = adapter.kernels[site]
                delta = kernel.scale * (kernel.B.double() @ kernel.A.double())
                weight_source = tiny_source.model.get_submodule(site.name).weight
                k = min(*weight_source.shape, *weight_target.shape)
                total += project_delta(delta, weight_source, weight_target, k)
            expected_deltas[anchor] = total

    record = json.loads((out / BASELINE_FILE).read_text())
    assert record["method"] == WEIGHT_PROJECTION_METHOD
    assert record["source_adapter"] == str((tmp_path / "adapter").resolve())
    assert record["lora_rank"] == 4
    errors = {entry["anchor"]: entry["relative_refactor_error"] for entry in record["anchors"]}
    assert set(errors) == {anchor.name for anchor in expected_deltas}
    # One rank-4 source update per anchor stays rank 4, but the sum of two can exceed rank 4.
    assert errors["model.layers.0.self_attn.q_proj"] < 1e-6
    assert errors["model.layers.1.self_attn.q_proj"] > 1e-6
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-gemma3"

    peft_model = PeftModel.from_pretrained(tiny_target.model, str(out))
    for anchor, expected in expected_deltas.items():
        delta = peft_module_delta(peft_model, anchor.name, expected.shape[1])
        A, B, _ = refactor_low_rank(expected, 4)
        assert torch.allclose(delta.double(), B @ A, atol=1e-5), anchor.name
    untouched = peft_model.base_model.model.get_submodule("model.layers.0.self_attn.k_proj")
    assert not hasattr(untouched, "lora_A")


def test_weight_space_transfer_rank_k(tmp_path, tiny_source, tiny_target):
    save_source_adapter(tiny_source.model, tmp_path / "adapter")
    out = weight_space_transfer(
        tiny_source,
        tiny_target,
        tmp_path / "adapter",
        tmp_path / "baseline",
        config=WeightProjectionConfig(rank_k=24),
    )
    record = json.loads((out / BASELINE_FILE).read_text())
    ks = {entry["anchor"]: entry["k"] for entry in record["anchors"]}
    # q_proj is (32, 32) in the llama and (32, 48) in gemma3. v_proj is (16, 32) and (16, 48).
    assert ks["model.layers.0.self_attn.q_proj"] == [24]
    assert ks["model.layers.0.self_attn.v_proj"] == [16]
    assert record["config"] == {"rank_k": 24}


def test_weight_space_transfer_rejects_existing_folder(tmp_path, tiny_source, tiny_target):
    save_source_adapter(tiny_source.model, tmp_path / "adapter")
    (tmp_path / "baseline").mkdir()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        weight_space_transfer(tiny_source, tiny_target, tmp_path / "adapter", tmp_path / "baseline")
    out = weight_space_transfer(
        tiny_source, tiny_target, tmp_path / "adapter", tmp_path / "baseline", overwrite=True
    )
    assert (out / "adapter_model.safetensors").is_file()
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []


def test_copy_transfer_reproduces_deltas(tmp_path, byte_tokenizer, tiny_source):
    save_source_adapter(tiny_source.model, tmp_path / "adapter")
    other = LoadedModel(
        model=build_tiny_llama(len(byte_tokenizer), seed=5).requires_grad_(False),
        tokenizer=byte_tokenizer,
        name="other-llama",
    )
    out = copy_transfer(tiny_source, other, tmp_path / "adapter", tmp_path / "copy")

    record = json.loads((out / BASELINE_FILE).read_text())
    assert record["method"] == COPY_METHOD
    adapter = load_adapter(tmp_path / "adapter")
    copied = load_adapter(out)
    assert set(copied.kernels) == set(adapter.kernels)
    peft_model = PeftModel.from_pretrained(other.model, str(out))
    for site, kernel in adapter.kernels.items():
        assert torch.equal(copied.kernels[site].A, kernel.A), site.name
        assert torch.equal(copied.kernels[site].B, kernel.B), site.name
        assert copied.kernels[site].scale == pytest.approx(kernel.scale)
        expected = kernel.scale * kernel.B @ kernel.A
        delta = peft_module_delta(peft_model, site.name, expected.shape[1])
        assert torch.allclose(delta, expected, atol=1e-6), site.name


def test_copy_transfer_sums_sites_sharing_anchor(tmp_path, byte_tokenizer, tiny_source):
    save_source_adapter(tiny_source.model, tmp_path / "adapter")
    shallow = LoadedModel(
        model=build_tiny_llama(len(byte_tokenizer), seed=6, layers=2).requires_grad_(False),
        tokenizer=byte_tokenizer,
        name="shallow-llama",
    )
    out = copy_transfer(tiny_source, shallow, tmp_path / "adapter", tmp_path / "copy")

    # Source layers 0..3 map to target layers 0, 0, 1, 1.
    adapter = load_adapter(tmp_path / "adapter")
    copied = load_adapter(out)
    for anchor_layer, source_layers in ((0, (0, 1)), (1, (2, 3))):
        anchor = Site(anchor_layer, "self_attn.q_proj")
        expected = sum(
            adapter.kernels[Site(layer, anchor.module)].scale
            * adapter.kernels[Site(layer, anchor.module)].B
            @ adapter.kernels[Site(layer, anchor.module)].A
            for layer in source_layers
        )
        kernel = copied.kernels[anchor]
        assert kernel.rank == 8
        assert torch.allclose(kernel.scale * kernel.B @ kernel.A, expected, atol=1e-6)


def test_copy_transfer_rejects_other_shapes(tmp_path, tiny_source, tiny_target):
    save_source_adapter(tiny_source.model, tmp_path / "adapter")
    message = (
        r"cannot copy the kernel at model\.layers\.0\.self_attn\.q_proj to "
        r"model\.layers\.0\.self_attn\.q_proj: the source module is \(out=32, in=32\) but the "
        r"target module is \(out=32, in=48\)"
    )
    with pytest.raises(ValueError, match=message):
        copy_transfer(tiny_source, tiny_target, tmp_path / "adapter", tmp_path / "copy")
    assert not (tmp_path / "copy").exists()


def test_copy_transfer_rejects_existing_folder(tmp_path, byte_tokenizer, tiny_source):
    save_source_adapter(tiny_source.model, tmp_path / "adapter")
    (tmp_path / "copy").mkdir()
    other = LoadedModel(
        model=build_tiny_llama(len(byte_tokenizer), seed=5), tokenizer=None, name="other"
    )
    with pytest.raises(FileExistsError, match="output folder .* exists"):
        copy_transfer(tiny_source, other, tmp_path / "adapter", tmp_path / "copy")


def test_weight_space_transfer_between_gemma3_models(tmp_path, metaspace_tokenizer, tiny_target):
    source = LoadedModel(
        model=build_tiny_gemma3(len(metaspace_tokenizer), seed=7).requires_grad_(False),
        tokenizer=metaspace_tokenizer,
        name="other-gemma3",
    )
    save_source_adapter(source.model, tmp_path / "adapter", target_modules=["o_proj"])
    out = weight_space_transfer(source, tiny_target, tmp_path / "adapter", tmp_path / "baseline")
    copied = load_adapter(out)
    assert sorted(site.name for site in copied.kernels) == [
        f"model.layers.{layer}.self_attn.o_proj" for layer in range(3)
    ]


def _family(name: str, tokenizer, seed: int) -> LoadedModel:
    model = build_tiny_family(name, 600, seed=seed).requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, name=f"tiny-{name}")


def test_copy_transfer_into_fused_projections(tmp_path, byte_tokenizer):
    # The tiny Llama and Phi-3 have equal widths per role; Phi-3 fuses q, k, v and gate, up.
    source = _family("llama", byte_tokenizer, seed=0)
    target = _family("phi3", byte_tokenizer, seed=1)
    save_source_adapter(source.model, tmp_path / "adapter", target_modules="all-linear")
    out = copy_transfer(source, target, tmp_path / "adapter", tmp_path / "copy")

    adapter = load_adapter(tmp_path / "adapter")

    def delta(module: str) -> torch.Tensor:
        kernel = adapter.kernels[Site(1, module)]
        return kernel.scale * kernel.B @ kernel.A

    peft_model = PeftModel.from_pretrained(target.model, str(out))
    expected = {
        "self_attn.qkv_proj": torch.cat([delta(f"self_attn.{r}_proj") for r in ("q", "k", "v")]),
        "mlp.gate_up_proj": torch.cat([delta("mlp.gate_proj"), delta("mlp.up_proj")]),
        "self_attn.o_proj": delta("self_attn.o_proj"),
        "mlp.down_proj": delta("mlp.down_proj"),
    }
    for module, update in expected.items():
        found = peft_module_delta(peft_model, f"model.layers.1.{module}", update.shape[1])
        assert torch.allclose(found, update, atol=1e-6), module


def test_weight_space_transfer_from_conv1d(tmp_path, byte_tokenizer):
    source = _family("gpt2", byte_tokenizer, seed=0)
    target = _family("phi3", byte_tokenizer, seed=1)
    save_source_adapter(source.model, tmp_path / "adapter", target_modules=["c_attn"])
    out = weight_space_transfer(source, target, tmp_path / "adapter", tmp_path / "projected")

    kernel = load_adapter(tmp_path / "adapter").kernels[Site(0, "attn.c_attn", "transformer.h")]
    # GPT-2's Conv1D stores (in, out); the projection reads the weight as (out, in).
    weight_source = source.model.get_submodule("transformer.h.0.attn.c_attn").weight.T
    weight_target = target.model.get_submodule("model.layers.0.self_attn.qkv_proj").weight
    source_rows = {"q": slice(0, 32), "k": slice(32, 64), "v": slice(64, 96)}
    target_rows = {"q": slice(0, 32), "k": slice(32, 48), "v": slice(48, 64)}
    expected = torch.zeros(weight_target.shape, dtype=torch.float64)
    for role in ("q", "k", "v"):
        rows_s, rows_t = source_rows[role], target_rows[role]
        update = kernel.scale * kernel.B[rows_s].double() @ kernel.A.double()
        k = min(*weight_source[rows_s].shape, *weight_target[rows_t].shape)
        projected = project_delta(update, weight_source[rows_s], weight_target[rows_t], k)
        A, B, _ = refactor_low_rank(projected, kernel.rank)
        expected[rows_t] = B @ A

    peft_model = PeftModel.from_pretrained(target.model, str(out))
    found = peft_module_delta(peft_model, "model.layers.0.self_attn.qkv_proj", 32)
    assert torch.allclose(found.double(), expected, atol=1e-5)
    record = json.loads((out / BASELINE_FILE).read_text())
    anchors = sorted(entry["anchor"] for entry in record["anchors"][:3])
    assert anchors == [f"model.layers.0.self_attn.qkv_proj:{role}" for role in "kqv"]
