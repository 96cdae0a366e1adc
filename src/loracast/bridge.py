"""A bridge: everything learned for one (source, target) pair, independent of any adapter.

For each source site the bridge contains the matched target anchor, an encoder from the anchor's
input space to the site's input space, a decoder from the site's output space to the anchor's
output space, and the site's base weight (used by nonlinear decoders to carry a change). A site
or anchor that is one role of a fused projection also stores the output rows of that role.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from loracast.architectures import (
    Site,
    anchor_for,
    describe_role_changes,
    expand_sites,
    input_group,
    linear_weight,
    num_layers,
    output_rows,
    parse_site,
    relative_depth_layer_map,
)
from loracast.capture import Recording, record_pair
from loracast.fit import HeadFitConfig, fit_head
from loracast.heads import Head
from loracast.layer_map import CKA_POSITIONS, LAYER_MAPS, cka_layer_map
from loracast.serialization import FORMAT_VERSION, provenance, read_folder, write_folder

logger = logging.getLogger(__name__)

BRIDGE_CONFIG = "bridge.json"
BRIDGE_WEIGHTS = "bridge.safetensors"


@dataclass
class BridgeConfig:
    """Settings for recording the corpus and fitting a bridge.

    Attributes:
        layer_map: how source layers map to target layers: ``relative-depth`` (equal relative
            depth) or ``cka`` (by the similarity of the residual streams on the corpus, see
            ``loracast.layer_map``, which compares ``CKA_POSITIONS`` aligned positions).
        max_tokens: source tokens read per corpus passage.
        batch_size: passages per forward pass while recording.
        max_positions: aligned positions recorded at most (None: no limit).
        corpus_tokens: source text tokens read from the corpus at most (None: no limit). The
            passage that reaches the limit is read whole.
        validation_fraction: share of passages held out to choose penalties and report R².
        head: settings for every encoder and decoder.
        seed: seed of the train/validation split.
    """

    layer_map: str = "relative-depth"
    max_tokens: int = 128
    batch_size: int = 8
    max_positions: int | None = 16000
    corpus_tokens: int | None = None
    validation_fraction: float = 0.1
    head: HeadFitConfig = field(default_factory=HeadFitConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.layer_map not in LAYER_MAPS:
            raise ValueError(f"layer_map must be one of {LAYER_MAPS}, got {self.layer_map!r}")
        if not 0.0 < self.validation_fraction < 0.5:
            raise ValueError(
                f"validation_fraction must be in (0, 0.5), got {self.validation_fraction}"
            )
        for name in ("max_tokens", "batch_size", "max_positions", "corpus_tokens"):
            value = getattr(self, name)
            optional = name in ("max_positions", "corpus_tokens")
            if (value is not None or not optional) and (value is None or value < 1):
                limit = "an integer >= 1 or None" if optional else "an integer >= 1"
                raise ValueError(f"{name} must be {limit}, got {value}")
        if isinstance(self.head, dict):
            self.head = HeadFitConfig(**self.head)


@dataclass
class SiteHeads:
    """The learned maps of one site.

    ``site_rows`` and ``anchor_rows`` are the output rows of a fused projection that the site or
    the anchor covers, or None for a whole module. ``source_weight`` has the site's rows only.
    """

    site: Site
    anchor: Site
    encoder: Head
    decoder: Head
    source_weight: torch.Tensor  # (d_out_source, d_in_source)
    source_bias: torch.Tensor | None
    metrics: dict
    site_rows: torch.Tensor | None = None  # (d_out_source,) long
    anchor_rows: torch.Tensor | None = None  # (d_out_target,) long


def model_identity(loaded) -> dict:
    """Return the identity recorded for a model: name, fingerprints and layer count."""
    return {
        "name": loaded.name,
        "model_type": loaded.model.config.model_type,
        "fingerprint": loaded.fingerprint,
        "tokenizer_fingerprint": loaded.tokenizer_fingerprint,
        "num_layers": num_layers(loaded.model),
    }


@dataclass
class Bridge:
    """Heads for a set of source sites, fitted for one (source, target) pair."""

    source: dict
    target: dict
    layer_map: list[int]
    sites: dict[Site, SiteHeads]
    config: dict
    stats: dict = field(default_factory=dict)

    def covers(self, sites: Sequence[Site]) -> list[Site]:
        """Return the given sites that this bridge has no heads for."""
        return [site for site in sites if site not in self.sites]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flatten every site's heads and base weight into named tensors."""
        tensors = {}
        for site, heads in self.sites.items():
            prefix = f"{site.name}."
            for key, value in heads.encoder.state_dict().items():
                tensors[prefix + "encoder." + key] = value
            for key, value in heads.decoder.state_dict().items():
                tensors[prefix + "decoder." + key] = value
            tensors[prefix + "source_weight"] = heads.source_weight
            if heads.source_bias is not None:
                tensors[prefix + "source_bias"] = heads.source_bias
            if heads.site_rows is not None:
                tensors[prefix + "site_rows"] = heads.site_rows
            if heads.anchor_rows is not None:
                tensors[prefix + "anchor_rows"] = heads.anchor_rows
        return tensors

    def site_records(self) -> list[dict]:
        """Return the JSON description of every site: anchor, head shapes and fit metrics."""
        return [
            {
                "site": site.name,
                "anchor": heads.anchor.name,
                "encoder": heads.encoder.shape_dict(),
                "decoder": heads.decoder.shape_dict(),
                "metrics": heads.metrics,
            }
            for site, heads in self.sites.items()
        ]

    def describe(self) -> dict:
        """Return the JSON-ready description of the bridge (everything but tensors)."""
        return {
            "source": self.source,
            "target": self.target,
            "layer_map": self.layer_map,
            "sites": self.site_records(),
            "bridge_config": self.config,
            "stats": self.stats,
        }

    def save(self, folder: str | Path, *, overwrite: bool = False) -> Path:
        """Save as ``bridge.json`` + ``bridge.safetensors``, atomically."""
        config = {
            "kind": "bridge",
            "format_version": FORMAT_VERSION,
            **self.describe(),
            "provenance": provenance(),
        }
        return write_folder(
            folder, BRIDGE_CONFIG, config, BRIDGE_WEIGHTS, self.tensors(), overwrite=overwrite
        )

    @classmethod
    def load(cls, folder: str | Path) -> Bridge:
        """Load a bridge saved with ``save``."""
        config, tensors = read_folder(folder, BRIDGE_CONFIG, BRIDGE_WEIGHTS, "bridge")
        return bridge_from_config(config, tensors)


