"""Streamed recording: a corpus stream's activations go to disk shard by shard, resumably.

The corpus is read in batches of ``BridgeConfig.batch_size`` passages, and consecutive batches
form a shard of about ``ShardConfig.shard_megabytes``. Every process reads and tokenizes the
whole stream, which is cheap next to the forward passes, so all processes agree on where shards
end and where the token and position limits stop the recording. Shard ``k`` is then run through
both models by process ``k mod world_size`` only. Each process keeps at most about three
shards' rows in memory (see ``ShardConfig``), whatever the corpus size.

A rerun with the same settings skips the shards that the manifest lists and records the rest,
so a killed recording continues from its last finished shard, and a finished one is reused.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from loracast.architectures import linear_shape
from loracast.bridge import BridgeConfig, model_identity, recorded_modules
from loracast.capture import BatchPlan, plan_batch, record_batch
from loracast.corpus import CorpusStream
from loracast.distributed import ProcessContext
from loracast.shards import (
    STORAGE_DTYPES,
    BackgroundWriter,
    Manifest,
    check_identity,
    remove_temporary_files,
    shard_file,
    tensor_key,
)

logger = logging.getLogger(__name__)


@dataclass
class ShardConfig:
    """Settings for recording into shards on disk.

    Attributes:
        shard_megabytes: size of the stored rows at which a shard is closed, in MiB (2**20
            bytes). Each process keeps up to three shards' worth in memory: one being written
            in the background, and the next one's rows before and after concatenation. A
            shard contains at least one batch, so a batch larger than this makes a larger
            shard.
        storage_dtype: dtype of the stored activations: ``float32``, ``float16`` or
            ``bfloat16``. The 16-bit types halve the disk space and round each value.
    """

    shard_megabytes: float = 256.0
    storage_dtype: str = "float32"

    def __post_init__(self) -> None:
        if not self.shard_megabytes > 0:
            raise ValueError(f"shard_megabytes must be positive, got {self.shard_megabytes}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ValueError(
                f"storage_dtype must be one of {sorted(STORAGE_DTYPES)}, got {self.storage_dtype!r}"
            )


def weights_fingerprint(model: torch.nn.Module, samples: int = 1024) -> str:
    """Hash up to ``samples`` evenly spaced values of every parameter, as float32.

    NOTE: a sample, not every weight: two models that differ only between sampled values get
    the same fingerprint.
    """
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        if parameter.device.type == "meta":
            continue
        flat = parameter.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        values = flat[::step][:samples].float().cpu()
        digest.update(f"{name}{tuple(parameter.shape)}".encode())
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()[:16]


def _model_record(loaded) -> dict:
    # The name (a path or hub id) is left out, so a moved model folder still resumes.
    identity = {key: value for key, value in model_identity(loaded).items() if key != "name"}
    identity["dtype"] = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    identity["weights_fingerprint"] = weights_fingerprint(loaded.model)
    return identity


def corpus_identity(corpus: CorpusStream | Sequence[str]) -> dict:
    """Return what fixes a corpus's passage sequence: a stream's settings or a list's hash.

    Raises:
        TypeError: ``corpus`` is neither a ``CorpusStream`` nor a sequence of strings.
    """
    if isinstance(corpus, CorpusStream):
        return {"stream": corpus.identity()}
    if isinstance(corpus, Sequence) and not isinstance(corpus, str):
        digest = hashlib.sha256()
        for passage in corpus:
            digest.update(passage.encode("utf-8") + b"\0")
        return {"passages": len(corpus), "sha256": digest.hexdigest()}
    raise TypeError(
        f"corpus must be a CorpusStream or a list of passages, got {type(corpus).__name__}"
    )


def check_sharded_layer_map(config: BridgeConfig) -> None:
    """Raise ValueError unless ``config`` matches layers by relative depth.

    The ``cka`` layer map needs the corpus in memory before recording, and a sharded recording
    reads a stream once.
    """
    if config.layer_map != "relative-depth":
        raise ValueError(
            f"layer_map={config.layer_map!r} is not supported with a record folder (shards); "
            "record in memory (no record folder, no --record-dir) or use layer_map="
            "'relative-depth'"
        )


def recording_identity(source, target, corpus, sites, config, shard_config) -> dict:
    """Return everything that fixes the recorded rows, as stored in the manifest."""
    site_modules, anchor_modules = recorded_modules(source, target, sites)
    recording = {
        key: getattr(config, key)
        for key in ("layer_map", "max_tokens", "batch_size", "max_positions", "corpus_tokens")
    }
    return {
        "source": _model_record(source),
        "target": _model_record(target),
        "corpus": corpus_identity(corpus),
        "site_modules": site_modules,
        "anchor_modules": anchor_modules,
        "recording": {**recording, **asdict(shard_config)},
    }


@dataclass
class _Progress:
    """Counters over the whole stream, equal in every process."""

    source_tokens: int = 0
    aligned_tokens: int = 0
    positions: int = 0
    texts: int = 0

    def token_room(self, config: BridgeConfig) -> int | None:
        if config.corpus_tokens is None:
            return None
        return config.corpus_tokens - self.source_tokens

    def exhausted(self, config: BridgeConfig) -> bool:
        room = self.token_room(config)
        if room is not None and room <= 0:
            return True
        return config.max_positions is not None and self.positions >= config.max_positions


def _recorded_widths(model: torch.nn.Module, name: str) -> tuple[int, int]:
    """Return ``(d_out, d_in)`` of a recorded linear or Conv1D module, or of a decoder layer.

    A decoder layer (the anchor of a family not in the role table) reads and writes the
    residual stream, ``hidden_size`` wide.
    """
    shape = linear_shape(model.get_submodule(name))
    if shape is not None:
        return shape
    width = getattr(model.config, "hidden_size", None)
    if width is None:
        width = model.get_input_embeddings().embedding_dim
    return width, width


def row_bytes(source, target, modules, dtype: torch.dtype) -> int:
    """Return the bytes one aligned position takes in a shard: every module's input and output."""
    size = torch.empty(0, dtype=dtype).element_size()
    total = 8  # the int64 text id
    for loaded, names in zip((source, target), modules, strict=True):
        for name in names:
            d_out, d_in = _recorded_widths(loaded.model, name)
            total += (d_in + d_out) * size
    return total


