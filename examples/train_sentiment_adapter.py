"""Train the example tweet-sentiment LoRA adapter on SmolLM2-135M-Instruct and report accuracy.

The adapter is LoRA r 8, alpha 16 on q_proj and v_proj, trained for 1 epoch at learning rate
1e-3 on the 400-tweet ``train`` split of ``loracast.eval.sentiment.sentiment_splits(seed)``.
It is saved as a standard PEFT folder. The script then prints the accuracy of the base model
and of the base model with the adapter on the held-out ``test`` split.

Usage:
    python examples/train_sentiment_adapter.py --out runs/smollm2-sentiment-lora
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from peft import PeftModel

from loracast.eval.sentiment import evaluate_sentiment, sentiment_splits
from loracast.models import load_model
from loracast.train import LoraRecipe, train_sentiment_adapter

RECIPE = LoraRecipe(
    r=8,
    lora_alpha=16,
    target_modules=("q_proj", "v_proj"),
    learning_rate=1e-3,
    epochs=1,
    batch_size=8,
)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="adapter folder to create")
    parser.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="source model: a loracast demo name, a model folder or a hub id "
        "(default: smollm2-135m-instruct)",
    )
    parser.add_argument("--seed", type=int, default=0, help="data split seed (default: 0)")
    parser.add_argument(
        "--eval-limit",
        type=positive_int,
        default=200,
        help="number of test tweets to evaluate on (default: 200, the whole test split)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=8,
        help="sequences per forward pass in evaluation (default: 8)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--quiet", action="store_true", help="hide progress bars and logs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO)
    show_progress = not args.quiet

    loaded = load_model(args.model)
    test = sentiment_splits(seed=args.seed).test[: args.eval_limit]

    started = time.perf_counter()
    base = evaluate_sentiment(
        loaded.model,
        loaded.tokenizer,
        test,
        batch_size=args.batch_size,
        show_progress=show_progress,
    )
    base_seconds = time.perf_counter() - started

    started = time.perf_counter()
    out = train_sentiment_adapter(
        loaded,
        args.out,
        recipe=RECIPE,
        seed=args.seed,
        overwrite=args.overwrite,
        show_progress=show_progress,
    )
    train_seconds = time.perf_counter() - started

    started = time.perf_counter()
    adapted = PeftModel.from_pretrained(loaded.model, out)
    try:
        tuned = evaluate_sentiment(
            adapted, loaded.tokenizer, test, batch_size=args.batch_size, show_progress=show_progress
        )
    finally:
        adapted.unload()
    tuned_seconds = time.perf_counter() - started

    print(f"adapter saved to {out} (trained in {train_seconds:.0f} s)")
    print(f"test tweets: {len(test)} (split seed {args.seed})")
    print(f"base accuracy:           {base.accuracy:.3f}  ({base_seconds:.0f} s)")
    print(f"base + adapter accuracy: {tuned.accuracy:.3f}  ({tuned_seconds:.0f} s)")


if __name__ == "__main__":
    main()
