"""Options and model loading shared by the ``loracast`` subcommands."""

from __future__ import annotations

import argparse


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Add the dtype, device, cache and remote-code options that ``load_from_args`` reads."""
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


def add_corpus_options(
    parser: argparse.ArgumentParser, max_passages: int | None, passages_help: str | None = None
) -> None:
    """Add the general-corpus options and ``--max-passages`` with its default."""
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


def add_scale_options(parser: argparse.ArgumentParser) -> None:
    """Add the recording options of large corpora: streaming, shards and resuming."""
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


def add_output_options(parser: argparse.ArgumentParser, *, pickle: bool) -> None:
    """Add ``--overwrite`` and, for commands that read an adapter, ``--allow-pickle``."""
    if pickle:
        parser.add_argument(
            "--allow-pickle",
            action="store_true",
            help="accept an adapter saved as a pickle file (can run code)",
        )
    parser.add_argument("--overwrite", action="store_true", help="replace the output folder")


def load_from_args(args, name, device=None):
    """Load model ``name`` with the options of ``add_model_options``."""
    from loracast.models import load_model

    return load_model(
        name,
        dtype=args.dtype,
        device=device or args.device,
        cache=args.cache_dir,
        trust_remote_code=args.trust_remote_code,
    )


def corpus_from_args(args, max_passages: int | None):
    """Load the corpus of ``add_corpus_options``, as a stream when ``--record-dir`` is given."""
    from loracast.corpus import CorpusStream, load_corpus

    if getattr(args, "record_dir", None):
        return CorpusStream(
            args.corpus, args.text_field, args.corpus_split, max_passages=max_passages
        )
    return load_corpus(
        args.corpus, max_passages=max_passages, text_field=args.text_field, split=args.corpus_split
    )
