"""Fit a bridge from a recording on disk, in bounded memory, resumably, on one or more processes.

The ridge start of every head needs only second moments of its data, which are summed shard by
shard. Each process sums its share of the shards, and an all-reduce adds the shares. The
residual MLP trains on rows read through memory maps. Each process computes the loss on its
part of every batch, and ``DistributedDataParallel`` averages the gradients, so any number of
processes takes the same optimiser steps as one.

Every fitted head is saved at once as a checkpoint in ``<record folder>/fit-<key>/``, where the
key hashes the fitting settings. A killed fit continues with the first unsaved head when rerun,
and because each head seeds its own training, the result equals an uninterrupted fit's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from loracast.architectures import Site, output_rows
from loracast.bridge import (
    Bridge,
    BridgeConfig,
    _anchors,
    _columns,
    encoder_key,
    make_site_heads,
    model_identity,
    validation_texts,
)
from loracast.distributed import ProcessContext
from loracast.fit import train_residual_mlp
from loracast.heads import Head
from loracast.moments import Moments, ridge_head
from loracast.shards import ShardReader, tensor_key, write_json_atomic, write_safetensors_atomic
from loracast.streaming import check_sharded_layer_map

logger = logging.getLogger(__name__)

FIT_RECORD = "fit.json"


@dataclass
class RowSplit:
    """Training and validation rows of every shard, as local row indices.

    NOTE: the indices take 8 bytes per recorded position in every process, so they grow with
    the corpus. Everything else the fit keeps in memory is bounded by a shard or a head.
    """

    train: dict[int, torch.Tensor]
    val: dict[int, torch.Tensor]

    @property
    def n_train(self) -> int:
        return sum(len(rows) for rows in self.train.values())

    @property
    def n_val(self) -> int:
        return sum(len(rows) for rows in self.val.values())


def split_rows(reader: ShardReader, fraction: float, seed: int) -> RowSplit:
    """Hold out whole passages for validation, drawn as ``fit_bridge_from_recording`` draws them."""
    text_ids = {index: reader.text_ids(index) for index in reader.indices}
    distinct = torch.unique(torch.cat([torch.unique(ids) for ids in text_ids.values()]))
    held_out = validation_texts(distinct, fraction, seed)
    train, val = {}, {}
    for index, ids in text_ids.items():
        is_val = torch.isin(ids, held_out)
        train[index] = (~is_val).nonzero().squeeze(1)
        val[index] = is_val.nonzero().squeeze(1)
    return RowSplit(train=train, val=val)


@dataclass(frozen=True)
class HeadData:
    """The location of a head's samples ``(x, y)`` in the shards.

    Attributes:
        x_key, y_key: the shard tensors (see ``tensor_key``) that contain ``x`` and ``y``.
        x_columns, y_columns: the columns of ``x`` or ``y`` to keep, for a part of a fused
            projection whose module output contains every part's rows; None keeps all.
    """

    x_key: str
    y_key: str
    x_columns: torch.Tensor | None = None
    y_columns: torch.Tensor | None = None

    def load(self, reader: ShardReader, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return all of shard ``index``'s ``x`` and ``y`` rows, as float32."""
        data = reader.load(index, [self.x_key, self.y_key])
        x = _columns(data[self.x_key], self.x_columns)  # (rows, d_in)
        y = _columns(data[self.y_key], self.y_columns)  # (rows, d_out)
        return x, y

    def take(
        self, reader: ShardReader, index: int, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return rows ``rows`` of shard ``index``'s ``x`` and ``y``, read by mmap, as float32."""
        x = _columns(reader.take(index, self.x_key, rows), self.x_columns)
        y = _columns(reader.take(index, self.y_key, rows), self.y_columns)
        return x, y


def encoder_data(site: Site, anchor: Site) -> HeadData:
    """Return the location of an encoder's samples: the anchor's input to the site's input."""
    return HeadData(
        tensor_key("target", anchor.module_name, "input"),
        tensor_key("source", site.module_name, "input"),
    )


def decoder_data(source, target, site: Site, anchor: Site) -> HeadData:
    """Return the location of a decoder's samples: the site's output to the anchor's output.

    A part of a fused projection keeps only its own output columns of the recorded module.
    """
    return HeadData(
        tensor_key("source", site.module_name, "output"),
        tensor_key("target", anchor.module_name, "output"),
        x_columns=output_rows(source.model, site),
        y_columns=output_rows(target.model, anchor),
    )


def _head_moments(reader, split, data: HeadData, context) -> tuple[Moments, Moments]:
    """Sum a head's training and validation moments over all shards and processes."""
    device = context.device
    # Every process shifts by the mean of the first shard, so their sums can be added.
    first_x, first_y = data.load(reader, reader.indices[0])
    shift_x, shift_y = first_x.mean(0).to(device), first_y.mean(0).to(device)
    train, val = Moments.zeros(shift_x, shift_y), Moments.zeros(shift_x, shift_y)
    for index in reader.indices[context.rank :: context.world_size]:
        x, y = (tensor.to(device) for tensor in data.load(reader, index))  # (rows, d)
        train.add(x[split.train[index].to(device)], y[split.train[index].to(device)])
        val.add(x[split.val[index].to(device)], y[split.val[index].to(device)])
    train.all_reduce(context)
    val.all_reduce(context)

    for name, key in (("input", data.x_key), ("output", data.y_key)):
        sums = (train.sum_x, train.xx) if name == "input" else (train.sum_y, train.yy)
        if not all(torch.isfinite(value).all() for value in sums):
            raise ValueError(
                f"the rows recorded as {key} in {reader.folder} contain NaN or inf; the model "
                "overflows on this corpus, or float16 storage overflowed: load the models in "
                "float32 (--dtype float32), store in bfloat16 or float32 (--storage-dtype), or "
                "clean the corpus"
            )
    return train, val


class _TrainRows:
    """A head's training rows across shards, addressed by one index from 0 to ``count``."""

    def __init__(self, reader: ShardReader, split: RowSplit, data: HeadData) -> None:
        self.reader, self.split, self.data = reader, split, data
        self.indices = [index for index in reader.indices if len(split.train[index])]
        counts = torch.tensor([len(split.train[index]) for index in self.indices])
        self.ends = counts.cumsum(0)
        self.starts = self.ends - counts
        self.count = int(self.ends[-1]) if len(self.ends) else 0

    def take(self, rows: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(x, y)`` at the given row indices, in their order, as float32."""
        rows = rows.contiguous()
        position = torch.searchsorted(self.ends, rows, right=True)
        parts: list[list[torch.Tensor]] = [[], []]
        order = []
        for p in torch.unique(position).tolist():
            chosen = (position == p).nonzero().squeeze(1)
            index = self.indices[p]
            local = self.split.train[index][rows[chosen] - self.starts[p]]
            for part, tensor in zip(parts, self.data.take(self.reader, index, local), strict=True):
                part.append(tensor)
            order.append(chosen)
        restore = torch.argsort(torch.cat(order))
        x, y = (torch.cat(part)[restore].to(device) for part in parts)
        return x, y


def _train_mlp(head, reader, split, data, val, config, context, name) -> float:
    """Train the head's residual MLP on rows read from the shards, data-parallel."""
    rows = _TrainRows(reader, split, data)
    rank, world, device = context.rank, context.world_size, context.device
    total = (val.yy - val.sum_y**2 / val.n).sum()  # Σ (y − mean_val)², as r2_score pools it

    def batch_loss(mlp, index: torch.Tensor) -> torch.Tensor:
        # This process's part of the batch; DDP averages the parts' gradients over processes,
        # so the scale makes the average the gradient of the whole batch's mean squared error.
        x, y = rows.take(index[rank::world], device)
        with torch.no_grad():
            z = (x - head.in_mean) / head.in_std
            residual = (y - head.out_mean) / head.out_std - head.linear(z)
        error = (mlp(z) - residual).pow(2).sum()
        return error * world / (len(index) * head.d_out)

    def held_out_r2() -> float:
        squared_error = torch.zeros(1, dtype=torch.float64, device=device)
        for index in reader.indices[rank::world]:
            local = split.val[index]
            if len(local):
                x, y = (tensor.to(device) for tensor in data.take(reader, index, local))
                squared_error += (y - head(x)).pow(2).sum(dtype=torch.float64)
        context.all_reduce_sum(squared_error)
        return float(1.0 - squared_error / total.clamp_min(1e-12))

    return train_residual_mlp(
        head,
        batch_loss,
        held_out_r2,
        rows.count,
        config,
        name,
        wrap=context.data_parallel,
        all_finite=lambda loss: context.all_true(bool(torch.isfinite(loss))),
    )


def _save_head(path: Path, head: Head, metrics: dict) -> None:
    metadata = {"shape": json.dumps(head.shape_dict()), "metrics": json.dumps(metrics)}
    write_safetensors_atomic(path, head.state_dict(), metadata)


def _load_head(path: Path) -> tuple[Head, dict]:
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    head = Head(**json.loads(metadata["shape"]))
    head.load_state_dict(state, strict=True)
    head.requires_grad_(False)
    return head, json.loads(metadata["metrics"])


def _fitted_head(path, reader, split, data, config, context, name) -> tuple[Head, dict]:
    """Load a head from its checkpoint, or fit it and save the checkpoint."""
    if path.is_file():
        logger.debug("%s: loaded from checkpoint %s", name, path)
        return _load_head(path)
    train, val = _head_moments(reader, split, data, context)
    head, metrics = ridge_head(train, val, config.ridge_alphas, config.mlp_hidden)
    if head.mlp is not None and config.mlp_steps > 0:
        metrics["r2"] = _train_mlp(head, reader, split, data, val, config, context, name)
    head.requires_grad_(False)
    head = head.cpu()
    context.main_first(lambda: _save_head(path, head, metrics))
    return head, metrics


def _fit_folder(reader: ShardReader, config: BridgeConfig, context) -> Path:
    """Return the checkpoint folder of these fitting settings, created by the main process."""
    settings = {
        "head": asdict(config.head),
        "validation_fraction": config.validation_fraction,
        "seed": config.seed,
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = reader.folder / f"fit-{key}"
    record = {"recording_id": reader.manifest.recording_id, "settings": settings}

    def create_or_check() -> None:
        path = folder / FIT_RECORD
        if path.is_file():
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved.get("recording_id") != record["recording_id"]:
                raise ValueError(
                    f"checkpoints in {folder} belong to an earlier recording "
                    f"({saved.get('recording_id')}), not to the one in {reader.folder} "
                    f"({record['recording_id']}); delete {folder} to fit again"
                )
            return
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, record)

    context.main_first(create_or_check)
    return folder


def _check_recording(reader: ShardReader, identities: dict, anchors: dict[Site, Site]) -> None:
    identity = reader.manifest.identity
    for side, loaded in identities.items():
        recorded = identity[side]
        for key in ("fingerprint", "tokenizer_fingerprint"):
            if recorded[key] != loaded[key]:
                raise ValueError(
                    f"the recording in {reader.folder} was made with another {side} model "
                    f"({key} {recorded[key]}, this {side} has {loaded[key]}); load the "
                    "recorded models or record again"
                )
    site_modules = {site.module_name for site in anchors}
    anchor_modules = {anchor.module_name for anchor in anchors.values()}
    missing_source = sorted(site_modules - set(identity["site_modules"]))
    missing_target = sorted(anchor_modules - set(identity["anchor_modules"]))
    if missing_source or missing_target:
        raise ValueError(
            f"the recording in {reader.folder} has no activations for source modules "
            f"{missing_source} or target modules {missing_target}; record the corpus with "
            "these sites"
        )


def _file_stem(text: str) -> str:
    """Replace each character of ``text`` other than letters, digits, ``.``, ``_`` and ``-``.

    The replacement is ``-``. Module paths made of attribute names and list indices contain
    only letters, digits, ``_`` and ``.``, so the ``:`` of a fused part
    (``transformer.h.0.attn.c_attn:q``) becomes ``-`` and no two site names share a file name.
    """
    return re.sub(r"[^A-Za-z0-9._-]", "-", text)


def _checkpoint_names(key: tuple, site: Site) -> tuple[str, str]:
    """Return the checkpoint file names of a site's encoder (by its key) and decoder."""
    encoder = _file_stem("encoder-" + "-".join(str(item) for item in key))
    return f"{encoder}.safetensors", f"{_file_stem('decoder-' + site.name)}.safetensors"


def fit_bridge_from_shards(
    source,
    target,
    folder: str | Path,
    sites: Iterable,
    config: BridgeConfig | None = None,
    *,
    context: ProcessContext | None = None,
    show_progress: bool = True,
) -> Bridge:
    """Fit encoder and decoder heads per site from a recording on disk.

    On one process and the same rows, the bridge equals ``fit_bridge_from_recording``'s up to
    floating-point rounding. Under ``accelerate launch`` every process must call this with the
    same arguments, and every process returns the same bridge.

    Args:
        source, target: ``LoadedModel`` objects (the recorded models).
        folder: a record folder written by ``loracast.streaming.record_shards``.
        sites: the source sites to fit heads for; all must be recorded. A site on a fused
            projection is split into one site per role, as ``fit_bridge_from_recording`` does.
        config: fitting settings (``head``, ``validation_fraction``, ``seed``).
        context: this process's place among data-parallel processes (default: alone).
        show_progress: show a progress bar (main process only).

    Returns:
        The bridge, with ``stats`` from the recording plus ``train_positions``,
        ``validation_positions`` and ``fit_seconds``.

    Raises:
        FileNotFoundError: the folder has no manifest.
        ValueError: the recording is incomplete, was made with other models or without these
            sites, contains NaN or inf, or contains fewer than 2 passages.
    """
    config = config or BridgeConfig()
    context = context or ProcessContext()
    sites = list(sites)
    check_sharded_layer_map(config)
    reader = ShardReader(folder)
    layer_map, anchors = _anchors(source, target, sites)
    # Computed once: hashing a large vocabulary takes about a second.
    identities = {"source": model_identity(source), "target": model_identity(target)}
    _check_recording(reader, identities, anchors)
    split = split_rows(reader, config.validation_fraction, config.seed)
    checkpoints = _fit_folder(reader, config, context)

    started = time.perf_counter()
    encoders: dict = {}
    fitted = {}
    bar = tqdm(
        list(anchors.items()),
        desc="fitting heads",
        disable=not (show_progress and context.is_main),
    )
    for site, anchor in bar:
        key = encoder_key(source, target, site, anchor)
        encoder_file, decoder_file = _checkpoint_names(key, site)
        if key not in encoders:
            encoders[key] = _fitted_head(
                checkpoints / encoder_file,
                reader,
                split,
                encoder_data(site, anchor),
                config.head,
                context,
                f"{site.name} encoder",
            )
        decoder = _fitted_head(
            checkpoints / decoder_file,
            reader,
            split,
            decoder_data(source, target, site, anchor),
            config.head,
            context,
            f"{site.name} decoder",
        )
        fitted[site] = make_site_heads(source, target, site, anchor, encoders[key], decoder)

    stats = {
        **reader.manifest.stats,
        "train_positions": split.n_train,
        "validation_positions": split.n_val,
        "fit_seconds": round(time.perf_counter() - started, 2),
    }
    return Bridge(
        source=identities["source"],
        target=identities["target"],
        layer_map=layer_map,
        sites=fitted,
        config=asdict(config),
        stats=stats,
    )
