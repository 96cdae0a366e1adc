"""Module roles per model family, sites and anchors, and the default layer map.

A role is what a module does in a decoder layer: query, key, value, attention output, or an
MLP projection. A LoRA site on the source is matched to the target module with the same role in
the mapped layer (its anchor).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

ROLES = ("q", "k", "v", "o", "gate", "up", "down")

# Roles whose modules read the same input inside a layer (one encoder serves them all).
INPUT_GROUPS = {
    "q": "attention",
    "k": "attention",
    "v": "attention",
    "gate": "mlp",
    "up": "mlp",
    "o": "o",
    "down": "down",
}

_LLAMA_LIKE = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}

# model_type -> (path of the decoder layer list, role -> module path inside a layer).
FAMILIES: dict[str, tuple[str, dict[str, str]]] = {
    model_type: ("model.layers", _LLAMA_LIKE)
    for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
}

_SITE_PATTERN = re.compile(r"^(?P<prefix>.*\.)?layers\.(?P<layer>\d+)\.(?P<module>.+)$")


@dataclass(frozen=True)
class Site:
    """One adapted module: a decoder layer index and the module path inside that layer."""

    layer: int
    module: str

    @property
    def name(self) -> str:
        """Full module name as in ``model.named_modules()`` for the families in ``FAMILIES``."""
        return f"model.layers.{self.layer}.{self.module}"


def family_of(model: nn.Module) -> tuple[str, dict[str, str]]:
    """Return ``(layers_path, role_table)`` for a model.

    Raises:
        ValueError: the model type has no entry in ``FAMILIES``.
    """
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"model type {model_type!r} is not supported yet; supported types: "
            f"{sorted(FAMILIES)}. Add its module names to loracast.architectures.FAMILIES."
        )
    return FAMILIES[model_type]


def num_layers(model: nn.Module) -> int:
    """Return the number of decoder layers."""
    layers_path, _ = family_of(model)
    return len(model.get_submodule(layers_path))


def role_of(model: nn.Module, module: str) -> str:
    """Return the role of a module path inside a layer (``self_attn.q_proj`` → ``q``).

    Raises:
        ValueError: the module has no role in the model's family table.
    """
    _, table = family_of(model)
    for role, path in table.items():
        if path == module:
            return role
    raise ValueError(
        f"module {module!r} has no role in the {model.config.model_type} table "
        f"(known: {sorted(table.values())}); loracast carries q/k/v/o and MLP projections"
    )


def module_for_role(model: nn.Module, role: str) -> str:
    """Return the module path inside a layer that plays ``role`` in this model's family."""
    _, table = family_of(model)
    if role not in table:
        raise ValueError(f"role {role!r} is unknown; expected one of {list(table)}")
    return table[role]


def parse_site(module_name: str) -> Site:
    """Split a full module name such as ``model.layers.3.self_attn.q_proj`` into a site.

    Raises:
        ValueError: the name does not contain ``layers.<index>.``.
    """
    match = _SITE_PATTERN.match(module_name)
    if match is None:
        raise ValueError(
            f"module {module_name!r} is not inside a decoder layer (expected '...layers.N.MODULE')"
        )
    return Site(layer=int(match["layer"]), module=match["module"])


def relative_depth_layer_map(source_layers: int, target_layers: int) -> list[int]:
    """Map each source layer ``l`` to target layer ``round(l · (L_t − 1) / (L_s − 1))``."""
    if source_layers < 1 or target_layers < 1:
        raise ValueError(
            f"layer counts must be positive, got source={source_layers} target={target_layers}"
        )
    if source_layers == 1:
        return [0]
    ratio = (target_layers - 1) / (source_layers - 1)
    return [int(round(layer * ratio)) for layer in range(source_layers)]


def anchor_for(source: nn.Module, target: nn.Module, site: Site, layer_map: list[int]) -> Site:
    """Return the target module (anchor) with the same role as ``site``, in the mapped layer."""
    role = role_of(source, site.module)
    return Site(layer=layer_map[site.layer], module=module_for_role(target, role))