@dataclass
class _Shard:
    """The planned batches of one shard, and a hash of the passages they read."""

    first_passage: int
    plans: list[BatchPlan] = field(default_factory=list)
    digest: Any = field(default_factory=hashlib.sha256)

    @property
    def rows(self) -> int:
        return sum(len(plan.source_rows) for plan in self.plans)

    def summary(self) -> dict:
        return {
            "rows": self.rows,
            "texts": sum(len(plan.text_ids) for plan in self.plans),
            "source_tokens": sum(plan.source_tokens for plan in self.plans),
            "first_passage": self.first_passage,
            "text_sha256": self.digest.hexdigest(),
        }


def _plan_shard(source, target, batches, config, progress, max_rows) -> _Shard | None:
    """Plan consecutive batches as ``record_pair`` would, until ``max_rows`` rows are planned.

    Returns None when the stream or the limits are exhausted before the shard's first batch.
    """
    shard = None
    while not progress.exhausted(config):
        start, passages = next(batches, (None, None))
        if passages is None:
            break
        shard = shard or _Shard(first_passage=start)
        plan = plan_batch(
            source.tokenizer,
            target.tokenizer,
            list(enumerate(passages, start)),
            config.max_tokens,
            max_source_tokens=progress.token_room(config),
        )
        for text_id in plan.text_ids:
            shard.digest.update(passages[text_id - start].encode("utf-8") + b"\0")
        if not plan.text_ids:
            continue
        progress.source_tokens += plan.source_tokens
        progress.aligned_tokens += plan.aligned_tokens
        if config.max_positions is not None:
            plan.keep_rows(config.max_positions - progress.positions)
        if plan.source_rows:
            shard.plans.append(plan)
            progress.positions += len(plan.source_rows)
            progress.texts += len(plan.text_ids)
        if shard.rows >= max_rows:
            break
    return shard


