"""Tests for the LoRA training recipe (loracast.train)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers
from peft import PeftModel
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from loracast.eval.classification import score_choices
from loracast.train import LoraRecipe, _tokenize_examples, train_lora
from tests.conftest import build_tiny_family

WORDS = (
    "tweet sentiment positive negative neutral the flight was late again great crew "
    "awful service love this car never driving it fine ok thanks for nothing happy sad"
).split()

# Four prompts whose completions a tiny model can memorise in a few dozen steps.
MEMORISE = [
    ("Tweet: the flight was late again\nSentiment:", " negative"),
    ("Tweet: love this car\nSentiment:", " positive"),
    ("Tweet: fine ok\nSentiment:", " neutral"),
    ("Tweet: awful service\nSentiment:", " negative"),
]


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Train a small byte-level BPE tokenizer in memory that adds a BOS token."""
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 3
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=350,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def build_model(vocab_size: int, seed: int = 0) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        # With the default 0.02 the frozen LM head spreads logits by well under 1 nat, so no
        # LoRA on attention can make a completion likely. With 0.2 the model can memorise.
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(autouse=True)
def single_thread():
    # Tiny models run fastest on one thread, and several times slower with two threads when
    # another process is busy on the same cores.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def model(tokenizer):
    return build_model(len(tokenizer))


def probe_logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer([prompt + completion for prompt, completion in MEMORISE], padding=True)
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(ids["input_ids"]),
            attention_mask=torch.tensor(ids["attention_mask"]),
        ).logits


def completion_nll(model, tokenizer) -> float:
    """Mean negative log-likelihood of the correct completions, from score_choices."""
    total = 0.0
    for prompt, completion in MEMORISE:
        total -= score_choices(model, tokenizer, [prompt], [completion], show_progress=False).item()
    return total / len(MEMORISE)


FAST = LoraRecipe(epochs=2, batch_size=2, learning_rate=1e-2)


# --- LoraRecipe ------------------------------------------------------------------------------


def test_recipe_defaults():
    recipe = LoraRecipe()

    assert (recipe.r, recipe.lora_alpha, recipe.target_modules) == (8, 16, ("q_proj", "v_proj"))
    assert (recipe.learning_rate, recipe.epochs, recipe.batch_size) == (1e-3, 1, 8)


def test_recipe_dict_round_trip():
    recipe = LoraRecipe(r=4, target_modules=["q_proj", "k_proj"], lora_dropout=0.1)
    values = recipe.to_dict()

    assert values["target_modules"] == ["q_proj", "k_proj"]
    assert json.loads(json.dumps(values)) == values
    assert LoraRecipe.from_dict(values) == recipe
    assert recipe.target_modules == ("q_proj", "k_proj")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("r", 0),
        ("r", 2.0),
        ("lora_alpha", -1),
        ("lora_dropout", 1.0),
        ("lora_dropout", -0.1),
        ("target_modules", "q_proj"),
        ("target_modules", ()),
        ("target_modules", ("q_proj", "")),
        ("learning_rate", 0.0),
        ("learning_rate", float("nan")),
        ("epochs", 0),
        ("batch_size", True),
        ("max_length", 1),
        ("seed", -1),
        ("weight_decay", -0.01),
    ],
)
def test_recipe_rejects_invalid_value(field, value):
    with pytest.raises(ValueError, match=f"{field} must be") as error:
        LoraRecipe(**{field: value})
    assert f"got {value!r}" in str(error.value)


def test_recipe_reports_all_errors_at_once():
    with pytest.raises(ValueError) as error:
        LoraRecipe(r=0, epochs=0, learning_rate=-1.0)

    message = str(error.value)
    assert "r must be an integer >= 1, got 0" in message
    assert "epochs must be an integer >= 1, got 0" in message
    assert "learning_rate must be a positive number, got -1.0" in message


# --- train_lora ------------------------------------------------------------------------------


def test_train_lora_writes_peft_folder(model, tokenizer, tmp_path):
    out = train_lora(
        model,
        tokenizer,
        MEMORISE,
        FAST,
        tmp_path / "adapter",
        base_model_name="tiny-llama",
        show_progress=False,
        metadata={"task": "memorise"},
    )

    assert out == tmp_path / "adapter"
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8
    assert config["lora_alpha"] == 16
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    weights = load_file(out / "adapter_model.safetensors")
    assert any("lora_A" in key for key in weights)
    assert any("lora_B" in key for key in weights)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter"]


def test_train_lora_training_record(model, tokenizer, tmp_path):
    out = train_lora(
        model,
        tokenizer,
        MEMORISE,
        FAST,
        tmp_path / "adapter",
        base_model_name="tiny-llama",
        show_progress=False,
        metadata={"task": "memorise"},
    )
    record = json.loads((out / "training.json").read_text())

    assert record["recipe"] == FAST.to_dict()
    assert record["n_examples"] == 4
    assert record["steps"] == 4  # 2 epochs of 2 batches
    assert record["base_model_name"] == "tiny-llama"
    assert record["metadata"] == {"task": "memorise"}
    assert set(record["versions"]) == {"torch", "transformers", "peft", "loracast"}
    assert record["wall_time_s"] >= 0
    assert record["mean_loss"] > 0


def test_train_lora_adapter_changes_logits(model, tokenizer, tmp_path):
    base_logits = probe_logits(model, tokenizer)
    out = train_lora(model, tokenizer, MEMORISE, FAST, tmp_path / "adapter", show_progress=False)
    adapted = PeftModel.from_pretrained(model, out)
    adapted_logits = probe_logits(adapted, tokenizer)

    assert not torch.allclose(adapted_logits, base_logits, atol=1e-4)