def bridge_from_config(config: dict, tensors: dict[str, torch.Tensor]) -> Bridge:
    """Rebuild a bridge from its saved description and tensors."""
    sites = {}
    for record in config["sites"]:
        site, anchor = parse_site(record["site"]), parse_site(record["anchor"])
        prefix = f"{site.name}."
        encoder = _load_head(record["encoder"], tensors, prefix + "encoder.")
        decoder = _load_head(record["decoder"], tensors, prefix + "decoder.")
        sites[site] = SiteHeads(
            site=site,
            anchor=anchor,
            encoder=encoder,
            decoder=decoder,
            source_weight=tensors[prefix + "source_weight"],
            source_bias=tensors.get(prefix + "source_bias"),
            metrics=record.get("metrics", {}),
            site_rows=_load_rows(tensors, prefix + "site_rows", site, decoder.d_in),
            anchor_rows=_load_rows(tensors, prefix + "anchor_rows", anchor, decoder.d_out),
        )
    return Bridge(
        source=config["source"],
        target=config["target"],
        layer_map=list(config["layer_map"]),
        sites=sites,
        config=config.get("bridge_config", {}),
        stats=config.get("stats", {}),
    )


def _load_rows(tensors: dict, key: str, site: Site, width: int) -> torch.Tensor | None:
    """Read the output rows of a fused-projection part. Whole modules and older files have none."""
    rows = tensors.get(key)
    if (rows is None) != (site.part is None):
        raise ValueError(f"{key}: rows must be stored exactly for parts of fused projections")
    if rows is not None and tuple(rows.shape) != (width,):
        raise ValueError(f"{key}: {tuple(rows.shape)} rows stored, but the head is {width} wide")
    return rows


