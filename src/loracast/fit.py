"""Fit heads: closed-form ridge regression, then a residual MLP trained from the ridge start."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from loracast.heads import Head

logger = logging.getLogger(__name__)

DEFAULT_RIDGE_ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


@dataclass
class HeadFitConfig:
    """Settings for fitting one head.

    Attributes:
        ridge_alphas: ridge penalties tried (relative to the number of samples, on standardised
            data); the one with the best validation R² is kept.
        mlp_hidden: hidden width of the residual MLP; 0 fits a linear head only.
        mlp_steps: Adam steps for the residual MLP.
        mlp_lr: Adam learning rate for the residual MLP.
        mlp_batch_size: samples per MLP step.
        seed: seed for MLP initialisation and batch order.
    """

    ridge_alphas: Sequence[float] = DEFAULT_RIDGE_ALPHAS
    mlp_hidden: int = 128
    mlp_steps: int = 150
    mlp_lr: float = 1e-3
    mlp_batch_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.ridge_alphas or any(alpha <= 0 for alpha in self.ridge_alphas):
            raise ValueError(f"ridge_alphas must be positive numbers, got {self.ridge_alphas!r}")
        for name in ("mlp_hidden", "mlp_steps", "mlp_batch_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.mlp_lr <= 0:
            raise ValueError(f"mlp_lr must be positive, got {self.mlp_lr}")


def r2_score(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """Return the coefficient of determination, pooled over all output features."""
    residual = (target - prediction).pow(2).sum()
    total = (target - target.mean(0)).pow(2).sum()
    return float(1.0 - residual / total.clamp_min(1e-12))


def ridge_solutions(
    gram: torch.Tensor, cross: torch.Tensor, n: int, alphas: Sequence[float]
) -> Iterator[tuple[float, torch.Tensor]]:
    """Yield ``(alpha, weight)`` ridge solutions from standardised second moments.

    Args:
        gram: ``Z^T Z`` of the standardised inputs, ``(d_in, d_in)``, float64.
        cross: ``Z^T T`` of standardised inputs and targets, ``(d_in, d_out)``, float64.
        n: number of samples; each penalty is ``alpha · n``.
        alphas: the penalties to solve for.

    Yields:
        Each penalty and its float32 weight, ``(d_out, d_in)``.
    """
    # One eigendecomposition of the Gram matrix serves every penalty.
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    projected = eigenvectors.T @ cross
    for alpha in alphas:
        weight = eigenvectors @ (projected / (eigenvalues + alpha * n).unsqueeze(1))
        yield alpha, weight.T.float()  # (d_out, d_in)


def _ridge_solutions(z: torch.Tensor, t: torch.Tensor, alphas: Sequence[float]):
    yield from ridge_solutions((z.T @ z).double(), (z.T @ t).double(), z.shape[0], alphas)


def fit_head(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    config: HeadFitConfig,
    *,
    name: str = "head",
) -> tuple[Head, dict]:
    """Fit a head mapping ``x`` to ``y``: ridge first, then the residual MLP if configured.

    Args:
        x_train, y_train: training samples, shapes ``(n, d_in)`` and ``(n, d_out)``.
        x_val, y_val: held-out samples used to pick the ridge penalty and report R².
        config: fitting settings.
        name: what the head maps, for log messages (``model.layers.3.self_attn.q_proj encoder``).

    Returns:
        The head (on the CPU, float32) and metrics: ``ridge_alpha``, ``r2_linear`` and ``r2``
        (held-out, after the MLP when there is one).

    Raises:
        ValueError: fewer training samples than two, or shapes that do not match.
    """
    if x_train.shape[0] < 2 or x_train.shape[0] != y_train.shape[0]:
        raise ValueError(
            f"need at least 2 paired training samples, got x {tuple(x_train.shape)} and "
            f"y {tuple(y_train.shape)}; use a larger corpus"
        )
    x_train, y_train = x_train.float(), y_train.float()
    x_val, y_val = x_val.float(), y_val.float()
    head = Head(x_train.shape[1], y_train.shape[1], mlp_hidden=config.mlp_hidden)
    head.set_standardisation(x_train, y_train)
    with torch.no_grad():
        z = (x_train - head.in_mean) / head.in_std
        t = (y_train - head.out_mean) / head.out_std
        best = (-float("inf"), None, None)
        for alpha, weight in _ridge_solutions(z, t, config.ridge_alphas):
            head.linear.weight.copy_(weight)
            head.linear.bias.zero_()
            score = r2_score(head(x_val), y_val)
            if score > best[0]:
                best = (score, alpha, weight)
        r2_linear, alpha, weight = best
        head.linear.weight.copy_(weight)

    metrics = {"ridge_alpha": alpha, "r2_linear": r2_linear, "r2": r2_linear}
    if head.mlp is not None and config.mlp_steps > 0:
        metrics["r2"] = _train_residual_mlp(head, x_train, y_train, x_val, y_val, config, name)
    head.requires_grad_(False)
    return head, metrics


def _train_residual_mlp(head, x_train, y_train, x_val, y_val, config, name) -> float:
    # The linear part stays frozen, so its share of the standardised target is computed once.
    with torch.no_grad():
        z_train = (x_train - head.in_mean) / head.in_std
        residual = (y_train - head.out_mean) / head.out_std - head.linear(z_train)

    def batch_loss(mlp: nn.Module, index: torch.Tensor) -> torch.Tensor:
        return (mlp(z_train[index]) - residual[index]).pow(2).mean()

    return train_residual_mlp(
        head, batch_loss, lambda: r2_score(head(x_val), y_val), x_train.shape[0], config, name
    )


def _is_finite(loss: torch.Tensor) -> bool:
    return bool(torch.isfinite(loss))


def train_residual_mlp(
    head: Head,
    batch_loss: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    validation_r2: Callable[[], float],
    n_train: int,
    config: HeadFitConfig,
    name: str,
    *,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
    all_finite: Callable[[torch.Tensor], bool] = _is_finite,
) -> float:
    """Train only the head's MLP from its ridge start; keep the best validation state.

    Batches are ``config.mlp_batch_size`` indices into the ``n_train`` training rows, drawn
    from a generator seeded with ``config.seed``, so the same seed gives the same batches.

    Args:
        head: a head with an MLP and its fitted linear part, which stays frozen.
        batch_loss: maps ``(mlp, index)`` to the loss on the training rows ``index``, where
            ``mlp`` is the head's MLP, wrapped by ``wrap`` when given.
        validation_r2: returns the head's held-out R²; called without gradients.
        n_train: number of training rows.
        config: fitting settings (``seed``, ``mlp_steps``, ``mlp_lr``, ``mlp_batch_size``).
        name: what the head maps, for log messages.
        wrap: wraps the MLP before training, for example in ``DistributedDataParallel``.
        all_finite: decides whether a loss is finite. In data-parallel training it must return
            the same result in every process.

    Returns:
        The best held-out R², whose MLP state the head keeps.
    """
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    head.mlp[0].reset_parameters()  # seeded, so a refit with the same seed is identical
    head.linear.requires_grad_(False)
    head.mlp.requires_grad_(True)
    mlp = wrap(head.mlp) if wrap is not None else head.mlp
    optimizer = torch.optim.Adam(head.mlp.parameters(), lr=config.mlp_lr)

    with torch.no_grad():
        best_score = validation_r2()
    best_state = {k: v.clone() for k, v in head.mlp.state_dict().items()}
    evaluate_every = max(1, config.mlp_steps // 5)
    for step in range(1, config.mlp_steps + 1):
        index = torch.randint(0, n_train, (config.mlp_batch_size,), generator=generator)
        loss = batch_loss(mlp, index)
        if not all_finite(loss):
            # Keep the last good state (at worst the ridge solution) instead of NaN weights.
            logger.warning(
                "%s: residual MLP loss became %s at step %d; keeping the best state so far "
                "(lower HeadFitConfig.mlp_lr)",
                name,
                loss.item(),
                step,
            )
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % evaluate_every == 0 or step == config.mlp_steps:
            with torch.no_grad():
                score = validation_r2()
            if score > best_score:
                best_score = score
                best_state = {k: v.clone() for k, v in head.mlp.state_dict().items()}
    head.mlp.load_state_dict(best_state)
    head.requires_grad_(False)
    return best_score
