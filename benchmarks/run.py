"""Benchmark: gain recovered by every transfer method, per task and direction, in one run.

Usage:
    python benchmarks/run.py            # the full run that produces docs/benchmarks.*
    python benchmarks/run.py --quick    # a smoke test in a few minutes (numbers mean nothing)

Rows per (direction, task): source-base, source-adapter, target-base, target-retrained (a LoRA
retrained on the target with the same recipe and data), cartridge-mlp (one per bridge seed),
cartridge-linear (a purely linear bridge, model-stitching style), cartridge-mlp-cka (the first
MLP bridge's settings with layers matched by linear CKA of the residual streams on the corpus
instead of relative depth), baked (the first MLP
cartridge distilled into a plain PEFT LoRA by ``loracast.bake``), weight-projection (data-free,
Cross-LoRA style) and copy (only where shapes allow). One bridge is fitted per direction and
seed, on general text only, and carries every task's adapter without refitting.

Cached artifacts (adapters, bridges) live under ``<cache>/bench/<key>``, where the key hashes
everything that produced them, so reruns are incremental and never stale.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import write_report  # noqa: E402
from tasks import TASKS, Scores  # noqa: E402

import loracast  # noqa: E402
from loracast.adapters import load_adapter  # noqa: E402
from loracast.bake import BAKE_FILE, BakeConfig, bake  # noqa: E402
from loracast.baselines import copy_transfer, weight_space_transfer  # noqa: E402
from loracast.bridge import Bridge, BridgeConfig, fit_bridge_from_recording, record_corpus  # noqa: E402
from loracast.cartridge import build_cartridge  # noqa: E402
from loracast.corpus import load_corpus  # noqa: E402
from loracast.eval.metrics import (  # noqa: E402
    bootstrap_ci,
    gain_recovered,
    negative_flips,
    retained,
    seed_summary,  # noqa: E402
)
from loracast.fit import HeadFitConfig  # noqa: E402
from loracast.models import load_model  # noqa: E402
from loracast.packages import cache_dir  # noqa: E402
from loracast.train import LoraRecipe, train_lora  # noqa: E402

logger = logging.getLogger("benchmark")

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("smollm2-135m-instruct", "gemma-3-270m")
# The bridge whose cartridge is baked into the ``baked`` row: the default transfer's heads.
BAKED_FROM = "cartridge-mlp-seed0"
# The MLP bridge whose layers are matched by linear CKA instead of relative depth.
CKA_BRIDGE = "cartridge-mlp-cka"


@dataclass
class Settings:
    """Sizes of one benchmark run."""

    n_train: int = 400
    n_test: int = 200
    # Language-model training scores every token against Gemma's 262k vocabulary: a step of 8
    # passages of 200 tokens took 62 s on 2 CPU cores, so the Shakespeare adapter trains on fewer.
    n_train_shakespeare: int = 128
    n_test_shakespeare: int = 64
    seeds: tuple[int, ...] = (0, 1, 2)
    corpus: str = "bbc-news"
    max_passages: int = 400
    max_positions: int = 10000
    mlp_hidden: int = 128
    mlp_steps: int = 150
    # Shakespeare passages (200-500 characters) run to about 150 tokens; the recipe allows 192.
    recipe: LoraRecipe = field(default_factory=lambda: LoraRecipe(max_length=192))
    speed_tokens: int = 2048

    def sizes(self, task: str) -> tuple[int, int]:
        """Return ``(n_train, n_test)`` for a task."""
        if task == "shakespeare":
            return self.n_train_shakespeare, self.n_test_shakespeare
        return self.n_train, self.n_test

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            n_train=16,
            n_test=12,
            n_train_shakespeare=8,
            n_test_shakespeare=4,
            seeds=(0,),
            max_passages=12,
            max_positions=600,
            mlp_hidden=16,
            mlp_steps=20,
            speed_tokens=256,
        )


def _key(payload: dict) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _train_adapter(loaded, task, examples, settings, cache) -> tuple[Path, float]:
    """Train (or reuse) the task adapter on ``loaded``; returns its folder and training time."""
    pairs = task.training_pairs(examples)
    key = _key(
        {
            "model": loaded.name,
            "fingerprint": loaded.fingerprint,
            "task": task.name,
            "n_train": settings.sizes(task.name)[0],
            "pairs": hashlib.sha256(json.dumps(pairs).encode()).hexdigest(),
            "recipe": settings.recipe.to_dict(),
            "loracast": loracast.__version__,
        }
    )
    folder = cache / "adapters" / f"{task.name}-{loaded.name}-{key}"
    if not (folder / "adapter_model.safetensors").exists():
        train_lora(
            loaded.model,
            loaded.tokenizer,
            pairs,
            settings.recipe,
            folder,
            base_model_name=loaded.name,
            overwrite=True,
            show_progress=False,
        )
    record = json.loads((folder / "training.json").read_text())
    return folder, float(record.get("wall_time_s", 0.0))


def _code_version() -> str:
    """Hash the evaluation code, so cached scores go stale when the code that made them changes."""
    files = sorted((ROOT / "src" / "loracast" / "eval").glob("*.py"))
    files.append(Path(__file__).resolve().parent / "tasks.py")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


class ScoreCache:
    """Per-example scores on disk, keyed by the task, its held-out set, the model and the method.

    ``artifact`` names what was attached (an adapter or bridge folder, whose names already hold
    the hash of what produced them), so a rerun evaluates only what is new.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.code = _code_version()

    def evaluate(self, task, loaded, examples, artifact, *, adapter=None, cartridge=None):
        payload = {
            "task": task.name,
            "examples": hashlib.sha256(
                "\x00".join(task.held_out_texts(examples)).encode()
            ).hexdigest(),
            "model": loaded.fingerprint,
            "artifact": artifact,
            "code": self.code,
            "loracast": loracast.__version__,
        }
        path = self.folder / f"{task.name}-{_key(payload)}.json"
        if path.exists():
            record = json.loads(path.read_text())
            scores = Scores(
                values=np.array(record["values"]),
                weights=None if record["weights"] is None else np.array(record["weights"]),
                correct=record["correct"],
            )
            return scores, record["seconds"]
        scores, seconds = _evaluate(task, loaded, examples, adapter=adapter, cartridge=cartridge)
        record = {
            "payload": payload,
            "values": scores.values.tolist(),
            "weights": None if scores.weights is None else scores.weights.tolist(),
            "correct": scores.correct,
            "seconds": seconds,
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(".tmp")
        staging.write_text(json.dumps(record))
        os.replace(staging, path)
        return scores, seconds


def _evaluate(task, loaded, examples, *, adapter=None, cartridge=None) -> tuple[Scores, float]:
    started = time.perf_counter()
    if adapter is not None:
        peft_model = PeftModel.from_pretrained(loaded.model, str(adapter))
        peft_model.eval()
        try:
            scores = task.evaluate(peft_model, loaded.tokenizer, examples)
        finally:
            loaded.model = peft_model.unload()
    elif cartridge is not None:
        with cartridge.attached(loaded):
            scores = task.evaluate(loaded.model, loaded.tokenizer, examples)
    else:
        scores = task.evaluate(loaded.model, loaded.tokenizer, examples)
    return scores, time.perf_counter() - started


def _tokens_per_second(loaded, n_tokens, *, adapter=None, cartridge=None) -> float:
    """Forward throughput on a fixed random batch, with a native LoRA or a cartridge."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (4, n_tokens // 4), generator=generator).to(loaded.device)
    model = loaded.model
    peft_model = None
    if adapter is not None:
        peft_model = PeftModel.from_pretrained(loaded.model, str(adapter))
        model = peft_model
    try:
        with torch.no_grad():
            context = cartridge.attached(loaded) if cartridge is not None else _null()
            with context:
                model(input_ids=ids[:, :8])  # warm-up
                started = time.perf_counter()
                model(input_ids=ids)
                seconds = time.perf_counter() - started
    finally:
        if peft_model is not None:
            loaded.model = peft_model.unload()
    return ids.numel() / seconds


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _fit_bridges(source, target, corpus, sites, settings, cache) -> tuple[dict, dict]:
    """Fit (or reuse) the bridge variants; returns bridges and costs.

    The variants are an MLP bridge per seed, one linear bridge and one MLP bridge whose layers
    are matched by linear CKA instead of relative depth (``loracast.layer_map``).
    """
    first = settings.seeds[0]
    variants = [
        (f"cartridge-mlp-seed{seed}", seed, settings.mlp_hidden, "relative-depth")
        for seed in settings.seeds
    ]
    variants.append(("cartridge-linear", first, 0, "relative-depth"))
    variants.append((CKA_BRIDGE, first, settings.mlp_hidden, "cka"))
    bridges, costs, recordings = {}, {}, {}
    for name, seed, mlp_hidden, layer_map in variants:
        config = BridgeConfig(
            layer_map=layer_map,
            max_positions=settings.max_positions,
            seed=seed,
            head=HeadFitConfig(mlp_hidden=mlp_hidden, mlp_steps=settings.mlp_steps, seed=seed),
        )
        key = _key(
            {
                "source": source.fingerprint,
                "target": target.fingerprint,
                "source_tok": source.tokenizer_fingerprint,
                "target_tok": target.tokenizer_fingerprint,
                "corpus": settings.corpus,
                "max_passages": settings.max_passages,
                "config": asdict(config),
                "sites": sorted(site.name for site in sites),
                "loracast": loracast.__version__,
            }
        )
        folder = cache / "bridges" / f"{source.name}-{target.name}-{name}-{key}"
        if (folder / "bridge.json").exists():
            bridges[name] = Bridge.load(folder)
        else:
            # Bridges with the same layer map share the anchors, so one recording serves them.
            if layer_map not in recordings:
                recordings[layer_map] = record_corpus(
                    source, target, corpus, sites, config, show_progress=False
                )
            bridge = fit_bridge_from_recording(
                source, target, recordings[layer_map], sites, config, show_progress=False
            )
            bridge.save(folder, overwrite=True)
            bridges[name] = bridge
        costs[name] = {
            "folder": folder.name,
            "record_seconds": bridges[name].stats.get("record_seconds"),
            "fit_seconds": bridges[name].stats.get("fit_seconds"),
        }
    return bridges, costs


def _row(direction, task, method, scores, base, retrained_scores, source_side, seconds):
    record = {
        "direction": direction,
        "task": task.name,
        "method": method,
        "metric": task.metric,
        "higher_is_better": task.higher_is_better,
        "score": scores.score,
        "eval_seconds": round(seconds, 2),
        "gain_recovered": None,
        "gain_recovered_ci": None,
        "retained": None,
        "negative_flips": None,
    }
    if not source_side and method not in ("target-base",):
        hib = task.higher_is_better
        record["gain_recovered"] = gain_recovered(
            scores.values,
            base.values,
            retrained_scores.values,
            higher_is_better=hib,
            weights=base.weights,
        )
        record["gain_recovered_ci"] = list(
            bootstrap_ci(
                scores.values,
                base.values,
                retrained_scores.values,
                higher_is_better=hib,
                weights=base.weights,
            )
        )
        record["retained"] = retained(
            scores.values, retrained_scores.values, higher_is_better=hib, weights=base.weights
        )
        if scores.correct is not None:
            record["negative_flips"] = negative_flips(base.correct, scores.correct)
    return record


def _check_corpus_overlap(corpus: list[str], held_out: list[str], n: int = 8) -> int:
    """Count held-out texts that share a word n-gram with the corpus (must be 0)."""

    def grams(text):
        words = text.lower().split()
        return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}

    corpus_grams = set()
    for passage in corpus:
        corpus_grams |= grams(passage)
    return sum(1 for text in held_out if grams(text) & corpus_grams)


def _train_task_adapters(source, target, corpus, tasks, settings, cache, costs):
    """Train (or reuse) each task's source adapter and retrained target LoRA."""
    adapters, splits = {}, {}
    for task in tasks:
        train, test = task.splits(0, *settings.sizes(task.name))
        splits[task.name] = (train, test)
        source_adapter, _ = _train_adapter(source, task, train, settings, cache)
        retrained, retrain_seconds = _train_adapter(target, task, train, settings, cache)
        adapters[task.name] = (source_adapter, retrained)
        overlap = _check_corpus_overlap(corpus, task.held_out_texts(test))
        costs["tasks"][task.name] = {
            "retrain_seconds": round(retrain_seconds, 1),
            "held_out_texts_sharing_8gram_with_corpus": overlap,
        }
    return adapters, splits


def _baseline_folders(source, target, source_adapter, cache, svd_cache, task_costs):
    """Build (or reuse) the weight-projection and, where shapes allow, the copy baseline."""
    direction = f"{source.name}->{target.name}"
    folders = {}
    projected = cache / "baselines" / f"weight-projection-{direction}-{source_adapter.name}"
    if not projected.exists():
        weight_space_transfer(source, target, source_adapter, projected, svd_cache=svd_cache)
    folders["weight-projection"] = projected
    copied = cache / "baselines" / f"copy-{direction}-{source_adapter.name}"
    try:
        if not copied.exists():
            copy_transfer(source, target, source_adapter, copied)
        folders["copy"] = copied
    except ValueError as error:
        task_costs["copy"] = f"not applicable: {error}"
    return folders


def _baked_folder(target, bridge_folder, source_adapter, cartridge, corpus, cache, task_costs):
    """Bake (or reuse) the default cartridge into a PEFT LoRA for the target."""
    config = BakeConfig()
    key = _key({"config": asdict(config), "loracast": loracast.__version__})
    folder = cache / "baked" / f"{bridge_folder}+{source_adapter.name}-{key}"
    if not (folder / "adapter_model.safetensors").exists():
        result = bake(
            cartridge, target, corpus, folder, config=config, overwrite=True, show_progress=False
        )
        errors = [anchor.relative_error for anchor in result.anchors]
        task_costs["bake"] = {
            "folder": folder.name,
            "seconds": round(result.seconds, 1),
            "relative_error_mean": sum(errors) / len(errors),
            "relative_error_worst": max(errors),
        }
    else:
        record = json.loads((folder / BAKE_FILE).read_text())
        errors = [anchor["relative_error"] for anchor in record["anchors"]]
        task_costs["bake"] = {
            "folder": folder.name,
            "seconds": record["seconds"],
            "relative_error_mean": sum(errors) / len(errors),
            "relative_error_worst": max(errors),
        }
    return folder


def _evaluate_task(task, test, source, target, adapters, bridges, context):
    """Evaluate every row of one task; returns ``{method: (scores, seconds)}``."""
    scores, cache, svd_cache, costs, _ = context
    source_adapter, retrained = adapters
    evaluations = {
        "source-base": scores.evaluate(task, source, test, "base"),
        "source-adapter": scores.evaluate(
            task, source, test, source_adapter.name, adapter=source_adapter
        ),
        "target-base": scores.evaluate(task, target, test, "base"),
        "target-retrained": scores.evaluate(task, target, test, retrained.name, adapter=retrained),
    }
    adapter = load_adapter(source_adapter)
    for name, bridge in bridges.items():
        artifact = f"{costs['bridges'][name]['folder']}+{source_adapter.name}"
        evaluations[name] = scores.evaluate(
            task, target, test, artifact, cartridge=build_cartridge(bridge, adapter)
        )
    task_costs = costs["tasks"][task.name]
    baked = _baked_folder(
        target,
        costs["bridges"][BAKED_FROM]["folder"],
        source_adapter,
        build_cartridge(bridges[BAKED_FROM], adapter),
        context[4],
        cache,
        task_costs,
    )
    evaluations["baked"] = scores.evaluate(task, target, test, baked.name, adapter=baked)
    for method, folder in _baseline_folders(
        source, target, source_adapter, cache, svd_cache, task_costs
    ).items():
        evaluations[method] = scores.evaluate(task, target, test, folder.name, adapter=folder)
    return evaluations


def run_direction(
    source_name, target_name, settings, cache, task_names, model_cache=None
) -> tuple[list, dict]:
    """Run every task and method for one direction; returns result rows and cost figures."""
    direction = f"{source_name}->{target_name}"
    source = load_model(source_name, cache=model_cache)
    target = load_model(target_name, cache=model_cache)
    corpus = load_corpus(settings.corpus, max_passages=settings.max_passages)
    rows, costs = [], {"direction": direction, "tasks": {}}

    tasks = [TASKS[name] for name in task_names]
    adapters, splits = _train_task_adapters(source, target, corpus, tasks, settings, cache, costs)
    sites = sorted(
        {site for folder, _ in adapters.values() for site in load_adapter(folder).kernels},
        key=lambda s: (s.layer, s.module),
    )
    bridges, costs["bridges"] = _fit_bridges(source, target, corpus, sites, settings, cache)
    costs["r2"] = {
        name: bridge.site_records()
        for name, bridge in bridges.items()
        if name.endswith("seed0") or name == "cartridge-linear"
    }

    # The base weights' SVDs are shared by every adapter's weight projection in this direction.
    context = (ScoreCache(cache / "scores"), cache, {}, costs, corpus)
    for task in tasks:
        _, test = splits[task.name]
        evaluations = _evaluate_task(
            task, test, source, target, adapters[task.name], bridges, context
        )
        base = evaluations["target-base"][0]
        reference = evaluations["target-retrained"][0]
        for method, (scores, seconds) in evaluations.items():
            source_side = method.startswith("source")
            rows.append(
                _row(direction, task, method, scores, base, reference, source_side, seconds)
            )

        source_adapter, retrained = adapters[task.name]
        first_bridge = bridges[f"cartridge-mlp-seed{settings.seeds[0]}"]
        cartridge = build_cartridge(first_bridge, load_adapter(source_adapter))
        costs["tasks"][task.name]["tokens_per_second"] = {
            "target-retrained": _tokens_per_second(
                target, settings.speed_tokens, adapter=retrained
            ),
            "cartridge": _tokens_per_second(target, settings.speed_tokens, cartridge=cartridge),
            "baked": _tokens_per_second(
                target,
                settings.speed_tokens,
                adapter=cache / "baked" / costs["tasks"][task.name]["bake"]["folder"],
            ),
        }
        logger.info("%s %s done", direction, task.name)
    return rows, costs


def _seed_rows(rows: list[dict], seeds) -> list[dict]:
    """Add one ``cartridge-mlp`` row per (direction, task): the mean and spread over seeds."""
    summary = []
    groups = {}
    for row in rows:
        if row["method"].startswith("cartridge-mlp-seed"):
            groups.setdefault((row["direction"], row["task"]), []).append(row)
    for members in groups.values():
        gains = [member["gain_recovered"] for member in members]
        first = members[0]
        # The interval stays the first seed's; gain_recovered_seeds gives the spread over seeds.
        summary.append(
            {
                **first,
                "method": "cartridge-mlp",
                "score": sum(m["score"] for m in members) / len(members),
                "gain_recovered": seed_summary(gains)["mean"],
                "gain_recovered_seeds": seed_summary(gains),
                "retained": sum(m["retained"] for m in members) / len(members),
            }
        )
    return summary


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            text=True,
            capture_output=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _machine() -> str:
    accelerator = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    cpu = platform.processor() or platform.machine()
    return (
        f"{cpu}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, {accelerator}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke testing")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument(
        "--directions",
        choices=["both", "forward"],
        default="both",
        help="forward: SmolLM2 -> Gemma-3 only",
    )
    parser.add_argument("--out", default=str(ROOT / "docs"), help="folder for the report")
    parser.add_argument("--cache-dir", default=None, help="loracast cache folder")
    args = parser.parse_args(argv)
    arguments = argv if argv is not None else sys.argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    # The commit is read before the run, so later commits made while it runs are not credited.
    commit = _commit()
    settings = Settings.quick() if args.quick else Settings()
    cache = cache_dir(args.cache_dir) / "bench"
    pairs = [MODELS] if args.directions == "forward" else [MODELS, MODELS[::-1]]
    started = time.perf_counter()
    rows, costs = [], []
    for source_name, target_name in pairs:
        direction_rows, direction_costs = run_direction(
            source_name, target_name, settings, cache, args.tasks, args.cache_dir
        )
        rows.extend(direction_rows)
        costs.append(direction_costs)
    rows.extend(_seed_rows(rows, settings.seeds))
    document = {
        "schema_version": 1,
        "machine": _machine(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "command": " ".join(["python", "benchmarks/run.py", *arguments]),
        "quick": args.quick,
        "settings": {**asdict(settings), "recipe": settings.recipe.to_dict()},
        "wall_seconds": round(time.perf_counter() - started, 1),
        "runs": rows,
        "costs": costs,
    }
    write_report(document, Path(args.out))
    print(f"report written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
