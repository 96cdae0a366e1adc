"""Shared fixtures: tiny tokenizers and tiny randomly initialised models built in the test run."""

from __future__ import annotations

import pytest
import torch
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from loracast.models import LoadedModel

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Markets rallied on Tuesday as investors cheered strong earnings from banks.",
    "She scored 3 goals in 90 minutes, a club record since 1998!",
    "Rain, wind and snow: the forecast for the weekend looks grim.",
    "Ministers said the new law would cut costs by 12% over five years.",
    "A small café in Zürich serves crêpes and naïve jazz every night.",
    "Numbers like 42, 3.14 and 1,000,000 appear in many articles.",
    "Why? Because tokenizers split words, digits and punctuation differently...",
] * 20


def _wrap(tokenizer: Tokenizer, **special) -> PreTrainedTokenizerFast:
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special)
    wrapped.padding_side = "right"
    return wrapped


def build_byte_level_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE with no BOS (like SmolLM2)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer)
    return _wrap(tokenizer, eos_token="<|endoftext|>", pad_token="<pad>")


def build_metaspace_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE with byte fallback that adds a BOS (like Gemma)."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Metaspace(replacement="▁", prepend_scheme="never"), decoders.ByteFallback()]
    )
    byte_tokens = [f"<0x{value:02X}>" for value in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + len(byte_tokens),
        special_tokens=["<pad>", "<eos>", "<bos>", "<unk>", *byte_tokens],
    )
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tokenizer.token_to_id("<bos>"))]
    )
    return _wrap(
        tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def build_tiny_llama(vocab_size: int, seed: int = 0, layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


def build_tiny_gemma3(vocab_size: int, seed: int = 1, layers: int = 3) -> Gemma3ForCausalLM:
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=256,
        sliding_window=16,
    )
    return Gemma3ForCausalLM(config).eval()


# Widths shared by most tiny families: hidden 32, 4 query heads, 2 key-value heads.
_ATTENTION = {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64}
_GQA = {**_ATTENTION, "num_key_value_heads": 2}
_TOKENS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}

# name → (model_type, config options) for every family in loracast.architectures.FAMILIES;
# Falcon appears three times, once per layout of its fused query_key_value projection.
TINY_FAMILIES = {
    "llama": ("llama", _GQA),
    "mistral": ("mistral", {**_GQA, "sliding_window": 16}),
    "qwen2": ("qwen2", _GQA),
    "qwen3": ("qwen3", {**_GQA, "head_dim": 8}),
    "gemma": ("gemma", {**_GQA, "num_key_value_heads": 1, "head_dim": 8}),
    "gemma2": ("gemma2", {**_GQA, "head_dim": 8, "sliding_window": 16}),
    "gemma3_text": ("gemma3_text", {**_GQA, "hidden_size": 48, "head_dim": 12}),
    "phi3": ("phi3", _GQA),
    "phi": ("phi", {**_ATTENTION, "partial_rotary_factor": 0.5}),
    "gpt2": ("gpt2", {"n_embd": 32, "n_head": 4, "n_positions": 256}),
    "gpt_neox": ("gpt_neox", _ATTENTION),
    "opt": ("opt", {"hidden_size": 32, "num_attention_heads": 4, "ffn_dim": 64}),
    "falcon": ("falcon", {"hidden_size": 32, "num_attention_heads": 4}),
    "falcon_new": (
        "falcon",
        {
            "hidden_size": 32,
            "num_attention_heads": 4,
            "num_kv_heads": 2,
            "new_decoder_architecture": True,
        },
    ),
    "falcon_classic": (
        "falcon",
        {"hidden_size": 32, "num_attention_heads": 4, "multi_query": False},
    ),
}


def build_tiny_family(name: str, vocab_size: int, seed: int = 0, layers: int = 2):
    """Build a tiny random causal LM of one ``TINY_FAMILIES`` entry, in eval mode."""
    model_type, options = TINY_FAMILIES[name]
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        num_hidden_layers=layers,
        max_position_embeddings=256,
        **_TOKENS,
        **options,
    )
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="session")
def byte_tokenizer():
    return build_byte_level_tokenizer()


@pytest.fixture(scope="session")
def metaspace_tokenizer():
    return build_metaspace_tokenizer()


@pytest.fixture()
def tiny_source(byte_tokenizer) -> LoadedModel:
    model = build_tiny_llama(len(byte_tokenizer))
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=byte_tokenizer, name="tiny-llama")


@pytest.fixture()
def tiny_target(metaspace_tokenizer) -> LoadedModel:
    model = build_tiny_gemma3(len(metaspace_tokenizer))
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=metaspace_tokenizer, name="tiny-gemma3")


@pytest.fixture(scope="session")
def tiny_corpus() -> list[str]:
    return [text + " " + TRAINING_TEXT[(i + 3) % 8] for i, text in enumerate(TRAINING_TEXT[:40])]
