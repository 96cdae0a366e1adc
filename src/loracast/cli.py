"""The ``loracast`` command line: each subcommand is a few lines over the library."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from loracast import __version__

logger = logging.getLogger("loracast")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="weight dtype of the models (default: float32)",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="torch device, e.g. cuda or cpu (default: cuda when available)",
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="cache folder for converted demo models (default: $LORACAST_CACHE "
        "or ~/.cache/loracast)",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow code shipped with a hub model to run (off by default)",
    )


def _add_corpus_options(
    parser: argparse.ArgumentParser, max_passages: int | None, passages_help: str | None = None
) -> None:
    parser.add_argument(
        "--corpus",
        default="bbc-news",
        help="general text: a .txt/.jsonl file, a folder of them, a folder written by "
        "datasets' save_to_disk, hf:NAME[:CONFIG] for a hub dataset, or bbc-news (default)",
    )
    parser.add_argument("--text-field", default="text", help="JSONL or dataset field with the text")
    parser.add_argument(
        "--corpus-split", default="train", help="dataset split to read (default: train)"
    )
    parser.add_argument(
        "--max-passages",
        type=int,
        default=max_passages,
        help=passages_help or f"corpus passages read (default: {max_passages})",
    )


def _add_scale_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--corpus-tokens",
        type=int,
        default=None,
        help="read the corpus until this many source tokens are read (default: no limit)",
    )
    parser.add_argument(
        "--record-dir",
        default=None,
        help="record activations into safetensors shards in this folder and fit from them; "
        "rerunning the same command resumes an interrupted recording or fit",
    )
    parser.add_argument(
        "--storage-dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="dtype of the recorded activations on disk (default: float32)",
    )
    parser.add_argument(
        "--shard-megabytes",
        type=float,
        default=256.0,
        help="size of one shard of recorded activations in MiB; each process keeps up to "
        "three in memory (default: 256)",
    )


def _add_output_options(parser: argparse.ArgumentParser, *, pickle: bool) -> None:
    if pickle:
        parser.add_argument(
            "--allow-pickle",
            action="store_true",
            help="accept an adapter saved as a pickle file (can run code)",
        )
    parser.add_argument("--overwrite", action="store_true", help="replace the output folder")


def _load(args, name, device=None):
    from loracast.models import load_model

    return load_model(
        name,
        dtype=args.dtype,
        device=device or args.device,
        cache=args.cache_dir,
        trust_remote_code=args.trust_remote_code,
    )


def _transfer_corpus(args, max_passages):
    from loracast.corpus import CorpusStream, load_corpus

    if args.record_dir:
        return CorpusStream(
            args.corpus, args.text_field, args.corpus_split, max_passages=max_passages
        )
    return load_corpus(
        args.corpus, max_passages=max_passages, text_field=args.text_field, split=args.corpus_split
    )


def _transfer(args) -> int:
    from loracast.bridge import Bridge, BridgeConfig
    from loracast.distributed import process_context
    from loracast.fit import HeadFitConfig
    from loracast.streaming import ShardConfig
    from loracast.transfer import transfer

    # A token budget replaces the default limits on passages and positions.
    budget = args.corpus_tokens
    max_passages = args.max_passages if args.max_passages or budget else 400
    max_positions = args.max_positions if args.max_positions or budget else 12000
    config = BridgeConfig(
        max_tokens=args.max_tokens,
        max_positions=max_positions,
        corpus_tokens=budget,
        head=HeadFitConfig(
            mlp_hidden=0 if args.head == "linear" else args.mlp_hidden, mlp_steps=args.mlp_steps
        ),
        seed=args.seed,
    )
    shard_config = ShardConfig(args.shard_megabytes, args.storage_dtype)
    context = process_context(args.device)
    bridge = Bridge.load(args.bridge) if args.bridge else None
    corpus = _transfer_corpus(args, max_passages) if bridge is None else None
    source = _load(args, args.source, context.device)
    target = _load(args, args.target, context.device)
    result = transfer(
        source,
        target,
        args.adapter,
        corpus,
        args.out,
        config=config,
        bridge=bridge,
        record_dir=args.record_dir,
        shard_config=shard_config,
        context=context,
        allow_pickle=args.allow_pickle,
        overwrite=args.overwrite,
        show_progress=not args.quiet,
    )
    if not context.is_main:
        return 0
    if args.save_bridge:
        result.bridge.save(args.save_bridge, overwrite=args.overwrite)
        print(f"bridge saved to {args.save_bridge}")
    stats = result.bridge.stats
    print(f"cartridge saved to {result.path}")
    print(
        f"sites: {len(result.cartridge.kernels)}, aligned positions: {stats.get('positions')}, "
        f"record {stats.get('record_seconds')} s, fit {stats.get('fit_seconds')} s"
    )
    return 0


def _generate(args) -> int:
    from loracast.cartridge import Cartridge

    target = _load(args, args.target)
    cartridge = Cartridge.load(args.cartridge, target=target)
    cartridge.scale = args.scale
    inputs = target.tokenizer(args.prompt, return_tensors="pt").to(target.device)
    options = {
        "max_new_tokens": args.max_new_tokens,
        "do_sample": False,
        "pad_token_id": target.tokenizer.pad_token_id,
    }

    def complete() -> str:
        output = target.model.generate(**inputs, **options)
        return target.tokenizer.decode(
            output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )

    if args.compare:
        print(f"[target base]\n{args.prompt}{complete()}\n")
    with cartridge.attached(target):
        print(f"[target + cartridge, scale {args.scale}]\n{args.prompt}{complete()}")
    return 0


def _eval(args) -> int:
    from loracast.cartridge import Cartridge
    from loracast.eval.configurations import evaluate_configurations, format_rows
    from loracast.eval.tasks import load_task

    if args.adapter and not args.source:
        raise ValueError("--adapter needs --source, the model the adapter was trained on")
    if args.limit < 1:
        raise ValueError(f"--limit must be a positive integer, got {args.limit}")
    task = load_task(args.task, seed=args.split_seed)
    examples = task.split(args.split)[: args.limit]
    source = _load(args, args.source) if args.source else None
    target = _load(args, args.target)
    cartridge = Cartridge.load(args.cartridge, target=target) if args.cartridge else None
    rows = evaluate_configurations(
        source,
        target,
        args.adapter,
        cartridge,
        examples,
        task=task,
        show_progress=not args.quiet,
    )
    better = "higher" if task.higher_is_better else "lower"
    print(f"{task.name}, {args.split} split, {len(examples)} examples ({better} is better)")
    print(format_rows(rows, task.metric))
    return 0


def _bake(args) -> int:
    from loracast.bake import BakeConfig, bake
    from loracast.cartridge import Cartridge
    from loracast.corpus import load_corpus
    from loracast.peft_export import check_output_free

    # Refuse an existing output before minutes of loading and recording.
    check_output_free(Path(args.out).expanduser(), args.overwrite)
    config = BakeConfig(
        rank=args.rank,
        bias=args.bias,
        max_positions=args.max_positions,
        max_tokens=args.max_tokens,
    )
    corpus = load_corpus(
        args.corpus,
        max_passages=args.max_passages,
        text_field=args.text_field,
        split=args.corpus_split,
    )
    target = _load(args, args.target)
    cartridge = Cartridge.load(args.cartridge, target=target)
    result = bake(
        cartridge,
        target,
        corpus,
        args.out,
        config=config,
        card={"corpus": args.corpus, "command": " ".join(["loracast", *sys.argv[1:]])},
        overwrite=args.overwrite,
        show_progress=not args.quiet,
    )
    errors = [anchor.relative_error for anchor in result.anchors]
    print(f"baked PEFT LoRA saved to {result.path}")
    print(
        f"anchors: {len(errors)}, rank {max(anchor.rank for anchor in result.anchors)}, "
        f"held-out relative error mean {sum(errors) / len(errors):.3g}, worst {max(errors):.3g}, "
        f"{result.seconds:.1f} s"
    )
    return 0


def _teacher(args, config, target):
    """Load the corpus, the source and the adapter, and build the teacher for ``target``.

    Returns ``(teacher, shared_vocabulary)``.
    """
    from loracast.adapters import load_adapter, validate_adapter
    from loracast.corpus import load_corpus
    from loracast.refine import build_teacher
    from loracast.vocabulary import shared_vocabulary

    corpus = load_corpus(
        args.corpus,
        max_passages=args.max_passages,
        text_field=args.text_field,
        split=args.corpus_split,
    )
    source = _load(args, args.source)
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
    target = _load(args, args.target)
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
    target = _load(args, args.target)
    teacher, shared = _teacher(args, config, target)
    report = distil_lora(target, teacher, shared, out, config, show_progress=not args.quiet)
    print(f"distilled PEFT LoRA for {target.name} saved to {out}")
    _print_report(report, config.steps)
    return 0


def _info(args) -> int:
    from loracast.cartridge import CARTRIDGE_CONFIG
    from loracast.serialization import read_config

    config = read_config(args.cartridge, CARTRIDGE_CONFIG, "cartridge")
    print(f"source: {config['source']['name']}  target: {config['target']['name']}")
    print(f"adapter: {config.get('adapter', {}).get('path')}")
    print(f"layer map (source layer -> target layer): {config['layer_map']}")
    print(f"{'site':<36} {'anchor':<36} {'encoder R2':>10} {'decoder R2':>10}")
    for record in config["sites"]:
        metrics = record["metrics"]
        print(
            f"{record['site']:<36} {record['anchor']:<36} "
            f"{metrics['encoder_r2']:>10.3f} {metrics['decoder_r2']:>10.3f}"
        )
    return 0


def _demo(args) -> int:
    from loracast.demo import DemoConfig, run_demo

    config = DemoConfig(
        max_passages=args.max_passages,
        max_positions=args.max_positions,
        eval_limit=args.eval_limit,
        out=args.out,
        cache=args.cache_dir,
        show_progress=not args.quiet,
    )
    report = run_demo(config)
    print(report.format())
    return 0


def _add_bake_parser(commands) -> None:
    baking = commands.add_parser("bake", help="distil a cartridge into a standard PEFT LoRA")
    baking.add_argument("--cartridge", required=True, help="cartridge folder")
    baking.add_argument("--target", required=True, help="the cartridge's target model")
    baking.add_argument("--out", required=True, help="PEFT LoRA folder to write")
    baking.add_argument(
        "--rank",
        type=int,
        default=None,
        help="LoRA rank (default: the kernel ranks carried to each anchor, exact for linear heads)",
    )
    baking.add_argument(
        "--bias",
        action="store_true",
        help="also fit a bias per anchor (lora_bias): exact for linear heads, but PEFT cannot "
        "merge it into layers without a bias",
    )
    _add_corpus_options(baking, max_passages=200)
    baking.add_argument("--max-tokens", type=int, default=128, help="target tokens per passage")
    baking.add_argument(
        "--max-positions", type=int, default=4000, help="token positions recorded per anchor"
    )
    _add_output_options(baking, pickle=False)
    _add_model_options(baking)
    baking.set_defaults(handler=_bake)


def _add_training_options(parser: argparse.ArgumentParser, sequence_weight: float) -> None:
    """Add the options of the behavioural objective shared by ``refine`` and ``distil``."""
    parser.add_argument(
        "--max-positions", type=int, default=4000, help="aligned positions in the teacher set"
    )
    parser.add_argument("--steps", type=int, default=100, help="optimiser steps")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="AdamW learning rate")
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
    parser.add_argument("--kl-weight", type=float, default=1.0, help="weight of the tilted KL term")
    parser.add_argument(
        "--sequence-weight",
        type=float,
        default=sequence_weight,
        help="for elicited text, weight of the next-token cross-entropy on the tokens the adapter "
        f"sampled (sequence-level distillation; default {sequence_weight:g})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling and training")


def _training_config(args, text: str):
    """Return the ``RefineConfig`` of the parsed training options."""
    from loracast.elicit import ElicitConfig
    from loracast.refine import RefineConfig

    return RefineConfig(
        text=text,
        template=args.template,
        elicit=ElicitConfig(prefix_tokens=args.prefix_tokens, seed=args.seed),
        max_positions=args.max_positions,
        steps=args.steps,
        learning_rate=args.learning_rate,
        max_grad_norm=args.max_grad_norm,
        centre_shift=getattr(args, "centre_shift", False),
        kl_weight=args.kl_weight,
        sequence_weight=args.sequence_weight if text == "elicited" else 0.0,
        lora_rank=getattr(args, "rank", 8),
        seed=args.seed,
    )


def _add_refine_parser(commands) -> None:
    refining = commands.add_parser(
        "refine",
        help="refine a cartridge so the target's next-token change matches the adapter's",
    )
    refining.add_argument("--cartridge", required=True, help="cartridge folder to refine")
    refining.add_argument("--source", required=True, help="model the adapter was trained on")
    refining.add_argument("--adapter", required=True, help="the cartridge's PEFT LoRA folder")
    refining.add_argument("--target", required=True, help="the cartridge's target model")
    refining.add_argument("--out", required=True, help="refined cartridge folder to write")
    _add_corpus_options(refining, max_passages=400)
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
    _add_output_options(refining, pickle=True)
    _add_model_options(refining)
    refining.set_defaults(handler=_refine)


def _add_distil_parser(commands) -> None:
    distilling = commands.add_parser(
        "distil",
        help="train a PEFT LoRA for the target that changes it as the adapter changes the source",
    )
    distilling.add_argument("--source", required=True, help="model the adapter was trained on")
    distilling.add_argument("--adapter", required=True, help="PEFT LoRA folder of the source")
    distilling.add_argument("--target", required=True, help="model to carry the adapter to")
    distilling.add_argument("--out", required=True, help="PEFT LoRA folder to write")
    _add_corpus_options(distilling, max_passages=400)
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
    _add_output_options(distilling, pickle=True)
    _add_model_options(distilling)
    distilling.set_defaults(handler=_distil)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="loracast",
        description="Carry a LoRA adapter from one LLM family to another (CAST).",
    )
    parser.add_argument("--version", action="version", version=f"loracast {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="log warnings only and hide progress bars"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="carry a real sentiment LoRA from SmolLM2 to Gemma-3")
    demo.add_argument(
        "--out",
        default=None,
        help="cartridge folder (default: <cache>/demo/cartridge, replaced each run)",
    )
    demo.add_argument("--cache-dir", default=None, help="cache folder for models and the adapter")
    demo.add_argument("--max-passages", type=int, default=400, help="corpus passages read")
    demo.add_argument(
        "--max-positions", type=int, default=12000, help="aligned positions recorded for the bridge"
    )
    demo.add_argument("--eval-limit", type=int, default=200, help="test tweets per configuration")
    demo.set_defaults(handler=_demo)

    run = commands.add_parser("transfer", help="carry an adapter to a target model")
    run.add_argument("--source", required=True, help="model the adapter was trained on")
    run.add_argument("--target", required=True, help="model to carry the adapter to")
    run.add_argument("--adapter", required=True, help="PEFT LoRA folder trained on the source")
    _add_corpus_options(
        run,
        max_passages=None,
        passages_help="corpus passages read (default: 400, no limit with --corpus-tokens)",
    )
    _add_scale_options(run)
    run.add_argument("--out", required=True, help="cartridge folder to write")
    run.add_argument("--bridge", default=None, help="reuse a saved bridge instead of fitting one")
    run.add_argument("--save-bridge", default=None, help="also save the fitted bridge here")
    run.add_argument("--max-tokens", type=int, default=128, help="source tokens per passage")
    run.add_argument(
        "--max-positions",
        type=int,
        default=None,
        help="aligned positions recorded (default: 12000, no limit with --corpus-tokens)",
    )
    run.add_argument(
        "--head",
        choices=["mlp", "linear"],
        default="mlp",
        help="head type: ridge + residual MLP (default) or ridge only",
    )
    run.add_argument("--mlp-hidden", type=int, default=128, help="hidden width of the MLP heads")
    run.add_argument(
        "--mlp-steps", type=int, default=150, help="Adam steps per MLP head (default: 150)"
    )
    run.add_argument("--seed", type=int, default=0, help="seed of the validation split and MLPs")
    _add_output_options(run, pickle=True)
    _add_model_options(run)
    run.set_defaults(handler=_transfer)

    generate = commands.add_parser("generate", help="generate text with a cartridge attached")
    generate.add_argument("--target", required=True, help="the cartridge's target model")
    generate.add_argument("--cartridge", required=True, help="cartridge folder")
    generate.add_argument("--prompt", required=True, help="prompt text")
    generate.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate")
    generate.add_argument(
        "--scale", type=float, default=1.0, help="multiplier on the carried delta (default 1.0)"
    )
    generate.add_argument("--compare", action="store_true", help="also print the base output")
    _add_model_options(generate)
    generate.set_defaults(handler=_generate)

    _add_bake_parser(commands)
    _add_refine_parser(commands)
    _add_distil_parser(commands)

    info = commands.add_parser("info", help="print a cartridge's sites, anchors and held-out R²")
    info.add_argument("cartridge", help="cartridge folder")
    info.set_defaults(handler=_info)

    evaluate = commands.add_parser("eval", help="score a task on base, adapter and cartridge")
    evaluate.add_argument(
        "--task",
        required=True,
        help="sentiment, arithmetic, shakespeare, or a .jsonl file of a user task",
    )
    evaluate.add_argument("--target", required=True, help="target model")
    evaluate.add_argument("--cartridge", default=None, help="cartridge folder for the target")
    evaluate.add_argument("--source", default=None, help="source model (adds its rows)")
    evaluate.add_argument("--adapter", default=None, help="PEFT adapter for the source")
    evaluate.add_argument(
        "--split",
        choices=["validation", "test"],
        default="test",
        help="held-out split (default: test)",
    )
    evaluate.add_argument("--split-seed", type=int, default=0, help="seed of the task splits")
    evaluate.add_argument("--limit", type=int, default=200, help="examples scored")
    _add_model_options(evaluate)
    evaluate.set_defaults(handler=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.INFO
    if args.verbose:
        level = logging.DEBUG
    elif args.quiet:
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not hasattr(args, "dtype"):
        args.dtype, args.device, args.trust_remote_code = "float32", None, False
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"loracast: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
