"""Encoder and decoder heads: a linear map plus an optional residual MLP, on standardised data.

A head maps ``x`` of shape ``(..., d_in)`` to ``(..., d_out)`` as
``out_mean + out_std · (W · (x − in_mean) / in_std + b + mlp(...))``. The MLP's last layer starts
at zero, so a freshly built head is exactly its linear (ridge) solution.
"""

from __future__ import annotations

import torch
from torch import nn


class Head(nn.Module):
    """A map between activation spaces with standardisation folded in.

    Args:
        d_in: input width.
        d_out: output width.
        mlp_hidden: hidden width of the residual MLP; 0 builds a purely linear head.
    """

    def __init__(self, d_in: int, d_out: int, mlp_hidden: int = 0) -> None:
        super().__init__()
        self.d_in = d_in
        self.d_out = d_out
        self.mlp_hidden = mlp_hidden
        self.register_buffer("in_mean", torch.zeros(d_in))
        self.register_buffer("in_std", torch.ones(d_in))
        self.register_buffer("out_mean", torch.zeros(d_out))
        self.register_buffer("out_std", torch.ones(d_out))
        self.linear = nn.Linear(d_in, d_out)
        self.mlp: nn.Sequential | None = None
        if mlp_hidden > 0:
            self.mlp = nn.Sequential(
                nn.Linear(d_in, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, d_out)
            )
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)

    @property
    def is_linear(self) -> bool:
        return self.mlp is None

    def standardised(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``x`` to the head's standardised output space (before ``out_std``, ``out_mean``)."""
        z = (x - self.in_mean) / self.in_std
        out = self.linear(z)
        if self.mlp is not None:
            out = out + self.mlp(z)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_mean + self.out_std * self.standardised(x)

    def delta(self, y: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
        """Return ``head(y + dy) − head(y)``: how the head carries a change ``dy`` made at ``y``.

        For a linear head this is ``out_std · W · (dy / in_std)`` and ``y`` is not used.
        """
        if self.mlp is None:
            return self.out_std * ((dy / self.in_std) @ self.linear.weight.T)
        return self.forward(y + dy) - self.forward(y)

    def set_standardisation(self, x: torch.Tensor, y: torch.Tensor, eps: float = 1e-6) -> None:
        """Set the input and output means and standard deviations from samples ``(n, d)``."""
        self.in_mean.copy_(x.mean(0))
        self.in_std.copy_(x.std(0).clamp_min(eps))
        self.out_mean.copy_(y.mean(0))
        self.out_std.copy_(y.std(0).clamp_min(eps))

    def shape_dict(self) -> dict:
        """Return the widths needed to rebuild the head before loading its weights."""
        return {"d_in": self.d_in, "d_out": self.d_out, "mlp_hidden": self.mlp_hidden}