def _batches(corpus, batch_size: int) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(index of the first passage, passages)`` for consecutive batches of a stream."""
    passages = iter(corpus)
    start = 0
    while batch := list(itertools.islice(passages, batch_size)):
        yield start, batch
        start += len(batch)


def _check_unchanged(recorded: dict, planned: dict, index: int, folder: Path) -> None:
    for key in ("rows", "texts", "source_tokens", "first_passage", "text_sha256"):
        if recorded.get(key) != planned[key]:
            raise ValueError(
                f"shard {index} in {folder} was recorded from other text ({key}: recorded "
                f"{recorded.get(key)!r}, now {planned[key]!r}); the corpus changed since. "
                "Restore the corpus, or pass a new --record-dir"
            )


def _to_cpu(store: dict, start: dict[str, int]) -> None:
    """Move the rows stored since ``start`` to the CPU: one copy per module and batch."""
    for name, entry in store.items():
        for parts in entry.values():
            for k in range(start.get(name, 0), len(parts)):
                parts[k] = parts[k].cpu()


def _record_shard(source, target, shard, modules, folder, index, config, writer) -> list[dict]:
    """Run both models on a shard's batches and start writing the rows to a safetensors file.

    Returns:
        The records of the shards whose files are now complete, this one or an earlier one.
    """
    site_names, anchor_names = modules
    record = {**shard.summary(), "index": index}
    if not shard.plans:
        return [{**record, "file": None, "bytes": 0}]
    dtype = STORAGE_DTYPES[config.storage_dtype]
    stores: tuple[dict, dict] = ({}, {})
    for plan in shard.plans:
        starts = [{name: len(entry["input"]) for name, entry in s.items()} for s in stores]
        record_batch(
            source, target, plan, site_names, anchor_names, *stores, dtype=dtype, store_device=None
        )
        for store, start in zip(stores, starts, strict=True):
            _to_cpu(store, start)

    tensors = {}
    for side, store in zip(("source", "target"), stores, strict=True):
        for name, entry in store.items():
            for kind, parts in entry.items():
                tensors[tensor_key(side, name, kind)] = torch.cat(parts)  # (rows, d)
                parts.clear()
    row_ids = [text_id for plan in shard.plans for text_id in plan.row_text_ids]
    tensors["text_ids"] = torch.tensor(row_ids, dtype=torch.long)
    return writer.submit(folder / shard_file(index), tensors, record)


def _open_manifest(folder: Path, identity: dict, context: ProcessContext) -> Manifest:
    """Create or check the manifest in the main process; every process then reads it."""

    def create_or_check() -> None:
        folder.mkdir(parents=True, exist_ok=True)
        manifest = Manifest.load(folder)
        if manifest is None:
            # Only unfinished files and fit checkpoints may precede the manifest.
            foreign = [
                path.name
                for path in folder.iterdir()
                if not path.name.endswith(".tmp") and not path.name.startswith("fit-")
            ]
            if foreign:
                raise ValueError(
                    f"record folder {folder} contains files but no manifest.json; pass an "
                    "empty or new --record-dir"
                )
            Manifest(identity).save(folder)
        else:
            check_identity(manifest, identity, folder)
        remove_temporary_files(folder)

    context.main_first(create_or_check)
    return Manifest.load(folder)


def _publish(manifest, records, folder, context, clock) -> None:
    """Add the shards every process finished to the manifest, written by the main process."""
    finished = [record for part in context.gather(records) for record in part]
    now = time.perf_counter()
    manifest.stats["record_seconds"] = round(
        manifest.stats.get("record_seconds", 0.0) + now - clock[0], 2
    )
    clock[0] = now
    for record in finished:
        record = dict(record)
        manifest.shards[record.pop("index")] = record
    if context.is_main and finished:
        manifest.save(folder)


def _finish(manifest, progress, folder, context, corpus_size) -> Manifest:
    if progress.positions == 0:
        raise ValueError(
            f"no aligned positions found in {corpus_size}; pass a corpus of ordinary prose "
            "(at least a few hundred words)"
        )
    manifest.complete = True
    manifest.stats.update(
        texts=progress.texts,
        positions=progress.positions,
        source_text_tokens=progress.source_tokens,
        aligned_fraction_of_source_tokens=progress.aligned_tokens / max(progress.source_tokens, 1),
        shards=len(manifest.shards),
    )
    if context.is_main:
        manifest.save(folder)
    context.barrier()
    logger.info(
        "recorded %d aligned positions from %d texts into %d shards in %s",
        progress.positions,
        progress.texts,
        len(manifest.shards),
        folder,
    )
    return manifest


def record_shards(
    source,
    target,
    corpus: CorpusStream | Sequence[str],
    sites: Iterable,
    folder: str | Path,
    config: BridgeConfig | None = None,
    shard_config: ShardConfig | None = None,
    *,
    context: ProcessContext | None = None,
    show_progress: bool = True,
) -> Manifest:
    """Record the sites and their anchors on a corpus into shards, resuming a killed run.

    Given the same passages and settings, the shards contain the rows ``record_corpus`` returns,
    in the same order.

    Args:
        source, target: ``LoadedModel`` objects, on this process's device.
        corpus: a ``CorpusStream`` or a list of passages.
        sites: source sites to record, with their anchors in the target.
        folder: the record folder; created when missing, resumed when it has a manifest.
        config: recording settings (``max_tokens``, ``batch_size``, ``max_positions``,
            ``corpus_tokens``).
        shard_config: shard size and storage dtype.
        context: this process's place among data-parallel processes (default: alone).
        show_progress: show a progress bar (main process only).

    Returns:
        The complete manifest.

    Raises:
        ValueError: the folder contains a recording made with other models, corpus, sites or
            settings; the corpus changed under a finished shard; or the corpus yields no
            aligned position.
    """
    config = config or BridgeConfig()
    shard_config = shard_config or ShardConfig()
    context = context or ProcessContext()
    sites = list(sites)
    folder = Path(folder).expanduser()
    check_sharded_layer_map(config)
    identity = recording_identity(source, target, corpus, sites, config, shard_config)
    manifest = _open_manifest(folder, identity, context)
    if manifest.complete:
        logger.info("reusing the complete recording in %s", folder)
        return manifest
    if manifest.shards:
        logger.info("resuming the recording in %s after %d shards", folder, len(manifest.shards))

    modules = (identity["site_modules"], identity["anchor_modules"])
    dtype = STORAGE_DTYPES[shard_config.storage_dtype]
    shard_bytes = shard_config.shard_megabytes * 2**20
    max_rows = max(1, int(shard_bytes / row_bytes(source, target, modules, dtype)))
    progress = _Progress()
    batches = _batches(corpus, config.batch_size)
    clock = [time.perf_counter()]
    bar = tqdm(
        total=config.corpus_tokens,
        desc="recording",
        unit="tok",
        disable=not (show_progress and context.is_main),
    )
    index, finished = 0, False
    with BackgroundWriter() as writer:
        while not finished:
            # One round: a shard per process, then the manifest lists the shards on disk.
            records = []
            for _ in range(context.world_size):
                before = progress.source_tokens
                shard = _plan_shard(source, target, batches, config, progress, max_rows)
                if shard is None:
                    finished = True
                    break
                if index in manifest.shards:
                    _check_unchanged(manifest.shards[index], shard.summary(), index, folder)
                elif index % context.world_size == context.rank:
                    records += _record_shard(
                        source, target, shard, modules, folder, index, shard_config, writer
                    )
                bar.update(progress.source_tokens - before)
                index += 1
            _publish(manifest, records, folder, context, clock)
        _publish(manifest, writer.wait(), folder, context, clock)
    bar.close()
    return _finish(manifest, progress, folder, context, f"{index} shards of corpus")
