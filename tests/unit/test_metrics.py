"""Tests for the benchmark metrics in loracast.eval.metrics."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from loracast.eval.metrics import (
    bootstrap_ci,
    bootstrap_mean_ci,
    gain_recovered,
    negative_flips,
    retained,
    seed_summary,
)


def test_gain_recovered_hand_computed():
    assert gain_recovered(0.7, 0.5, 0.9) == pytest.approx(0.5)
    assert gain_recovered(0.9, 0.5, 0.9) == pytest.approx(1.0)
    assert gain_recovered(0.5, 0.5, 0.9) == pytest.approx(0.0)
    assert gain_recovered(0.4, 0.5, 0.9) == pytest.approx(-0.25)


def test_gain_recovered_uses_means_of_arrays():
    transferred = [1, 0, 1, 1]  # mean 0.75
    base = [0, 0, 1, 0]  # mean 0.25
    retrained = [1, 1, 1, 1]  # mean 1.0
    assert gain_recovered(transferred, base, retrained) == pytest.approx(0.5 / 0.75)


def test_gain_recovered_loss_direction():
    # Bits per byte: base 2.0, retrained 1.5, transferred 1.75 recovers half the reduction.
    value = gain_recovered(1.75, 2.0, 1.5, higher_is_better=False)
    assert value == pytest.approx((2.0 - 1.75) / (2.0 - 1.5))
    assert value == pytest.approx(0.5)
    # A transferred loss above the base is a negative gain.
    assert gain_recovered(2.5, 2.0, 1.5, higher_is_better=False) == pytest.approx(-1.0)


def test_gain_recovered_weighted_matches_corpus_ratio():
    bits = np.array([10.0, 30.0, 5.0])
    byte_counts = np.array([10, 20, 2])
    per_text = bits / byte_counts
    corpus = bits.sum() / byte_counts.sum()
    base = per_text + 1.0
    retrained = per_text - 0.5
    value = gain_recovered(per_text, base, retrained, higher_is_better=False, weights=byte_counts)
    expected = (corpus + 1.0 - corpus) / (corpus + 1.0 - (corpus - 0.5))
    assert value == pytest.approx(expected)


def test_gain_recovered_zero_denominator_is_nan(caplog):
    with caplog.at_level(logging.WARNING, logger="loracast.eval.metrics"):
        value = gain_recovered(0.7, 0.6, 0.6)
    assert math.isnan(value)
    assert "no gain to recover" in caplog.text


def test_gain_recovered_rejects_bad_input():
    with pytest.raises(ValueError, match="non-finite"):
        gain_recovered([0.5, float("nan")], [0.1, 0.2], [0.9, 0.9])
    with pytest.raises(ValueError, match="finite score"):
        gain_recovered(float("nan"), 0.1, 0.9)
    with pytest.raises(ValueError, match="empty"):
        gain_recovered([], 0.1, 0.9)
    with pytest.raises(ValueError, match="1-D"):
        gain_recovered([[0.5]], 0.1, 0.9)
    with pytest.raises(TypeError, match="higher_is_better"):
        gain_recovered(0.5, 0.1, 0.9, higher_is_better="no")
    with pytest.raises(ValueError, match="weights"):
        gain_recovered(0.5, 0.1, 0.9, weights=[1.0])


def test_retained_score_and_loss():
    assert retained(0.6, 0.8) == pytest.approx(0.75)
    assert retained(0.8, 0.8) == pytest.approx(1.0)
    assert retained(1.75, 1.5, higher_is_better=False) == pytest.approx(1.5 / 1.75)
    assert retained(1.5, 1.5, higher_is_better=False) == pytest.approx(1.0)
    # A transferred loss below the retrained loss is better than retraining.
    assert retained(1.2, 1.5, higher_is_better=False) > 1.0


def test_retained_zero_denominator_is_nan(caplog):
    with caplog.at_level(logging.WARNING, logger="loracast.eval.metrics"):
        assert math.isnan(retained(0.5, 0.0))
        assert math.isnan(retained(0.0, 1.5, higher_is_better=False))
    assert caplog.text.count("retained is undefined") == 2


def test_metrics_accept_torch_tensors():
    transferred = torch.tensor([0.7, 0.7])
    assert gain_recovered(transferred, torch.tensor(0.5), [0.9, 0.9]) == pytest.approx(0.5)
    assert retained(transferred, torch.tensor([0.7, 0.7])) == pytest.approx(1.0)


def test_negative_flips_counts_right_to_wrong():
    base = [True, True, False, False, True]
    other = [True, False, True, False, False]
    assert negative_flips(base, other) == 2
    assert negative_flips([1, 0], [1, 1]) == 0
    assert negative_flips(np.array([1, 1]), torch.tensor([0, 0])) == 2


def test_negative_flips_rejects_bad_input():
    with pytest.raises(ValueError, match="same examples"):
        negative_flips([True, False], [True])
    with pytest.raises(ValueError, match="0/1"):
        negative_flips([0.5, 1], [1, 1])


def test_bootstrap_identical_transfer_gives_exactly_one():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2, size=50).astype(float)
    retrained = np.clip(base + rng.integers(0, 2, size=50), 0, 1)
    low, high = bootstrap_ci(retrained.copy(), base, retrained, n_resamples=500)
    assert (low, high) == (1.0, 1.0)


def test_bootstrap_resamples_pairs():
    # Each example's transferred score is halfway between base and retrained, so every paired
    # replicate has a gain recovered of 0.5. Independent resampling would spread the interval.
    rng = np.random.default_rng(2)
    base = rng.normal(size=40)
    retrained = base + rng.uniform(0.5, 1.5, size=40)
    transferred = base + 0.5 * (retrained - base)
    low, high = bootstrap_ci(transferred, base, retrained, n_resamples=300)
    assert low == pytest.approx(0.5)
    assert high == pytest.approx(0.5)


def test_bootstrap_matches_reference_loop():
    rng = np.random.default_rng(3)
    base = rng.normal(size=30)
    retrained = base + 1.0 + rng.normal(scale=0.3, size=30)
    transferred = base + rng.normal(loc=0.6, scale=0.5, size=30)

    # Reference: the same draws, one replicate at a time.
    draws = np.random.default_rng(7).integers(0, 30, size=(200, 30))
    stats = []
    for indices in draws:
        b = base[indices].mean()
        stats.append((transferred[indices].mean() - b) / (retrained[indices].mean() - b))
    expected = np.quantile(stats, [0.05, 0.95])

    low, high = bootstrap_ci(transferred, base, retrained, n_resamples=200, seed=7, alpha=0.1)
    assert low == pytest.approx(expected[0])
    assert high == pytest.approx(expected[1])
    assert low < gain_recovered(transferred, base, retrained) < high


def test_bootstrap_is_deterministic_per_seed():
    rng = np.random.default_rng(4)
    base = rng.normal(size=25)
    retrained = base + 1.0
    transferred = base + rng.normal(loc=0.7, size=25)
    first = bootstrap_ci(transferred, base, retrained, seed=5)
    second = bootstrap_ci(transferred, base, retrained, seed=5)
    other = bootstrap_ci(transferred, base, retrained, seed=6)
    assert first == second
    assert first != other


def test_bootstrap_retained_for_loss():
    retrained = np.array([1.5, 1.6, 1.4, 1.5])
    base = retrained + 0.5
    low, high = bootstrap_ci(
        retrained.copy(), base, retrained, statistic="retained", higher_is_better=False
    )
    assert (low, high) == (1.0, 1.0)


def test_bootstrap_drops_undefined_replicates(caplog):
    # Base and retrained differ on one example only, so replicates without it have no gain.
    base = np.zeros(10)
    retrained = np.zeros(10)
    retrained[0] = 1.0
    transferred = retrained * 0.5
    with caplog.at_level(logging.WARNING, logger="loracast.eval.metrics"):
        low, high = bootstrap_ci(transferred, base, retrained, n_resamples=200)
    assert (low, high) == (pytest.approx(0.5), pytest.approx(0.5))
    assert "undefined in" in caplog.text


def test_bootstrap_all_undefined_is_nan(caplog):
    with caplog.at_level(logging.WARNING, logger="loracast.eval.metrics"):
        low, high = bootstrap_ci([0.5, 0.7], [0.4, 0.6], [0.4, 0.6], n_resamples=50)
    assert math.isnan(low)
    assert math.isnan(high)
    assert "all 50 bootstrap replicates" in caplog.text


def test_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError, match="differ in length"):
        bootstrap_ci([1, 0], [0, 0, 1], [1, 1])
    with pytest.raises(ValueError, match="statistic"):
        bootstrap_ci([1], [0], [1], statistic="accuracy")
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci([1], [0], [1], alpha=1.5)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_ci([1], [0], [1], n_resamples=0)
    with pytest.raises(ValueError, match="seed"):
        bootstrap_ci([1], [0], [1], seed=1.5)
    with pytest.raises(ValueError, match="non-finite"):
        bootstrap_ci([1, float("inf")], [0, 0], [1, 1])


def test_bootstrap_mean_ci_constant_and_weighted():
    assert bootstrap_mean_ci([0.25] * 8) == (0.25, 0.25)

    values = np.random.default_rng(8).normal(size=100)
    low, high = bootstrap_mean_ci(values, seed=3)
    assert low < values.mean() < high
    assert bootstrap_mean_ci(values, seed=3) == (low, high)

    # Weights of zero remove examples from every replicate's mean.
    weighted = bootstrap_mean_ci([1.0, 5.0, 1.0], weights=[1, 0, 1], n_resamples=100)
    assert weighted == (1.0, 1.0)


def test_seed_summary_values():
    summary = seed_summary([1.0, 2.0, 3.0, 4.0])
    assert summary["mean"] == pytest.approx(2.5)
    assert summary["std"] == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert summary["min"] == 1.0
    assert summary["max"] == 4.0
    assert summary["n"] == 4


def test_seed_summary_single_and_nan():
    single = seed_summary([0.8])
    assert single["mean"] == 0.8
    assert math.isnan(single["std"])
    assert single["n"] == 1

    with_nan = seed_summary([0.5, float("nan")])
    assert math.isnan(with_nan["mean"])
    assert with_nan["n"] == 2

    with pytest.raises(ValueError, match="empty"):
        seed_summary([])
