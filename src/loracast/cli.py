"""The ``loracast`` command line: each subcommand is a few lines over the library."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from loracast import __version__
from loracast.cli_behaviour import add_distil_parser, add_refine_parser
from loracast.cli_options import (
    add_corpus_options,
    add_model_options,
    add_output_options,
    add_scale_options,
    corpus_from_args,
    load_from_args,
)

logger = logging.getLogger("loracast")


def _transfer(args) -> int:
    from loracast.bridge import BridgeConfig
    from loracast.distributed import process_context
    from loracast.fit import HeadFitConfig
    from loracast.streaming import ShardConfig

    # A token budget replaces the default limits on passages and positions.
    budget = args.corpus_tokens
    max_passages = args.max_passages if args.max_passages or budget else 400
    max_positions = args.max_positions if args.max_positions or budget else 12000
    config = BridgeConfig(
        max_tokens=args.max_tokens,
        max_positions=max_positions,
        corpus_tokens=budget,
        layer_map=args.layer_map,
        head=HeadFitConfig(
            mlp_hidden=0 if args.head == "linear" else args.mlp_hidden, mlp_steps=args.mlp_steps
        ),
        seed=args.seed,
    )
    shard_config = ShardConfig(args.shard_megabytes, args.storage_dtype)
    context = process_context(args.device)
    try:
        return _transfer_in(args, config, shard_config, context, max_passages)
    finally:
        context.close()


def _transfer_in(args, config, shard_config, context, max_passages) -> int:
    """Run the transfer of ``_transfer`` in this process of the group ``context``."""
    from loracast.bridge import Bridge
    from loracast.transfer import transfer

    bridge = Bridge.load(args.bridge) if args.bridge else None
    corpus = corpus_from_args(args, max_passages) if bridge is None else None
    source = load_from_args(args, args.source, context.device)
    target = load_from_args(args, args.target, context.device)
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

    target = load_from_args(args, args.target)
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
    source = load_from_args(args, args.source) if args.source else None
    target = load_from_args(args, args.target)
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
    target = load_from_args(args, args.target)
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
    add_corpus_options(baking, max_passages=200)
    baking.add_argument("--max-tokens", type=int, default=128, help="target tokens per passage")
    baking.add_argument(
        "--max-positions", type=int, default=4000, help="token positions recorded per anchor"
    )
    add_output_options(baking, pickle=False)
    add_model_options(baking)
    baking.set_defaults(handler=_bake)


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
    add_corpus_options(
        run,
        max_passages=None,
        passages_help="corpus passages read (default: 400, no limit with --corpus-tokens)",
    )
    add_scale_options(run)
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
    run.add_argument(
        "--layer-map",
        choices=["relative-depth", "cka"],
        default="relative-depth",
        help="match layers by equal relative depth (default) or by the linear CKA of the "
        "residual streams on the corpus; cka records in memory only (no --record-dir)",
    )
    run.add_argument("--mlp-hidden", type=int, default=128, help="hidden width of the MLP heads")
    run.add_argument(
        "--mlp-steps", type=int, default=150, help="Adam steps per MLP head (default: 150)"
    )
    run.add_argument("--seed", type=int, default=0, help="seed of the validation split and MLPs")
    add_output_options(run, pickle=True)
    add_model_options(run)
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
    add_model_options(generate)
    generate.set_defaults(handler=_generate)

    _add_bake_parser(commands)
    add_refine_parser(commands)
    add_distil_parser(commands)

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
    add_model_options(evaluate)
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
