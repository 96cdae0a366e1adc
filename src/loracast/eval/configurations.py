"""Evaluate a task on the four configurations of a transfer, side by side.

The configurations are: source base, source + adapter (PEFT, native), target base and
target + cartridge. Each row records its score, wall time and the negative flips against the
base model of the same side.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from peft import PeftModel

from loracast.eval.sentiment import SentimentResult, evaluate_sentiment

logger = logging.getLogger(__name__)


@dataclass
class Row:
    """One configuration's result."""

    name: str
    accuracy: float
    negative_flips: int | None
    seconds: float
    result: SentimentResult


def _flips(base: SentimentResult, other: SentimentResult) -> int:
    return sum(1 for was, now in zip(base.correct, other.correct, strict=True) if was and not now)


def _timed(name, run, base=None) -> Row:
    started = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - started
    flips = _flips(base.result, result) if base is not None else None
    logger.info("%s: accuracy %.3f (%.1f s)", name, result.accuracy, seconds)
    return Row(
        name=name, accuracy=result.accuracy, negative_flips=flips, seconds=seconds, result=result
    )


def evaluate_with_adapter(loaded, adapter_path, examples, *, show_progress: bool = True):
    """Evaluate ``loaded`` with a PEFT adapter applied, then restore the plain base model."""
    peft_model = PeftModel.from_pretrained(loaded.model, str(adapter_path))
    peft_model.eval()
    try:
        return evaluate_sentiment(
            peft_model, loaded.tokenizer, examples, show_progress=show_progress
        )
    finally:
        loaded.model = peft_model.unload()


def evaluate_configurations(
    source,
    target,
    adapter_path,
    cartridge,
    examples,
    *,
    show_progress: bool = True,
) -> list[Row]:
    """Evaluate tweet sentiment on source base, source + adapter, target base, target + cartridge.

    Args:
        source, target: ``LoadedModel`` objects (``source`` may be None to skip its rows).
        adapter_path: the PEFT adapter trained on the source.
        cartridge: the carried adapter (None skips its row).
        examples: held-out ``ClassificationExample`` items.
        show_progress: show progress bars.

    Returns:
        The rows, in the order above.
    """
    rows = []
    if source is not None:
        source_base = _timed(
            "source base",
            lambda: evaluate_sentiment(
                source.model, source.tokenizer, examples, show_progress=show_progress
            ),
        )
        rows.append(source_base)
        if adapter_path is not None:
            rows.append(
                _timed(
                    "source + adapter",
                    lambda: evaluate_with_adapter(
                        source, adapter_path, examples, show_progress=show_progress
                    ),
                    source_base,
                )
            )
    target_base = _timed(
        "target base",
        lambda: evaluate_sentiment(
            target.model, target.tokenizer, examples, show_progress=show_progress
        ),
    )
    rows.append(target_base)
    if cartridge is not None:

        def run_cartridge():
            with cartridge.attached(target):
                return evaluate_sentiment(
                    target.model, target.tokenizer, examples, show_progress=show_progress
                )

        rows.append(_timed("target + cartridge", run_cartridge, target_base))
    return rows


def format_rows(rows: list[Row]) -> str:
    """Format rows as a plain-text table."""
    lines = [f"{'configuration':<22} {'accuracy':>9} {'neg. flips':>11} {'seconds':>8}"]
    for row in rows:
        flips = "" if row.negative_flips is None else str(row.negative_flips)
        lines.append(f"{row.name:<22} {row.accuracy:>9.3f} {flips:>11} {row.seconds:>8.1f}")
    return "\n".join(lines)
