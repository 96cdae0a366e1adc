"""Heads and fitting: ridge recovers linear maps, MLP heads start at their linear solution."""

from __future__ import annotations

import pytest
import torch

from loracast.fit import HeadFitConfig, fit_head, r2_score
from loracast.heads import Head


def _linear_data(n: int, d_in: int, d_out: int, noise: float, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, generator=generator)
    bias = torch.randn(d_out, generator=generator)
    x = torch.randn(n, d_in, generator=generator) * 3 + 1
    y = x @ weight.T + bias + noise * torch.randn(n, d_out, generator=generator)
    return x, y


def test_ridge_recovers_linear_map():
    x, y = _linear_data(600, 12, 7, noise=0.0)
    head, metrics = fit_head(x[:500], y[:500], x[500:], y[500:], HeadFitConfig(mlp_hidden=0))
    assert head.is_linear
    assert metrics["r2"] > 0.999
    assert torch.allclose(head(x[500:]), y[500:], atol=5e-2, rtol=1e-2)


def test_mlp_head_never_below_linear():
    x, y = _linear_data(600, 10, 5, noise=0.1)
    y = y + 0.5 * torch.tanh(x[:, :5])
    linear_config = HeadFitConfig(mlp_hidden=0)
    linear, linear_metrics = fit_head(x[:500], y[:500], x[500:], y[500:], linear_config)
    config = HeadFitConfig(mlp_hidden=32, mlp_steps=150)
    head, metrics = fit_head(x[:500], y[:500], x[500:], y[500:], config)
    assert metrics["r2_linear"] == pytest.approx(linear_metrics["r2"], abs=1e-6)
    assert metrics["r2"] >= metrics["r2_linear"]


def test_fresh_mlp_head_equals_linear_part():
    head = Head(6, 4, mlp_hidden=8)
    x = torch.randn(5, 6)
    expected = head.out_mean + head.out_std * head.linear((x - head.in_mean) / head.in_std)
    assert torch.equal(head(x), expected)


@pytest.mark.parametrize("mlp_hidden", [0, 8])
def test_head_delta_is_output_difference(mlp_hidden):
    torch.manual_seed(0)
    head = Head(6, 4, mlp_hidden=mlp_hidden)
    head.set_standardisation(torch.randn(50, 6) * 2, torch.randn(50, 4) * 3)
    if head.mlp is not None:
        torch.nn.init.normal_(head.mlp[2].weight)
    y, dy = torch.randn(3, 6), torch.randn(3, 6) * 0.1
    assert torch.allclose(head.delta(y, dy), head(y + dy) - head(y), atol=1e-5)


def test_r2_score_of_perfect_and_mean_prediction():
    target = torch.randn(20, 3)
    assert r2_score(target, target) == pytest.approx(1.0)
    assert r2_score(target.mean(0).expand_as(target), target) == pytest.approx(0.0, abs=1e-6)


def test_fit_head_rejects_too_few_samples():
    with pytest.raises(ValueError, match="at least 2"):
        fit_head(
            torch.randn(1, 3),
            torch.randn(1, 2),
            torch.randn(1, 3),
            torch.randn(1, 2),
            HeadFitConfig(),
        )


def test_head_fit_config_rejects_bad_values():
    with pytest.raises(ValueError, match="ridge_alphas"):
        HeadFitConfig(ridge_alphas=(0.0,))
    with pytest.raises(ValueError, match="mlp_lr"):
        HeadFitConfig(mlp_lr=-1.0)
