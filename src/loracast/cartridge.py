"""A cartridge: a bridge's heads bound to one adapter's kernels, attached to the target.

Each anchor of the target gains ``D(scale · B · A · E(x))`` for every site mapped to it, where
``x`` is the anchor's input, ``E`` the encoder, ``D`` the decoder's carrying of a change, and
``A``, ``B``, ``scale`` the frozen LoRA kernel. Hooks add the delta to the anchor's output (to
the anchor's rows only, when the anchor is one role of a fused projection); they are removed on
``detach``, which restores the target's outputs exactly.

Several cartridges can be attached to one target at once. Each adds its own delta, computed
from the anchor's input, so each can be scaled, disabled or detached without the others.

NOTE: PEFT has an unrelated method named "Cartridges" (a trained KV prefix); this cartridge is
not a PEFT type.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from loracast.adapters import Adapter, Kernel
from loracast.architectures import Site, linear_shape, parse_site
from loracast.bridge import Bridge, SiteHeads, bridge_from_config
from loracast.capture import hook_input, hook_output, with_output
from loracast.models import LoadedModel, config_fingerprint
from loracast.serialization import (
    FORMAT_VERSION,
    FormatError,
    provenance,
    read_folder,
    write_folder,
)

logger = logging.getLogger(__name__)

CARTRIDGE_CONFIG = "cartridge.json"
CARTRIDGE_WEIGHTS = "cartridge.safetensors"


class CarriedSite(nn.Module):
    """One site's kernel between its encoder and decoder: maps an anchor input to a delta.

    A refined cartridge (``loracast.refine``) also contains two low-rank head corrections in the
    kernel's own subspace: ``read_correction`` ``(r, d_in_target)`` adds to the kernel's rank-r
    code what the encoder missed, read from the standardised anchor input, and
    ``write_correction`` ``(d_out_target, r)`` adds to the decoder what that code should write.
    The kernel itself stays frozen.
    """

    def __init__(self, heads: SiteHeads, kernel: Kernel) -> None:
        super().__init__()
        self.encoder = heads.encoder
        self.decoder = heads.decoder
        self.register_buffer("A", kernel.A.float().clone())  # (r, d_in_source)
        self.register_buffer("B", kernel.B.float().clone())  # (d_out_source, r)
        self.register_buffer("source_weight", heads.source_weight.float().clone())
        self.register_buffer(
            "source_bias", None if heads.source_bias is None else heads.source_bias.float().clone()
        )
        self.kernel_scale = float(kernel.scale)
        self.read_correction: nn.Parameter | None = None
        self.write_correction: nn.Parameter | None = None

    @property
    def is_refined(self) -> bool:
        return self.read_correction is not None

    def add_corrections(self) -> None:
        """Create zero head corrections, so the carried delta is unchanged until trained."""
        rank = self.A.shape[0]
        self.read_correction = nn.Parameter(torch.zeros(rank, self.encoder.d_in))
        self.write_correction = nn.Parameter(torch.zeros(self.decoder.d_out, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_source = self.encoder(x)  # (..., d_in_source)
        code = x_source @ self.A.T  # (..., r)
        if self.read_correction is not None:
            standardised = (x - self.encoder.in_mean) / self.encoder.in_std
            code = code + standardised @ self.read_correction.T
        change = code @ self.B.T * self.kernel_scale  # (..., d_out_source)
        if self.decoder.is_linear:
            delta = self.decoder.delta(x_source, change)
        else:
            base = F.linear(x_source, self.source_weight, self.source_bias)
            delta = self.decoder.delta(base, change)  # (..., d_out_target)
        if self.write_correction is not None:
            delta = delta + (code * self.kernel_scale) @ self.write_correction.T
        return delta


class Cartridge(nn.Module):
    """A carried adapter that attaches to the target model.

    Attributes:
        scale: multiplier on every carried delta, read at each forward pass.
        enabled: when False, attached hooks add nothing.
    """

    def __init__(self, bridge: Bridge, kernels: dict[Site, Kernel], adapter_info: dict) -> None:
        super().__init__()
        missing = bridge.covers(list(kernels))
        if missing:
            raise ValueError(
                f"the bridge has no heads for sites {[site.name for site in missing]}; fit a "
                "bridge on the adapter's modules (loracast transfer fits one), and bind kernels "
                "with build_cartridge, which splits kernels on fused projections per role"
            )
        self.bridge = bridge
        self.adapter_info = adapter_info
        # What refined the heads for this adapter (``loracast.refine``), or None.
        self.refinement: dict | None = None
        self.kernels = kernels
        self.carried = nn.ModuleDict()
        self.anchors: dict[str, list[str]] = {}
        self._anchor_sites: dict[str, Site] = {}
        self._anchor_rows: dict[str, torch.Tensor | None] = {}
        for site, kernel in sorted(kernels.items(), key=lambda item: item[0].sort_key):
            key = site.name.replace(".", "__")
            heads = bridge.sites[site]
            self.carried[key] = CarriedSite(heads, kernel)
            self.anchors.setdefault(heads.anchor.name, []).append(key)
            self._anchor_sites[heads.anchor.name] = heads.anchor
            self._anchor_rows[heads.anchor.name] = heads.anchor_rows
        self.requires_grad_(False)
        self.scale = 1.0
        self.enabled = True
        self._handles: list = []

    @property
    def target_identity(self) -> dict:
        return self.bridge.target

    @property
    def is_attached(self) -> bool:
        return bool(self._handles)

    def anchor_site(self, anchor: str) -> Site:
        """Return the anchor named ``anchor`` (a key of ``anchors``) as a site of the target."""
        return self._anchor_sites[anchor]

    def anchor_rows(self, anchor: str) -> torch.Tensor | None:
        """Return the output rows of a fused projection that ``anchor`` covers, or None."""
        return self._anchor_rows[anchor]

    def anchor_delta(self, anchor: str, x: torch.Tensor) -> torch.Tensor:
        """Return the summed delta of every site carried to ``anchor``, for anchor inputs ``x``.

        The delta covers the anchor's own rows: all outputs of a whole module, or the rows of
        one role of a fused projection.
        """
        total = None
        for key in self.anchors[anchor]:
            delta = self.carried[key](x)
            total = delta if total is None else total + delta
        return total * self.scale

    def check_target(self, target) -> None:
        """Raise ValueError when ``target`` is not the model this cartridge was fitted for."""
        model = target.model if isinstance(target, LoadedModel) else target
        expected = self.target_identity
        found = config_fingerprint(model)
        if found != expected["fingerprint"]:
            raise ValueError(
                f"this cartridge was fitted for target {expected['name']!r} "
                f"({expected['model_type']}, fingerprint {expected['fingerprint']}), but the "
                f"model given is {model.config.model_type} with fingerprint {found}; load the "
                "target the cartridge was made for, or carry the adapter again"
            )
        if isinstance(target, LoadedModel):
            tokenizer = target.tokenizer_fingerprint
            if tokenizer != expected["tokenizer_fingerprint"]:
                raise ValueError(
                    f"the target's tokenizer (fingerprint {tokenizer}) differs from the one the "
                    f"cartridge was fitted with ({expected['tokenizer_fingerprint']}); positions "
                    "would not align: use the tokenizer of "
                    f"{expected['name']!r}"
                )

    def attach(self, target) -> Cartridge:
        """Hook every anchor of ``target`` (a ``LoadedModel`` or a model); returns ``self``."""
        if self.is_attached:
            raise RuntimeError("cartridge is already attached; call detach() first")
        self.check_target(target)
        model = target.model if isinstance(target, LoadedModel) else target
        parameter = next(model.parameters())
        self.to(parameter.device)
        modules = {anchor: self._anchor_module(model, anchor) for anchor in self.anchors}
        for anchor, module in modules.items():
            rows = self._anchor_rows[anchor]
            rows = rows.to(parameter.device) if rows is not None else None
            hook = self._make_hook(anchor, rows)
            self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
        return self

    def _anchor_module(self, model: nn.Module, anchor: str) -> nn.Module:
        """Return the anchor's module, checking that a fused part's rows fit its output."""
        site = self._anchor_sites[anchor]
        module = model.get_submodule(site.module_name)
        rows = self._anchor_rows[anchor]
        shape = linear_shape(module)
        if rows is not None and (shape is None or int(rows.max()) >= shape[0]):
            raise ValueError(
                f"anchor {anchor} covers output rows up to {int(rows.max())}, but "
                f"{site.module_name} is a {type(module).__name__} of shape {shape}; the target's "
                "layout differs from the one the cartridge was fitted for: carry the adapter again"
            )
        return module

    def _make_hook(self, anchor: str, rows: torch.Tensor | None):
        def hook(module, args, kwargs, output):
            if not self.enabled or self.scale == 0:
                return None
            base = hook_output(output)
            delta = self.anchor_delta(anchor, hook_input(args, kwargs).float()).to(base.dtype)
            if rows is None:
                return with_output(output, base + delta)
            return with_output(output, base.index_add(-1, rows, delta))

        return hook

    def detach(self) -> None:
        """Remove every hook; the target then computes exactly its base outputs."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextmanager
    def attached(self, target) -> Iterator[Cartridge]:
        """Attach for the duration of a ``with`` block, detaching even on error."""
        self.attach(target)
        try:
            yield self
        finally:
            self.detach()

    def save(self, folder: str | Path, *, overwrite: bool = False) -> Path:
        """Save as ``cartridge.json`` + ``cartridge.safetensors``, atomically."""
        tensors = self.bridge.tensors()
        kernel_records = []
        for site, kernel in self.kernels.items():
            tensors[f"{site.name}.kernel.A"] = kernel.A
            tensors[f"{site.name}.kernel.B"] = kernel.B
            kernel_records.append({"site": site.name, "rank": kernel.rank, "scale": kernel.scale})
            carried = self.carried[site.name.replace(".", "__")]
            if carried.is_refined:
                tensors[f"{site.name}.read_correction"] = carried.read_correction.detach()
                tensors[f"{site.name}.write_correction"] = carried.write_correction.detach()
        config = {
            "kind": "cartridge",
            "format_version": FORMAT_VERSION,
            **self.bridge.describe(),
            "adapter": self.adapter_info,
            "kernels": kernel_records,
            "refinement": self.refinement,
            "provenance": provenance(),
        }
        return write_folder(
            folder, CARTRIDGE_CONFIG, config, CARTRIDGE_WEIGHTS, tensors, overwrite=overwrite
        )

    @classmethod
    def _from_saved(cls, config: dict, tensors: dict[str, torch.Tensor]) -> Cartridge:
        bridge = bridge_from_config(config, tensors)
        for side in ("source", "target"):
            identity = getattr(bridge, side)
            needed = ("name", "model_type", "fingerprint", "tokenizer_fingerprint")
            if not isinstance(identity, dict) or any(key not in identity for key in needed):
                raise ValueError(f"'{side}' must be an object with the keys {needed}")
        kernels = {}
        for record in config["kernels"]:
            site = parse_site(record["site"])
            kernels[site] = Kernel(
                A=tensors[f"{site.name}.kernel.A"],
                B=tensors[f"{site.name}.kernel.B"],
                scale=float(record["scale"]),
            )
        adapter_info = config.get("adapter") or {}
        if not isinstance(adapter_info, dict):
            raise TypeError(f"'adapter' must be an object, got {type(adapter_info).__name__}")
        cartridge = cls(bridge, kernels, adapter_info)
        cartridge.refinement = config.get("refinement")
        for site in kernels:
            if f"{site.name}.read_correction" in tensors:
                carried = cartridge.carried[site.name.replace(".", "__")]
                carried.add_corrections()
                carried.read_correction.data.copy_(tensors[f"{site.name}.read_correction"])
                carried.write_correction.data.copy_(tensors[f"{site.name}.write_correction"])
        cartridge.requires_grad_(False)
        return cartridge

    @classmethod
    def load(cls, folder: str | Path, target=None) -> Cartridge:
        """Load a saved cartridge; with ``target`` given, check it is the recorded target.

        Raises:
            FileNotFoundError: the folder or a file is missing.
            FormatError: the folder is malformed or of a newer format version.
            ValueError: ``target`` differs from the recorded target or tokenizer.
        """
        config, tensors = read_folder(folder, CARTRIDGE_CONFIG, CARTRIDGE_WEIGHTS, "cartridge")
        try:
            cartridge = cls._from_saved(config, tensors)
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as error:
            raise FormatError(f"{folder}: cartridge contents are inconsistent ({error})") from error
        if target is not None:
            cartridge.check_target(target)
        return cartridge


