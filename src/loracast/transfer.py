"""The transfer pipeline: check the adapter, fit or reuse a bridge, bind a cartridge, save it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from loracast.adapters import load_adapter, validate_adapter
from loracast.bridge import Bridge, BridgeConfig, fit_bridge
from loracast.cartridge import Cartridge, build_cartridge

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


def transfer(
    source,
    target,
    adapter_path: str | Path,
    corpus: list[str] | None,
    out: str | Path | None,
    *,
    config: BridgeConfig | None = None,
    bridge: Bridge | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
) -> TransferResult:
    """Carry a LoRA adapter from ``source`` to ``target``.

    Args:
        source, target: ``LoadedModel`` objects.
        adapter_path: PEFT LoRA folder trained on ``source``.
        corpus: general-text passages for fitting a bridge; unused when ``bridge`` is given.
        out: folder to save the cartridge to (None: do not save).
        config: recording and fitting settings.
        bridge: an existing bridge for this model pair; it is reused without refitting.
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

    if bridge is None:
        if not corpus:
            raise ValueError("no corpus given: pass general-text passages or an existing bridge")
        bridge = fit_bridge(source, target, corpus, sites, config, show_progress=show_progress)
    else:
        check_bridge(bridge, source, target)

    cartridge = build_cartridge(bridge, adapter)
    path = cartridge.save(out_path, overwrite=overwrite) if out_path is not None else None
    seconds = {
        "record": bridge.stats.get("record_seconds"),
        "fit": bridge.stats.get("fit_seconds"),
        "total": round(time.perf_counter() - started, 2),
    }
    logger.info("transfer done in %.1f s", seconds["total"])
    return TransferResult(cartridge=cartridge, path=path, seconds=seconds)