def test_train_lora_lowers_loss(model, tokenizer, tmp_path):
    recipe = LoraRecipe(epochs=30, batch_size=2, learning_rate=1e-2)
    before = completion_nll(model, tokenizer)
    out = train_lora(model, tokenizer, MEMORISE, recipe, tmp_path / "adapter", show_progress=False)
    after = completion_nll(PeftModel.from_pretrained(model, out), tokenizer)
    record = json.loads((out / "training.json").read_text())

    assert after < 0.5 * before
    assert record["final_loss"] < 0.5 * record["first_loss"]


def test_train_lora_leaves_base_model_unchanged(model, tokenizer, tmp_path):
    before = probe_logits(model, tokenizer)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    module_types = {name: type(module) for name, module in model.named_modules()}
    model.train()
    rng_state = torch.get_rng_state()

    train_lora(model, tokenizer, MEMORISE, FAST, tmp_path / "adapter", show_progress=False)

    assert torch.equal(torch.get_rng_state(), rng_state)
    assert model.training
    assert {name: type(module) for name, module in model.named_modules()} == module_types
    assert all(parameter.requires_grad for parameter in model.parameters())
    assert not hasattr(model, "peft_config")
    assert model.state_dict().keys() == state.keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    model.eval()
    assert torch.equal(probe_logits(model, tokenizer), before)


def test_train_lora_deterministic(tokenizer, tmp_path):
    first = train_lora(
        build_model(len(tokenizer)), tokenizer, MEMORISE, FAST, tmp_path / "a", show_progress=False
    )
    second = train_lora(
        build_model(len(tokenizer)), tokenizer, MEMORISE, FAST, tmp_path / "b", show_progress=False
    )
    first_weights = load_file(first / "adapter_model.safetensors")
    second_weights = load_file(second / "adapter_model.safetensors")

    assert first_weights.keys() == second_weights.keys()
    for key, tensor in first_weights.items():
        assert torch.equal(tensor, second_weights[key]), key


def test_train_lora_existing_folder(model, tokenizer, tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "old.txt").write_text("old")

    with pytest.raises(FileExistsError, match="overwrite=True"):
        train_lora(model, tokenizer, MEMORISE, FAST, out, show_progress=False)
    assert (out / "old.txt").is_file()

    train_lora(model, tokenizer, MEMORISE, FAST, out, overwrite=True, show_progress=False)
    assert not (out / "old.txt").exists()
    assert (out / "adapter_model.safetensors").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter"]


def test_train_lora_rejects_bad_input(model, tokenizer, tmp_path):
    out = tmp_path / "adapter"
    with pytest.raises(ValueError, match="examples is empty"):
        train_lora(model, tokenizer, [], FAST, out, show_progress=False)
    with pytest.raises(TypeError, match="example 1 must be a \\(prompt, completion\\) pair"):
        train_lora(model, tokenizer, [MEMORISE[0], ("only prompt",)], FAST, out)
    with pytest.raises(TypeError, match="not JSON serializable"):
        train_lora(model, tokenizer, MEMORISE, FAST, out, metadata={"path": tmp_path})
    assert not out.exists()


def test_train_lora_rejects_peft_model(model, tokenizer, tmp_path):
    adapter = train_lora(model, tokenizer, MEMORISE, FAST, tmp_path / "a", show_progress=False)
    peft_model = PeftModel.from_pretrained(model, adapter)

    with pytest.raises(TypeError, match="PeftModel"):
        train_lora(peft_model, tokenizer, MEMORISE, FAST, tmp_path / "b", show_progress=False)


def test_tokenize_cuts_long_prompts_after_bos(tokenizer, caplog):
    long_prompt = "Tweet: " + " ".join(WORDS * 3) + "\nSentiment:"
    full_prompt = tokenizer(long_prompt)["input_ids"]
    completion = tokenizer(" negative", add_special_tokens=False)["input_ids"]

    with caplog.at_level(logging.WARNING, logger="loracast.train"):
        [(ids, prompt_length)] = _tokenize_examples(tokenizer, [(long_prompt, " negative")], 16)

    assert len(ids) == 16
    assert ids[0] == tokenizer.bos_token_id
    assert ids[1:prompt_length] == full_prompt[-(prompt_length - 1) :]
    assert ids[prompt_length:] == completion
    assert "1 of 1 training examples exceed max_length=16" in caplog.text


def test_tokenize_matches_scoring(tokenizer):
    [(ids, prompt_length)] = _tokenize_examples(tokenizer, [MEMORISE[0]], 128)
    prompt_ids = tokenizer(MEMORISE[0][0])["input_ids"]
    completion_ids = tokenizer(MEMORISE[0][1], add_special_tokens=False)["input_ids"]

    assert ids == prompt_ids + completion_ids
    assert prompt_length == len(prompt_ids)


def test_train_lora_maps_targets_for_gpt2(tokenizer, tmp_path):
    model = build_tiny_family("gpt2", len(tokenizer))

    out = train_lora(model, tokenizer, MEMORISE, FAST, tmp_path / "adapter", show_progress=False)

    config = json.loads((out / "adapter_config.json").read_text())
    weights = load_file(out / "adapter_model.safetensors")
    assert config["target_modules"] == ["attn.c_attn"]
    assert any("c_attn.lora_A" in key for key in weights)
