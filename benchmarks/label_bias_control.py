"""Check whether a sentiment cartridge carries skill or only shifts the label prior.

Usage:
    python benchmarks/label_bias_control.py --cartridge ~/.cache/loracast/demo/cartridge

It prints four figures on the test split. The first two are the accuracies of the target base
and of target + cartridge. The third is the accuracy of the best constant bias on the target
base's three label scores, fitted on the labelled validation split (a control, not a method).
The last is the mean push toward the correct label, which is the change of the correct label's
centred log-likelihood, with the mean shift per label beside it.
"""

from __future__ import annotations

import argparse
import collections

import torch

from loracast.cartridge import Cartridge
from loracast.eval.sentiment import evaluate_sentiment, sentiment_splits
from loracast.models import load_model


def _centred(scores: torch.Tensor) -> torch.Tensor:
    return scores - scores.mean(1, keepdim=True)


def best_constant_bias(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Grid-search the bias on labels 1 and 2 (label 0 fixed at 0) that maximises accuracy."""
    grid = torch.arange(-6.0, 6.01, 0.1)
    best_accuracy, best_bias = -1.0, torch.zeros(3)
    for first in grid:
        for second in grid:
            bias = torch.tensor([0.0, float(first), float(second)])
            accuracy = ((scores + bias).argmax(1) == labels).float().mean().item()
            if accuracy > best_accuracy:
                best_accuracy, best_bias = accuracy, bias
    return best_bias, best_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cartridge", required=True, help="sentiment cartridge folder")
    parser.add_argument("--target", default="gemma-3-270m", help="the cartridge's target model")
    parser.add_argument("--cache-dir", default=None, help="loracast cache folder")
    args = parser.parse_args()

    target = load_model(args.target, cache=args.cache_dir)
    cartridge = Cartridge.load(args.cartridge, target=target)
    splits = sentiment_splits()
    validation = evaluate_sentiment(target.model, target.tokenizer, splits.validation)
    base = evaluate_sentiment(target.model, target.tokenizer, splits.test)
    with cartridge.attached(target):
        carried = evaluate_sentiment(target.model, target.tokenizer, splits.test)

    test_labels = torch.tensor(base.labels)
    bias, validation_accuracy = best_constant_bias(
        validation.scores, torch.tensor(validation.labels)
    )
    bias_accuracy = ((base.scores + bias).argmax(1) == test_labels).float().mean().item()
    change = _centred(carried.scores) - _centred(base.scores)
    push = change.gather(1, test_labels[:, None]).mean().item()

    print(f"target base accuracy: {base.accuracy:.3f}")
    print(f"target + cartridge accuracy: {carried.accuracy:.3f}")
    print(
        f"constant label bias {bias.tolist()} (validation accuracy {validation_accuracy:.3f}): "
        f"test accuracy {bias_accuracy:.3f}"
    )
    print(f"mean push toward the correct label: {push:+.3f}")
    print(f"mean shift per label (negative, neutral, positive): {change.mean(0).tolist()}")
    print(
        f"predictions, base: {dict(collections.Counter(base.predictions))}, "
        f"cartridge: {dict(collections.Counter(carried.predictions))}"
    )


if __name__ == "__main__":
    main()
