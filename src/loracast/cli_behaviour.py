"""The ``refine`` and ``distil`` subcommands: training on the adapter's behaviour."""

from __future__ import annotations

import argparse
from pathlib import Path

from loracast.cli_options import (
    add_corpus_options,
    add_model_options,
    add_output_options,
    corpus_from_args,
    load_from_args,
)


def _teacher(args, config, target):
    """Load the corpus, the source and the adapter, and build the teacher for ``target``.

    Returns ``(teacher, shared_vocabulary)``.
    """
    from loracast.adapters import load_adapter, validate_adapter
    from loracast.refine import build_teacher
    from loracast.vocabulary import shared_vocabulary

    corpus = corpus_from_args(args, args.max_passages)
    source = load_from_args(args, args.source)
    adapter = load_adapter(args.adapter, allow_pickle=args.allow_pickle)
    validate_adapter(adapter, source.model)
    shared = shared_vocabulary(source.tokenizer, target.tokenizer)
    teacher = build_teacher(
        source, target, adapter.kernels, corpus, shared, config, show_progress=not args.quiet
    )
    return teacher, shared


def _print_report(report, steps: int) -> None:
    sequence = (
        f"sampled-token cross-entropy {report.initial['sequence_ce']:.4f} -> "
        f"{report.best['sequence_ce']:.4f}, "
        if "sequence_ce" in report.best
        else ""
    )
    if "span" in report.best:
        sequence += f"span error {report.initial['span']:.4f} -> {report.best['span']:.4f}, "
    print(
        f"held-out KL {report.initial['kl']:.4f} -> {report.best['kl']:.4f}, {sequence}"
        "behaviour cosine "
        f"{report.initial['behaviour_cosine']:.3f} -> {report.best['behaviour_cosine']:.3f} "
        f"(best step {report.best_step} of {steps}, {report.seconds:.0f} s)"
    )


def _refine(args) -> int:
    from loracast.cartridge import Cartridge
    from loracast.peft_export import check_output_free
    from loracast.refine import refine_cartridge

    check_output_free(Path(args.out).expanduser(), args.overwrite)
    if args.template and args.elicited:
        raise ValueError("--template and --elicited choose different texts; pass one of them")
    text = "general"
    if args.template:
        text = "template"
    elif args.elicited:
        text = "elicited"
    if args.sequence_weight > 0 and text != "elicited":
        raise ValueError("--sequence-weight scores the tokens the adapter wrote; add --elicited")
    config = _training_config(args, text)
    target = load_from_args(args, args.target)
    cartridge = Cartridge.load(args.cartridge, target=target)
    teacher, shared = _teacher(args, config, target)
    refined, report = refine_cartridge(
        cartridge, target, teacher, shared, config, show_progress=not args.quiet
    )
    refined.save(args.out, overwrite=args.overwrite)
    print(f"refined cartridge saved to {args.out}")
    _print_report(report, config.steps)
    return 0


def _distil(args) -> int:
    from loracast.peft_export import check_output_free
    from loracast.refine import distil_lora

    out = Path(args.out).expanduser()
    check_output_free(out, args.overwrite)
    if (args.text == "template") != (args.template is not None):
        raise ValueError(
            f"--template gives the prompt template that --text template needs; got --text "
            f"{args.text} with --template {args.template!r}"
        )
    config = _training_config(args, args.text)
    target = load_from_args(args, args.target)
    teacher, shared = _teacher(args, config, target)
    report = distil_lora(target, teacher, shared, out, config, show_progress=not args.quiet)
    print(f"distilled PEFT LoRA for {target.name} saved to {out}")
    _print_report(report, config.steps)
    return 0


