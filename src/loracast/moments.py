"""Ridge heads from summed second moments, so the data never has to sit in memory at once.

``Moments`` sums a head's samples chunk by chunk about fixed shift points (sums of products of
centred data lose less precision than raw sums). From the sums come the standardisation, the
ridge solutions for every penalty, and the held-out R² of each, exactly as ``fit.fit_head``
computes them from the full data, up to floating-point rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loracast.distributed import ProcessContext
from loracast.fit import ridge_solutions
from loracast.heads import Head

_SUMS = ("n", "sum_x", "sum_y", "xx", "xy", "yy")


@dataclass
class Moments:
    """Sums over samples ``(x, y)`` of a head, taken about ``shift_x`` and ``shift_y``, in float64.

    Attributes:
        shift_x, shift_y: the shift points, ``(d_in,)`` and ``(d_out,)``, float32.
        n: sample count, a one-element tensor so it can be all-reduced with the sums.
        sum_x, sum_y: sums of ``x − shift_x`` and ``y − shift_y``.
        xx: ``Σ (x − shift_x)(x − shift_x)ᵀ``, ``(d_in, d_in)``.
        xy: ``Σ (x − shift_x)(y − shift_y)ᵀ``, ``(d_in, d_out)``.
        yy: ``Σ (y − shift_y)²`` per output column, ``(d_out,)``.
    """

    shift_x: torch.Tensor
    shift_y: torch.Tensor
    n: torch.Tensor
    sum_x: torch.Tensor
    sum_y: torch.Tensor
    xx: torch.Tensor
    xy: torch.Tensor
    yy: torch.Tensor

    @classmethod
    def zeros(cls, shift_x: torch.Tensor, shift_y: torch.Tensor) -> Moments:
        """Return empty sums about the given shift points, on their device."""
        d_in, d_out = shift_x.shape[0], shift_y.shape[0]
        options = {"dtype": torch.float64, "device": shift_x.device}
        return cls(
            shift_x=shift_x.float(),
            shift_y=shift_y.float(),
            n=torch.zeros(1, **options),
            sum_x=torch.zeros(d_in, **options),
            sum_y=torch.zeros(d_out, **options),
            xx=torch.zeros(d_in, d_in, **options),
            xy=torch.zeros(d_in, d_out, **options),
            yy=torch.zeros(d_out, **options),
        )

    @property
    def count(self) -> int:
        return int(self.n.item())

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add samples ``x`` ``(n, d_in)`` and ``y`` ``(n, d_out)``."""
        # Products of one chunk in float32 (fast), accumulated over chunks in float64.
        xc = x.float() - self.shift_x
        yc = y.float() - self.shift_y
        self.n += xc.shape[0]
        self.sum_x += xc.sum(0, dtype=torch.float64)
        self.sum_y += yc.sum(0, dtype=torch.float64)
        self.xx += (xc.T @ xc).double()
        self.xy += (xc.T @ yc).double()
        self.yy += (yc * yc).sum(0, dtype=torch.float64)

    def all_reduce(self, context: ProcessContext) -> None:
        """Sum the moments over all processes, which must share the shift points."""
        for name in _SUMS:
            context.all_reduce_sum(getattr(self, name))


@dataclass
class Standardisation:
    """Means and standard deviations (unbiased, floored at ``eps``) of ``x`` and ``y``."""

    mean_x: torch.Tensor
    std_x: torch.Tensor
    mean_y: torch.Tensor
    std_y: torch.Tensor


def standardisation(train: Moments, eps: float = 1e-6) -> Standardisation:
    """Return the training data's means and standard deviations, as ``Head`` stores them."""
    n = train.n
    var_x = (train.xx.diagonal() - train.sum_x**2 / n) / (n - 1)
    var_y = (train.yy - train.sum_y**2 / n) / (n - 1)
    return Standardisation(
        mean_x=train.shift_x.double() + train.sum_x / n,
        std_x=var_x.clamp_min(0).sqrt().clamp_min(eps),
        mean_y=train.shift_y.double() + train.sum_y / n,
        std_y=var_y.clamp_min(0).sqrt().clamp_min(eps),
    )


def _centred_about(moments: Moments, mean_x: torch.Tensor, mean_y: torch.Tensor):
    """Return ``Σ (x − mean_x)(x − mean_x)ᵀ``, ``Σ (x − mean_x)(y − mean_y)ᵀ`` and
    ``Σ (y − mean_y)²`` per column, for means other than the shift points."""
    dx = mean_x - moments.shift_x.double()
    dy = mean_y - moments.shift_y.double()
    n, sx, sy = moments.n, moments.sum_x, moments.sum_y
    xx = moments.xx - torch.outer(sx, dx) - torch.outer(dx, sx) + n * torch.outer(dx, dx)
    xy = moments.xy - torch.outer(sx, dy) - torch.outer(dx, sy) + n * torch.outer(dx, dy)
    yy = moments.yy - 2 * dy * sy + n * dy**2
    return xx, xy, yy


def validation_r2(weight: torch.Tensor, val: Moments, scale: Standardisation) -> float:
    """Return the pooled held-out R² of the linear head ``weight`` ``(d_out, d_in)``.

    The head predicts ``mean_y + std_y · (weight · (x − mean_x) / std_x)``; its squared error
    on the held-out samples follows from their moments about the training means.
    """
    xx, xy, yy = _centred_about(val, scale.mean_x, scale.mean_y)
    gram = xx / torch.outer(scale.std_x, scale.std_x)  # Σ z zᵀ
    cross = xy / torch.outer(scale.std_x, scale.std_y)  # Σ z tᵀ
    targets = yy / scale.std_y**2  # Σ t² per column
    w = weight.double()
    # Σ ||t − W z||² per output column, then back to the original units.
    squared_error = targets - 2 * (w * cross.T).sum(1) + ((w @ gram) * w).sum(1)
    residual = (squared_error * scale.std_y**2).sum()
    total = (val.yy - val.sum_y**2 / val.n).sum()
    return float(1.0 - residual / total.clamp_min(1e-12))


def ridge_head(
    train: Moments, val: Moments, alphas: Sequence[float], mlp_hidden: int
) -> tuple[Head, dict]:
    """Build a head at the ridge solution whose penalty scores best on the held-out moments.

    Returns:
        The head (on the moments' device) and metrics ``ridge_alpha``, ``r2_linear``, ``r2``.
    """
    scale = standardisation(train)
    xx, xy, _ = _centred_about(train, scale.mean_x, scale.mean_y)
    gram = xx / torch.outer(scale.std_x, scale.std_x)
    cross = xy / torch.outer(scale.std_x, scale.std_y)
    best = (-float("inf"), None, None)
    for alpha, weight in ridge_solutions(gram, cross, train.count, alphas):
        score = validation_r2(weight, val, scale)
        if score > best[0]:
            best = (score, alpha, weight)
    r2_linear, alpha, weight = best

    head = Head(gram.shape[0], cross.shape[1], mlp_hidden=mlp_hidden).to(gram.device)
    with torch.no_grad():
        head.in_mean.copy_(scale.mean_x)
        head.in_std.copy_(scale.std_x)
        head.out_mean.copy_(scale.mean_y)
        head.out_std.copy_(scale.std_y)
        head.linear.weight.copy_(weight)
        head.linear.bias.zero_()
    return head, {"ridge_alpha": alpha, "r2_linear": r2_linear, "r2": r2_linear}