def _load_head(shape: dict, tensors: dict[str, torch.Tensor], prefix: str) -> Head:
    d_in, d_out = int(shape["d_in"]), int(shape["d_out"])
    mlp_hidden = int(shape.get("mlp_hidden", 0))
    # Check the recorded widths against the stored weight before allocating anything.
    weight = tensors[prefix + "linear.weight"]
    if tuple(weight.shape) != (d_out, d_in) or not 0 <= mlp_hidden <= 1 << 20:
        raise ValueError(
            f"{prefix}: head shape d_in={d_in}, d_out={d_out}, mlp_hidden={mlp_hidden} does not "
            f"match its stored weight {tuple(weight.shape)}"
        )
    head = Head(d_in, d_out, mlp_hidden)
    state = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
    head.load_state_dict(state, strict=True)
    head.requires_grad_(False)
    return head


def validation_texts(text_ids: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Draw the passages held out for validation from the distinct values of ``text_ids``.

    Raises:
        ValueError: fewer than 2 distinct passages, so none can be held out.
    """
    unique = torch.unique(text_ids)
    if len(unique) < 2:
        raise ValueError(
            f"the corpus yielded {len(unique)} usable passages; at least 2 are needed to hold "
            "some out for validation"
        )
    generator = torch.Generator().manual_seed(seed)
    shuffled = unique[torch.randperm(len(unique), generator=generator)]
    n_val = max(1, int(round(len(unique) * fraction)))
    return shuffled[:n_val]


def _split_by_text(recording: Recording, fraction: float, seed: int):
    text_ids = recording.text_ids
    is_val = torch.isin(text_ids, validation_texts(text_ids, fraction, seed))
    return (~is_val).nonzero().squeeze(1), is_val.nonzero().squeeze(1)


def choose_layer_map(
    source, target, corpus: Sequence[str], config: BridgeConfig, *, show_progress: bool = True
) -> list[int]:
    """Return the layer map of ``config.layer_map``: a target layer per source layer."""
    if config.layer_map == "cka":
        layer_map, _ = cka_layer_map(
            source,
            target,
            corpus,
            max_tokens=config.max_tokens,
            batch_size=config.batch_size,
            max_positions=CKA_POSITIONS,
            show_progress=show_progress,
        )
        return layer_map
    return relative_depth_layer_map(num_layers(source.model), num_layers(target.model))


def _anchors(
    source, target, sites: Sequence[Site], layer_map: list[int] | None = None
) -> tuple[list[int], dict[Site, Site]]:
    """Split fused sites per role, match each to its anchor, and warn about role changes.

    Without ``layer_map`` the layers are matched by relative depth.
    """
    if layer_map is None:
        layer_map = relative_depth_layer_map(num_layers(source.model), num_layers(target.model))
    if len(layer_map) != num_layers(source.model):
        raise ValueError(
            f"the layer map has {len(layer_map)} entries but the source has "
            f"{num_layers(source.model)} layers; record the corpus again with these models"
        )
    anchors = {
        site: anchor_for(source.model, target.model, site, layer_map)
        for site in expand_sites(source.model, sites)
    }
    changes = describe_role_changes(source.model, target.model, anchors)
    if changes:
        logger.warning(
            "the target (%s) has no module with the same role for some sites, so they are "
            "carried to the fallback role or the nearest module that writes the residual "
            "stream: %s",
            target.model.config.model_type,
            "; ".join(changes),
        )
    return layer_map, anchors


def recorded_modules(
    source, target, sites: Sequence[Site], layer_map: list[int] | None = None
) -> tuple[list[str], list[str]]:
    """Return the sorted module names to record: the sites in the source, anchors in the target.

    The parts of a fused projection share one module, which is recorded once. Without
    ``layer_map`` the layers are matched by relative depth.

    Raises:
        ValueError: a site's module has no matching role in the target.
    """
    _, anchors = _anchors(source, target, sites, layer_map)
    site_modules = sorted({site.module_name for site in anchors})
    anchor_modules = sorted({anchor.module_name for anchor in anchors.values()})
    return site_modules, anchor_modules


def record_corpus(
    source,
    target,
    corpus: Sequence[str],
    sites: Sequence[Site],
    config: BridgeConfig | None = None,
    *,
    show_progress: bool = True,
) -> Recording:
    """Record the sites and their anchors on a general corpus, for ``fit_bridge_from_recording``.

    The wall time is stored in ``recording.stats["record_seconds"]``.

    Raises:
        ValueError: a site's module has no matching role in the target, or the corpus yields no
            aligned position.
    """
    config = config or BridgeConfig()
    started = time.perf_counter()
    layer_map = choose_layer_map(source, target, corpus, config, show_progress=show_progress)
    site_names, anchor_names = recorded_modules(source, target, sites, layer_map)
    recording = record_pair(
        source,
        target,
        corpus,
        site_names,
        anchor_names,
        max_tokens=config.max_tokens,
        batch_size=config.batch_size,
        max_positions=config.max_positions,
        max_source_tokens=config.corpus_tokens,
        show_progress=show_progress,
    )
    recording.stats["record_seconds"] = round(time.perf_counter() - started, 2)
    recording.layer_map = layer_map
    return recording


def _check_finite(recording: Recording, site: Site, anchor: Site) -> None:
    """Raise ValueError naming the module whose recorded activations hold NaN or inf."""
    for side, name in (("source", site.module_name), ("target", anchor.module_name)):
        for kind, tensor in getattr(recording, side)[name].items():
            if not torch.isfinite(tensor).all():
                bad = int((~torch.isfinite(tensor)).any(dim=1).sum())
                raise ValueError(
                    f"the {side} {kind} recorded at {name} has NaN or inf in {bad} of "
                    f"{tensor.shape[0]} positions; the {side} model overflows on this corpus: "
                    "load it in float32 (--dtype float32) or clean the corpus"
                )


def fit_bridge_from_recording(
    source,
    target,
    recording: Recording,
    sites: Sequence[Site],
    config: BridgeConfig | None = None,
    *,
    show_progress: bool = True,
) -> Bridge:
    """Fit encoder and decoder heads per site on an existing recording.

    Several head variants (linear or MLP heads, other seeds) can be fitted from one recording.

    Raises:
        ValueError: the recording lacks a site or anchor, contains NaN or inf, or contains too
            few passages.
    """
    config = config or BridgeConfig()
    if recording.layer_map is None and config.layer_map != "relative-depth":
        raise ValueError(
            f"the recording has no layer map, so it cannot be fitted with layer_map="
            f"{config.layer_map!r}; record it with record_corpus and the same config"
        )
    layer_map, anchors = _anchors(source, target, sites, recording.layer_map)
    for site, anchor in anchors.items():
        if site.module_name not in recording.source or anchor.module_name not in recording.target:
            raise ValueError(
                f"the recording has no activations for {site.module_name} or its anchor "
                f"{anchor.module_name}; record the corpus with these sites"
            )
        _check_finite(recording, site, anchor)

    started = time.perf_counter()
    train, val = _split_by_text(recording, config.validation_fraction, config.seed)
    fitted = {}
    encoders: dict = {}
    for site, anchor in tqdm(
        list(anchors.items()), desc="fitting heads", disable=not show_progress
    ):
        fitted[site] = _fit_site(
            source, target, recording, site, anchor, (train, val), config.head, encoders
        )
    fit_seconds = time.perf_counter() - started

    stats = {
        **recording.stats,
        "train_positions": len(train),
        "validation_positions": len(val),
        "fit_seconds": round(fit_seconds, 2),
    }
    return Bridge(
        source=model_identity(source),
        target=model_identity(target),
        layer_map=layer_map,
        sites=fitted,
        config=asdict(config),
        stats=stats,
    )


def fit_bridge(
    source,
    target,
    corpus: Sequence[str],
    sites: Sequence[Site],
    config: BridgeConfig | None = None,
    *,
    show_progress: bool = True,
) -> Bridge:
    """Record both models on a general corpus and fit encoder and decoder heads per site.

    Args:
        source, target: ``LoadedModel`` objects.
        corpus: general-text passages (no task data).
        sites: source sites to build heads for (for example every site of an adapter).
        config: recording and fitting settings.
        show_progress: show progress bars.

    Returns:
        The fitted bridge, with per-site held-out R² in each ``SiteHeads.metrics`` and wall times
        (``record_seconds``, ``fit_seconds``) in ``stats``.

    Raises:
        ValueError: a site's module has no matching role in the target, or the corpus is too
            small.
    """
    recording = record_corpus(source, target, corpus, sites, config, show_progress=show_progress)
    return fit_bridge_from_recording(
        source, target, recording, sites, config, show_progress=show_progress
    )


def _columns(tensor: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """Keep the output columns of a fused-projection part, or all columns of a whole module."""
    return tensor if rows is None else tensor[:, rows]


def _fit_site(source, target, recording, site, anchor, split, head_config, encoders) -> SiteHeads:
    train, val = split
    site_data = recording.source[site.module_name]
    anchor_data = recording.target[anchor.module_name]
    x_t, x_s = anchor_data["input"], site_data["input"]
    y_s = _columns(site_data["output"], output_rows(source.model, site))  # (n, d_out_source)
    y_t = _columns(anchor_data["output"], output_rows(target.model, anchor))  # (n, d_out_target)

    key = encoder_key(source, target, site, anchor)
    if key not in encoders:
        encoders[key] = fit_head(
            x_t[train], x_s[train], x_t[val], x_s[val], head_config, name=f"{site.name} encoder"
        )
    decoder = fit_head(
        y_s[train], y_t[train], y_s[val], y_t[val], head_config, name=f"{site.name} decoder"
    )
    return make_site_heads(source, target, site, anchor, encoders[key], decoder)


def encoder_key(source, target, site: Site, anchor: Site) -> tuple[int, str, int, str]:
    """Return the key of a site's encoder: sites that read the same input share one encoder.

    The q, k and v sites of one layer, for example, read the same input, and share an encoder
    when their anchors read the same input too.
    """
    return (
        site.layer,
        input_group(source.model, site),
        anchor.layer,
        input_group(target.model, anchor),
    )


def make_site_heads(
    source,
    target,
    site: Site,
    anchor: Site,
    encoder_fit: tuple[Head, dict],
    decoder_fit: tuple[Head, dict],
) -> SiteHeads:
    """Bundle a site's fitted heads, their metrics, and the site's base weight and output rows.

    For a part of a fused projection the base weight and bias keep the part's rows only.
    """
    encoder, encoder_metrics = encoder_fit
    decoder, decoder_metrics = decoder_fit
    site_rows = output_rows(source.model, site)
    anchor_rows = output_rows(target.model, anchor)
    module = source.model.get_submodule(site.module_name)
    weight = linear_weight(module).detach().float().cpu().contiguous()  # (d_out, d_in_source)
    bias = module.bias.detach().float().cpu() if module.bias is not None else None
    if site_rows is not None:
        weight = weight[site_rows]
        bias = bias[site_rows] if bias is not None else None
    metrics = {f"encoder_{key}": value for key, value in encoder_metrics.items()}
    metrics.update({f"decoder_{key}": value for key, value in decoder_metrics.items()})
    logger.info(
        "%s -> %s: encoder R2 %.3f, decoder R2 %.3f",
        site.name,
        anchor.name,
        metrics["encoder_r2"],
        metrics["decoder_r2"],
    )
    return SiteHeads(
        site=site,
        anchor=anchor,
        encoder=encoder,
        decoder=decoder,
        source_weight=weight.clone(),
        source_bias=bias.clone() if bias is not None else None,
        metrics=metrics,
        site_rows=site_rows,
        anchor_rows=anchor_rows,
    )
