"""The transfer pipeline: check the adapter, fit or reuse a bridge, bind a cartridge, save it."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loracast.adapters import load_adapter, validate_adapter
from loracast.bridge import Bridge, BridgeConfig, fit_bridge
from loracast.cartridge import Cartridge, build_cartridge
from loracast.corpus import CorpusStream
from loracast.distributed import ProcessContext
from loracast.shard_fit import fit_bridge_from_shards
from loracast.streaming import ShardConfig, record_shards

logger = logging.getLogger(__name__)


@dataclass
class TransferResult:
    """Output of ``transfer``: the cartridge, its folder, and stage wall times."""

    cartridge: Cartridge
    path: Path | None
    seconds: dict = field(default_factory=dict)

    @property
    def bridge(self) -> Bridge:
        return self.cartridge.bridge


def check_bridge(bridge: Bridge, source, target) -> None:
    """Raise ValueError when a saved bridge was fitted for other source or target models."""
    for side, loaded in (("source", source), ("target", target)):
        recorded = getattr(bridge, side)
        if recorded["fingerprint"] != loaded.fingerprint:
            raise ValueError(
                f"the bridge was fitted for {side} {recorded['name']!r} (fingerprint "
                f"{recorded['fingerprint']}), not for {loaded.name!r} ({loaded.fingerprint}); "
                "fit a new bridge for this model pair"
            )
        if recorded["tokenizer_fingerprint"] != loaded.tokenizer_fingerprint:
            raise ValueError(
                f"the bridge was fitted with another {side} tokenizer "
                f"({recorded['tokenizer_fingerprint']}, found {loaded.tokenizer_fingerprint}); "
                "fit a new bridge"
            )


def _fit_streamed(
    source, target, corpus, sites, config, record_dir, shard_config, context, show_progress
):
    record_shards(
        source,
        target,
        corpus,
        sites,
        record_dir,
        config,
        shard_config,
        context=context,
        show_progress=show_progress,
    )
    return fit_bridge_from_shards(
        source, target, record_dir, sites, config, context=context, show_progress=show_progress
    )


def transfer(
    source,
    target,
    adapter_path: str | Path,
    corpus: Sequence[str] | CorpusStream | None,
    out: str | Path | None,
    *,
    config: BridgeConfig | None = None,
    bridge: Bridge | None = None,
    record_dir: str | Path | None = None,
    shard_config: ShardConfig | None = None,
    context: ProcessContext | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
) -> TransferResult:
    """Carry a LoRA adapter from ``source`` to ``target``.

    Args:
        source, target: ``LoadedModel`` objects.
        adapter_path: PEFT LoRA folder trained on ``source``.
        corpus: general-text passages, or a ``CorpusStream`` (with ``record_dir``), for fitting
            a bridge; unused when ``bridge`` is given.
        out: folder to save the cartridge to (None: do not save).
        config: recording and fitting settings.
        bridge: an existing bridge for this model pair; it is reused without refitting.
        record_dir: record the corpus into shards in this folder and fit from them, resuming
            an interrupted recording or fit (see ``loracast.streaming``); None records in
            memory.
        shard_config: shard size and storage dtype, with ``record_dir``.
        context: this process's place among processes started by ``accelerate launch``; only
            the main process saves the cartridge.
        allow_pickle: accept an adapter saved as a pickle file.
        overwrite: replace ``out`` if it exists.
        show_progress: show progress bars.

    Returns:
        The cartridge, its folder and wall times (``record``, ``fit``, ``total``, in seconds).

    Raises:
        ValueError: the adapter does not fit the source, the bridge does not fit the models or
            lacks the adapter's sites, or no corpus was given.
        FileExistsError: ``out`` exists and ``overwrite`` is False.
    """
    started = time.perf_counter()
    out_path = Path(out).expanduser() if out is not None else None
    if out_path is not None and out_path.exists() and not overwrite:
        # Checked before hours of fitting, not only at the end.
        raise FileExistsError(
            f"output folder {out_path} exists; choose another or pass --overwrite"
        )

    adapter = load_adapter(adapter_path, allow_pickle=allow_pickle)
    validate_adapter(adapter, source.model)
    sites = sorted(adapter.kernels, key=lambda site: site.sort_key)

    context = context or ProcessContext()
    if bridge is None:
        if corpus is None or (isinstance(corpus, Sequence) and not corpus):
            raise ValueError("no corpus given: pass general-text passages or an existing bridge")
        if record_dir is not None:
            bridge = _fit_streamed(
                source,
                target,
                corpus,
                sites,
                config,
                record_dir,
                shard_config,
                context,
                show_progress,
            )
        elif isinstance(corpus, CorpusStream):
            raise ValueError("a CorpusStream is recorded to disk: pass record_dir as well")
        else:
            bridge = fit_bridge(source, target, corpus, sites, config, show_progress=show_progress)
    else:
        check_bridge(bridge, source, target)

    cartridge = build_cartridge(bridge, adapter)
    path = None
    if out_path is not None:
        context.main_first(lambda: cartridge.save(out_path, overwrite=overwrite))
        path = out_path
    seconds = {
        "record": bridge.stats.get("record_seconds"),
        "fit": bridge.stats.get("fit_seconds"),
        "total": round(time.perf_counter() - started, 2),
    }
    logger.info("transfer done in %.1f s", seconds["total"])
    return TransferResult(cartridge=cartridge, path=path, seconds=seconds)