def build_cartridge(bridge: Bridge, adapter: Adapter) -> Cartridge:
    """Bind a bridge's heads to an adapter's kernels.

    A kernel on a fused projection is split into one kernel per role, each with its role's rows
    of ``B``, matching the bridge's sites.

    Raises:
        ValueError: the bridge has no heads for some of the adapter's modules.
    """
    parts: dict[Site, list[Site]] = {}
    for site in bridge.sites:
        parts.setdefault(site.whole(), []).append(site)
    missing = [site.name for site in adapter.kernels if site not in parts]
    if missing:
        raise ValueError(
            f"the bridge has no heads for sites {missing}; fit a bridge on the adapter's modules "
            "(loracast transfer fits one)"
        )
    kernels = {}
    for site, kernel in adapter.kernels.items():
        for part in parts[site]:
            rows = bridge.sites[part].site_rows
            kernels[part] = kernel if rows is None else kernel.rows(rows)
    info = {
        "path": str(adapter.path),
        "base_model_name_or_path": adapter.base_model,
        "r": adapter.config.get("r"),
        "lora_alpha": adapter.config.get("lora_alpha"),
        "use_rslora": bool(adapter.config.get("use_rslora")),
        "target_modules": adapter.modules,
        "not_carried": adapter.not_carried,
    }
    return Cartridge(bridge, kernels, info)
