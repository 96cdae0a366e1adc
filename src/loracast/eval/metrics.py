"""Benchmark metrics on per-example scores: gain recovered, retained score, flips, intervals.

The three scores compared are the target base model (``target_base``), the target with the
carried adapter (``transferred``) and the target with a LoRA retrained on the task
(``retrained``). All functions use numpy in float64. Scores may be Python numbers, sequences,
numpy arrays or torch tensors (moved to the CPU). A sequence of per-example scores is reduced to
its mean, or to its weighted mean when ``weights`` is given, before a ratio is taken, so a ratio
is always a ratio of means and never a mean of per-example ratios.

For a loss such as bits per byte (``higher_is_better=False``):

- gain recovered is ``(base - transferred) / (base - retrained)``, the share of the loss reduction
  that the retrained adapter achieves which the transferred one also achieves. This equals
  ``(transferred - base) / (retrained - base)``, so the value does not depend on the direction.
- retained is ``retrained / transferred``, so that, as for a score, 1.0 means the transferred
  adapter matches the retrained one and a value above 1.0 means it does better.

Corpus bits per byte is ``sum(bits) / sum(bytes)``, the mean of the per-text bits per byte
weighted by bytes. Pass ``weights=result.bytes`` together with ``result.per_text`` (from
``loracast.eval.language_modeling.LanguageModelingResult``) to reproduce it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

STATISTICS = ("gain_recovered", "retained")

# A denominator whose magnitude is at most this fraction of the scores' scale counts as zero.
_RELATIVE_ZERO = 1e-9
# The bootstrap draws at most this many indices (replicates x examples) per chunk.
_MAX_CHUNK_INDICES = 1 << 22


def _to_array(name: str, values: Any) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"{name} must be a number or a sequence of numbers, got {type(values).__name__}: "
            f"{error}"
        ) from error
    if array.ndim > 1:
        raise ValueError(
            f"{name} must be a number or a 1-D sequence of per-example scores, got shape "
            f"{array.shape}; flatten it or pass one score per example"
        )
    if array.size == 0:
        raise ValueError(f"{name} is empty; pass at least one score")
    return array


def _per_example(name: str, values: Any) -> np.ndarray:
    """Convert per-example scores to a 1-D float64 array of finite values."""
    array = np.atleast_1d(_to_array(name, values))
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValueError(
            f"{name} contains a non-finite value ({array[bad[0]]}) at index {int(bad[0])}; "
            "per-example scores must be finite numbers"
        )
    return array


def _check_weights(weights: Any, n_examples: int) -> np.ndarray | None:
    if weights is None:
        return None
    array = _per_example("weights", weights)
    if array.size != n_examples:
        raise ValueError(
            f"weights has {array.size} values but there are {n_examples} examples; pass one "
            "weight per example"
        )
    if np.any(array < 0) or array.sum() <= 0:
        raise ValueError(
            "weights must be non-negative with a positive sum, such as the byte counts of "
            f"LanguageModelingResult.bytes; got min {array.min()} and sum {array.sum()}"
        )
    return array


def _reduce(name: str, values: Any, weights: Any = None) -> float:
    """Reduce a score or per-example scores to one number: the (weighted) mean."""
    array = _to_array(name, values)
    if array.ndim == 0:
        if weights is not None:
            raise ValueError(f"weights were given but {name} is a single number; omit weights")
        if not np.isfinite(array):
            raise ValueError(f"{name} is {float(array)}; pass a finite score")
        return float(array)
    array = _per_example(name, array)
    checked = _check_weights(weights, array.size)
    if checked is None:
        return float(array.mean())
    return float(np.average(array, weights=checked))


def _is_zero(denominator: np.ndarray, *scores: np.ndarray) -> np.ndarray:
    scale = np.maximum.reduce([np.abs(score) for score in scores] + [np.ones_like(denominator)])
    return np.abs(denominator) <= _RELATIVE_ZERO * scale


def _gain_recovered_values(
    transferred: np.ndarray, target_base: np.ndarray, retrained: np.ndarray
) -> np.ndarray:
    # (base - transferred) / (base - retrained) for a loss is the same number, so one formula
    # serves both directions.
    denominator = retrained - target_base
    zero = _is_zero(denominator, retrained, target_base)
    safe = np.where(zero, 1.0, denominator)
    return np.where(zero, np.nan, (transferred - target_base) / safe)


def _retained_values(
    transferred: np.ndarray, retrained: np.ndarray, higher_is_better: bool
) -> np.ndarray:
    numerator, denominator = (
        (transferred, retrained) if higher_is_better else (retrained, transferred)
    )
    zero = _is_zero(denominator, denominator)
    safe = np.where(zero, 1.0, denominator)
    return np.where(zero, np.nan, numerator / safe)


def _check_direction(higher_is_better: object) -> None:
    if not isinstance(higher_is_better, bool):
        raise TypeError(
            f"higher_is_better must be True (accuracy) or False (a loss such as bits per byte), "
            f"got {higher_is_better!r}"
        )


def gain_recovered(
    transferred: Any,
    target_base: Any,
    retrained: Any,
    *,
    higher_is_better: bool = True,
    weights: Any = None,
) -> float:
    """Compute the share of the retrained adapter's gain over the base that the transfer reaches.

    ``(transferred - target_base) / (retrained - target_base)``: 1.0 means the transferred adapter
    matches the retrained one, 0.0 means it is no better than the base model, and a negative
    value means it is worse than the base. For a loss the value is
    ``(base - transferred) / (base - retrained)``, which is the same number.

    Args:
        transferred: the target with the carried adapter, as one score or per-example scores.
        target_base: the target base model, in the same form.
        retrained: the target with a LoRA retrained on the task, in the same form.
        higher_is_better: False for a loss such as bits per byte. It does not change the value
            and is accepted so that calls read the same as ``retained``.
        weights: per-example weights for the means, such as byte counts for bits per byte.

    Returns:
        The gain recovered, or nan (with a logged warning) when the retrained score equals the
        base score, because then there is no gain to recover.

    Raises:
        ValueError: a sequence is empty, not 1-D, or contains a non-finite value, or the
            weights do not match the examples.
        TypeError: a score is not numeric or ``higher_is_better`` is not a bool.
    """
    _check_direction(higher_is_better)
    values = [
        _reduce(name, score, weights)
        for name, score in (
            ("transferred", transferred),
            ("target_base", target_base),
            ("retrained", retrained),
        )
    ]
    result = float(_gain_recovered_values(*(np.float64(value) for value in values)))
    if math.isnan(result):
        logger.warning(
            "gain recovered is undefined: retrained (%r) equals target_base (%r), so there is no "
            "gain to recover; returning nan",
            values[2],
            values[1],
        )
    return result


def retained(
    transferred: Any,
    retrained: Any,
    *,
    higher_is_better: bool = True,
    weights: Any = None,
) -> float:
    """Compute the transferred adapter's score relative to the retrained adapter's score.

    For a score (``higher_is_better=True``) this is ``transferred / retrained``, and for a loss it
    is ``retrained / transferred``. In both cases 1.0 means the two match and a value above 1.0
    means the transferred adapter does better.

    Args:
        transferred: the target with the carried adapter, as one score or per-example scores.
        retrained: the target with a LoRA retrained on the task, in the same form.
        higher_is_better: False for a loss such as bits per byte.
        weights: per-example weights for the means, such as byte counts for bits per byte.

    Returns:
        The ratio, or nan (with a logged warning) when its denominator is zero.

    Raises:
        ValueError: a sequence is empty, not 1-D, or contains a non-finite value, or the
            weights do not match the examples.
        TypeError: a score is not numeric or ``higher_is_better`` is not a bool.
    """
    _check_direction(higher_is_better)
    transferred_value = _reduce("transferred", transferred, weights)
    retrained_value = _reduce("retrained", retrained, weights)
    result = float(
        _retained_values(
            np.float64(transferred_value), np.float64(retrained_value), higher_is_better
        )
    )
    if math.isnan(result):
        name = "retrained" if higher_is_better else "transferred"
        logger.warning("retained is undefined: %s is zero; returning nan", name)
    return result


def negative_flips(base_correct: Sequence[Any], other_correct: Sequence[Any]) -> int:
    """Count examples that the base model gets right and the other model gets wrong.

    Args:
        base_correct: whether the base model is correct on each example (bools or 0/1).
        other_correct: the same for the other model (for example the transferred adapter), in
            the same example order.

    Returns:
        The number of examples where ``base_correct`` is true and ``other_correct`` is false.

    Raises:
        ValueError: the sequences differ in length or contain a value other than 0/1.
    """
    base = _correctness("base_correct", base_correct)
    other = _correctness("other_correct", other_correct)
    if base.size != other.size:
        raise ValueError(
            f"base_correct has {base.size} values but other_correct has {other.size}; pass one "
            "value per example for the same examples"
        )
    return int(np.count_nonzero(base & ~other))


def _correctness(name: str, values: Sequence[Any]) -> np.ndarray:
    array = np.atleast_1d(_to_array(name, values))
    invalid = np.flatnonzero((array != 0) & (array != 1))
    if invalid.size:
        raise ValueError(
            f"{name} must contain only booleans or 0/1, got {array[invalid[0]]} at index "
            f"{int(invalid[0])}"
        )
    return array.astype(bool)


def _check_bootstrap_options(n_resamples: object, alpha: object, seed: object) -> None:
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise ValueError(f"alpha must be a number between 0 and 1 (0.05 for 95%), got {alpha!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")


def _resampled_means(
    arrays: Sequence[np.ndarray], weights: np.ndarray | None, n_resamples: int, seed: int
) -> list[np.ndarray]:
    """Return the mean of each array for each replicate, all replicates sharing their indices."""
    n_examples = arrays[0].size
    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_CHUNK_INDICES // n_examples)
    means: list[list[np.ndarray]] = [[] for _ in arrays]
    for start in range(0, n_resamples, chunk):
        # (replicates, examples): one row of example indices per replicate, used for every array.
        indices = rng.integers(0, n_examples, size=(min(chunk, n_resamples - start), n_examples))
        row_weights = None if weights is None else weights[indices]
        for array, collected in zip(arrays, means, strict=True):
            if row_weights is None:
                collected.append(array[indices].mean(axis=1))
            else:
                # A replicate of only zero-weight examples has no mean, so it is nan and dropped.
                totals = row_weights.sum(axis=1)
                sums = (array[indices] * row_weights).sum(axis=1)
                collected.append(
                    np.divide(sums, totals, out=np.full_like(sums, np.nan), where=totals > 0)
                )
    return [np.concatenate(collected) for collected in means]


def _percentile_interval(replicates: np.ndarray, alpha: float, label: str) -> tuple[float, float]:
    finite = replicates[~np.isnan(replicates)]
    dropped = replicates.size - finite.size
    if finite.size == 0:
        logger.warning("%s is undefined in all %d bootstrap replicates", label, replicates.size)
        return (math.nan, math.nan)
    if dropped:
        # NOTE: the interval then covers only resamples where the statistic is defined, so it
        # understates the uncertainty when many replicates are dropped.
        logger.warning(
            "%s is undefined in %d of %d bootstrap replicates; the interval uses the other %d",
            label,
            dropped,
            replicates.size,
            finite.size,
        )
    low, high = np.quantile(finite, [alpha / 2, 1 - alpha / 2])
    return (float(low), float(high))


def bootstrap_ci(
    per_example_transferred: Any,
    per_example_base: Any,
    per_example_retrained: Any,
    *,
    statistic: str = "gain_recovered",
    higher_is_better: bool = True,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    weights: Any = None,
) -> tuple[float, float]:
    """Compute a paired percentile bootstrap interval for gain recovered or retained.

    Each replicate draws example indices with replacement once and applies them to all three
    arrays (and to ``weights``), so the interval reflects which examples were drawn and not
    independent noise in each model's scores. The statistic is computed from the replicate's
    means, as ``gain_recovered`` and ``retained`` do. The interval is the ``alpha / 2`` and
    ``1 - alpha / 2`` quantiles (numpy's linear method) of the replicate statistics. Replicates
    where the statistic is undefined (a zero denominator) are dropped with a logged warning.

    Args:
        per_example_transferred: per-example scores of the target with the carried adapter.
        per_example_base: per-example scores of the target base model, same examples and order.
        per_example_retrained: per-example scores of the target with a retrained LoRA.
        statistic: ``"gain_recovered"`` or ``"retained"``.
        higher_is_better: False for a loss such as bits per byte.
        n_resamples: the number of bootstrap replicates.
        seed: the seed of the numpy generator, so the same inputs and seed give the same interval.
        alpha: one minus the coverage, 0.05 for a 95% interval.
        weights: per-example weights for the means, such as byte counts for bits per byte.

    Returns:
        ``(low, high)``, or ``(nan, nan)`` when the statistic is undefined in every replicate.

    Raises:
        ValueError: the arrays are empty, differ in length or contain non-finite values, the
            statistic is unknown, or an option is out of range.
        TypeError: ``higher_is_better`` is not a bool.
    """
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    _check_direction(higher_is_better)
    _check_bootstrap_options(n_resamples, alpha, seed)
    named = {
        "per_example_transferred": per_example_transferred,
        "per_example_base": per_example_base,
        "per_example_retrained": per_example_retrained,
    }
    arrays = [_per_example(name, values) for name, values in named.items()]
    sizes = {name: array.size for name, array in zip(named, arrays, strict=True)}
    if len(set(sizes.values())) > 1:
        raise ValueError(
            f"the per-example arrays differ in length ({sizes}); a paired bootstrap needs the "
            "scores of all three models on the same examples in the same order"
        )
    checked_weights = _check_weights(weights, arrays[0].size)

    transferred, base, retrained_means = _resampled_means(
        arrays, checked_weights, n_resamples, seed
    )
    if statistic == "gain_recovered":
        replicates = _gain_recovered_values(transferred, base, retrained_means)
    else:
        replicates = _retained_values(transferred, retrained_means, higher_is_better)
    return _percentile_interval(replicates, alpha, statistic)


def bootstrap_mean_ci(
    values: Any,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    weights: Any = None,
) -> tuple[float, float]:
    """Compute a percentile bootstrap interval for the mean of per-example scores.

    Args:
        values: per-example scores, such as correctness as 0/1 (for accuracy) or per-text bits
            per byte.
        n_resamples: the number of bootstrap replicates.
        seed: the seed of the numpy generator.
        alpha: one minus the coverage, 0.05 for a 95% interval.
        weights: per-example weights, such as byte counts for corpus bits per byte.

    Returns:
        ``(low, high)``: the ``alpha / 2`` and ``1 - alpha / 2`` quantiles of the replicate means.

    Raises:
        ValueError: ``values`` is empty or contains a non-finite value, or an option is out of
            range.
    """
    _check_bootstrap_options(n_resamples, alpha, seed)
    array = _per_example("values", values)
    checked_weights = _check_weights(weights, array.size)
    (means,) = _resampled_means([array], checked_weights, n_resamples, seed)
    return _percentile_interval(means, alpha, "mean")


def seed_summary(values: Any) -> dict[str, float | int]:
    """Summarize one score measured over several seeds.

    Args:
        values: one score per seed. A nan (such as an undefined gain recovered) propagates into
            mean, std, min and max.

    Returns:
        ``{"mean", "std", "min", "max", "n"}``, where ``std`` is the sample standard deviation
        (``ddof=1``), nan for a single seed.

    Raises:
        ValueError: ``values`` is empty or not 1-D.
    """
    array = np.atleast_1d(_to_array("values", values))
    n = int(array.size)
    return {
        "mean": float(array.mean()),
        "std": float(array.std(ddof=1)) if n > 1 else math.nan,
        "min": float(array.min()),
        "max": float(array.max()),
        "n": n,
    }