def _add_training_options(parser: argparse.ArgumentParser, sequence_weight: float) -> None:
    """Add the options of the behavioural objective shared by ``refine`` and ``distil``."""
    parser.add_argument(
        "--max-positions", type=int, default=4000, help="aligned positions in the teacher set"
    )
    parser.add_argument("--steps", type=int, default=100, help="optimiser steps")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        default="constant",
        help="learning-rate schedule: constant, or cosine (a linear warm-up, then a half cosine "
        "down to 0 at the last step)",
    )
    parser.add_argument(
        "--warmup-steps", type=int, default=0, help="warm-up steps of the cosine schedule"
    )
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=0.0,
        help="AdamW weight decay, which pulls the trained change toward zero",
    )
    parser.add_argument(
        "--max-grad-norm",
        type=float,
        default=None,
        help="clip the gradient to this total L2 norm before each step (default: no clipping)",
    )
    parser.add_argument(
        "--prefix-tokens",
        type=int,
        default=8,
        help="for elicited text, source tokens of each corpus passage kept as the prompt",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="for elicited text, the sampling temperature (1 samples the adapted source itself)",
    )
    parser.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="for elicited text, nucleus sampling: draw each token from the most likely tokens "
        "whose probabilities add up to this share (1 keeps every token)",
    )
    parser.add_argument(
        "--samples-per-prefix",
        type=int,
        default=1,
        help="for elicited text, continuations sampled from each corpus prefix. The corpus is "
        "read once per sample until --max-positions are gathered",
    )
    parser.add_argument(
        "--amplification",
        type=float,
        default=1.0,
        help="for elicited text, sample from base + a * (adapted - base) logits: values above 1 "
        "push the text toward what the adapter favours, at one more forward pass per token",
    )
    parser.add_argument("--kl-weight", type=float, default=1.0, help="weight of the tilted KL term")
    parser.add_argument(
        "--sequence-weight",
        type=float,
        default=sequence_weight,
        help="for elicited text, weight of the next-token cross-entropy on the tokens the adapter "
        f"sampled (sequence-level distillation; default {sequence_weight:g})",
    )
    parser.add_argument(
        "--span-weight",
        type=float,
        default=0.0,
        help="weight of the span term: the student's change of the log-likelihood of the text "
        "between two aligned positions matches the adapter's change of it in the source",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling and training")


def _training_config(args, text: str):
    """Return the ``RefineConfig`` of the parsed training options."""
    from loracast.elicit import ElicitConfig
    from loracast.refine import RefineConfig

    return RefineConfig(
        text=text,
        template=args.template,
        elicit=ElicitConfig(
            prefix_tokens=args.prefix_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            samples_per_prefix=args.samples_per_prefix,
            amplification=args.amplification,
        ),
        max_positions=args.max_positions,
        steps=args.steps,
        learning_rate=args.learning_rate,
        lr_schedule=args.lr_schedule,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        centre_shift=getattr(args, "centre_shift", False),
        kl_weight=args.kl_weight,
        sequence_weight=args.sequence_weight if text == "elicited" else 0.0,
        span_weight=args.span_weight,
        lora_rank=getattr(args, "rank", 8),
        seed=args.seed,
    )


def _add_models_and_output(parser: argparse.ArgumentParser, out_help: str) -> None:
    """Add the source, adapter, target, output and corpus options of ``refine`` and ``distil``."""
    parser.add_argument("--source", required=True, help="model the adapter was trained on")
    parser.add_argument("--adapter", required=True, help="PEFT LoRA folder of the source")
    parser.add_argument("--target", required=True, help="model to carry the adapter to")
    parser.add_argument("--out", required=True, help=out_help)
    add_corpus_options(parser, max_passages=400)


def add_refine_parser(commands) -> None:
    refining = commands.add_parser(
        "refine",
        help="refine a cartridge so the target's next-token change matches the adapter's",
    )
    refining.add_argument("--cartridge", required=True, help="cartridge folder to refine")
    _add_models_and_output(refining, "refined cartridge folder to write")

    refining.add_argument(
        "--template",
        default=None,
        help="the adapter's prompt template with a {text} field: train at its last position on "
        "corpus text filled into it (uses the template, but no labels or task examples)",
    )
    refining.add_argument(
        "--elicited",
        action="store_true",
        help="train on text the adapter writes: corpus prefixes continued by sampling from the "
        "source with the adapter (no task data)",
    )
    _add_training_options(refining, sequence_weight=0.0)

    refining.add_argument(
        "--centre-shift",
        action="store_true",
        help="remove the adapter's mean change over the teacher positions from the teacher",
    )
    add_output_options(refining, pickle=True)
    add_model_options(refining)
    refining.set_defaults(handler=_refine)


def add_distil_parser(commands) -> None:
    distilling = commands.add_parser(
        "distil",
        help="train a PEFT LoRA for the target that changes it as the adapter changes the source",
    )
    _add_models_and_output(distilling, "PEFT LoRA folder to write")

    distilling.add_argument(
        "--text",
        choices=["elicited", "general", "template"],
        default="elicited",
        help="text to train on: corpus prefixes continued by the source with the adapter "
        "(default), corpus text, or corpus text in --template",
    )
    distilling.add_argument(
        "--template", default=None, help="with --text template, the prompt template with {text}"
    )
    distilling.add_argument("--rank", type=int, default=8, help="rank of the distilled LoRA")
    _add_training_options(distilling, sequence_weight=1.0)
    add_output_options(distilling, pickle=True)
    add_model_options(distilling)
    distilling.set_defaults(handler=_distil)
