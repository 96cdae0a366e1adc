"""Evaluate a task on the four configurations of a transfer, side by side.

The configurations are: source base, source + adapter (PEFT, native), target base and
target + cartridge. Each row records its score, wall time and the negative flips against the
base model of the same side (for tasks with right answers).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from peft import PeftModel

from loracast.eval.tasks import EvalTask, TaskScore, sentiment_score

logger = logging.getLogger(__name__)


@dataclass
class Row:
    """One configuration's result.

    Attributes:
        name: the configuration, e.g. ``target + cartridge``.
        score: the task metric (accuracy for sentiment).
        negative_flips: examples right on the same side's base model and wrong here, or None
            for the base rows and for tasks without right answers.
        seconds: wall time of the evaluation.
        correct: whether each example was right, or None for tasks without right answers.
    """

    name: str
    score: float
    negative_flips: int | None
    seconds: float
    correct: list[bool] | None


def _flips(base: Row, other: TaskScore) -> int | None:
    if base.correct is None or other.correct is None:
        return None
    return sum(1 for was, now in zip(base.correct, other.correct, strict=True) if was and not now)


def _timed(name: str, run: Callable[[], TaskScore], base: Row | None = None) -> Row:
    started = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - started
    flips = _flips(base, result) if base is not None else None
    logger.info("%s: score %.4f (%.1f s)", name, result.score, seconds)
    return Row(
        name=name,
        score=result.score,
        negative_flips=flips,
        seconds=seconds,
        correct=result.correct,
    )


def evaluate_with_adapter(loaded, adapter_path, examples, task, *, show_progress: bool = True):
    """Score ``task`` on ``loaded`` with a PEFT adapter applied, then restore the base model."""
    peft_model = PeftModel.from_pretrained(loaded.model, str(adapter_path))
    peft_model.eval()
    try:
        return task.score(peft_model, loaded.tokenizer, examples, show_progress=show_progress)
    finally:
        loaded.model = peft_model.unload()


def evaluate_configurations(
    source,
    target,
    adapter_path,
    cartridge,
    examples,
    *,
    task: EvalTask | None = None,
    show_progress: bool = True,
) -> list[Row]:
    """Score a task on source base, source + adapter, target base and target + cartridge.

    Args:
        source, target: ``LoadedModel`` objects (``source`` may be None to skip its rows).
        adapter_path: the PEFT adapter trained on the source.
        cartridge: the carried adapter (None skips its row).
        examples: held-out examples of ``task``, e.g. ``task.test``.
        task: the task that scores them (``loracast.eval.tasks.load_task``); tweet sentiment
            when None.
        show_progress: show progress bars.

    Returns:
        The rows, in the order above.
    """
    if task is None:
        task = EvalTask("sentiment", "accuracy", True, [], [], sentiment_score)

    def score(loaded):
        return task.score(loaded.model, loaded.tokenizer, examples, show_progress=show_progress)

    rows = []
    if source is not None:
        source_base = _timed("source base", lambda: score(source))
        rows.append(source_base)
        if adapter_path is not None:
            rows.append(
                _timed(
                    "source + adapter",
                    lambda: evaluate_with_adapter(
                        source, adapter_path, examples, task, show_progress=show_progress
                    ),
                    source_base,
                )
            )
    target_base = _timed("target base", lambda: score(target))
    rows.append(target_base)
    if cartridge is not None:

        def run_cartridge():
            with cartridge.attached(target):
                return score(target)

        rows.append(_timed("target + cartridge", run_cartridge, target_base))
    return rows


def format_rows(rows: list[Row], metric: str = "accuracy") -> str:
    """Format rows as a plain-text table with a ``metric`` column."""
    width = max(len(metric), 9)
    lines = [f"{'configuration':<22} {metric:>{width}} {'neg. flips':>11} {'seconds':>8}"]
    for row in rows:
        flips = "" if row.negative_flips is None else str(row.negative_flips)
        lines.append(f"{row.name:<22} {row.score:>{width}.3f} {flips:>11} {row.seconds:>8.1f}")
    return "\n".join(lines)
