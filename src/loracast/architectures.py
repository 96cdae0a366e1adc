"""Module roles per model family, sites and anchors, and the default layer map.

A role is what a module does in a decoder layer: query (``q``), key (``k``), value (``v``),
attention output (``o``), or an MLP projection (``gate``, ``up``, ``down``). ``FAMILIES`` lists,
per ``model_type``, the path of the decoder layer list and the module that plays each role.
Several families fuse roles into one projection (GPT-2's ``c_attn``, GPT-NeoX's and Falcon's
``query_key_value``, Phi-3's ``qkv_proj`` and ``gate_up_proj``); their entry says which output
rows belong to which role.

A LoRA on a fused projection is split into one site per role. Each part keeps the kernel's
``A`` and the role's rows of ``B``, so the parts together compute exactly the original update.
Splitting, rather than carrying the fused update as a whole, lets a fused source meet a target
with separate projections and the reverse. It also gives each role its own decoder between
the query, key or value spaces of the two models, whose widths differ under grouped-query
attention, instead of one map that mixes them.

A site is matched to the target module with the same role in the mapped layer: its anchor. A
role the target lacks falls back first to ``ROLE_FALLBACKS`` (a non-gated MLP has one input
projection, ``up``, which replaces ``gate``), then to the module of the same block that writes
the residual stream (``o`` or ``down``). A site whose role is unknown (a source family
not in ``FAMILIES``), or whose target family is not in ``FAMILIES``, is carried to the output
of the mapped decoder layer, which is the residual stream itself.

To support a new family, add an entry to ``FAMILIES``. Its module paths are relative to one
decoder layer, and its layer list path is relative to the ``...ForCausalLM`` model.
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

logger = logging.getLogger(__name__)

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

# A role the target family lacks is carried to this role instead.
ROLE_FALLBACKS = {"gate": "up"}

# The module of each role's block that adds its output to the residual stream.
RESIDUAL_WRITERS = {
    "q": "o",
    "k": "o",
    "v": "o",
    "o": "o",
    "gate": "down",
    "up": "down",
    "down": "down",
}

DEFAULT_LAYERS = "model.layers"


@dataclass(frozen=True)
class FusedProjection:
    """A projection that computes several roles in one matrix product.

    Attributes:
        roles: the roles it computes, in the order of its output rows.
        rows: maps the model config to ``{role: LongTensor of output row indices}``.
    """

    roles: tuple[str, ...]
    rows: Callable[[object], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Family:
    """A model family's decoder layer list and the module that plays each role.

    Attributes:
        layers: path of the decoder layer list in the causal LM (``model.layers``).
        modules: role → module path inside a layer, for projections that compute one role.
        fused: module path inside a layer → layout, for projections that compute several.
    """

    layers: str
    modules: Mapping[str, str]
    fused: Mapping[str, FusedProjection] = field(default_factory=dict)

    def place(self, role: str) -> tuple[str, str | None] | None:
        """Return ``(module path, part)`` of the module computing ``role``, or None."""
        if role in self.modules:
            return self.modules[role], None
        for path, projection in self.fused.items():
            if role in projection.roles:
                return path, role
        return None


def _contiguous(widths: dict[str, int]) -> dict[str, torch.Tensor]:
    """Rows of roles stored one after another: ``[role 1 | role 2 | ...]``."""
    rows, start = {}, 0
    for role, width in widths.items():
        rows[role] = torch.arange(start, start + width)
        start += width
    return rows


def _per_head(heads: int, head_dim: int) -> dict[str, torch.Tensor]:
    """Rows interleaved per head: ``[q_0 k_0 v_0 | q_1 k_1 v_1 | ...]``, each ``head_dim`` wide."""
    starts = torch.arange(heads)[:, None] * 3 * head_dim  # (heads, 1)
    offsets = torch.arange(head_dim)
    return {
        role: (starts + index * head_dim + offsets).reshape(-1)
        for index, role in enumerate(("q", "k", "v"))
    }


def _gpt2_qkv(config) -> dict[str, torch.Tensor]:
    # GPT2Attention: c_attn(x).split(hidden_size, dim=2)
    width = config.hidden_size
    return _contiguous({"q": width, "k": width, "v": width})


def _gpt_neox_qkv(config) -> dict[str, torch.Tensor]:
    # GPTNeoXAttention: view(..., heads, 3 * head_size).chunk(3, dim=-1)
    heads = config.num_attention_heads
    return _per_head(heads, config.hidden_size // heads)


def _phi3_qkv(config) -> dict[str, torch.Tensor]:
    # Phi3Attention: [queries | keys | values], keys and values for num_key_value_heads heads.
    head_dim = getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    queries = config.num_attention_heads * head_dim
    keys = config.num_key_value_heads * head_dim
    return _contiguous({"q": queries, "k": keys, "v": keys})


def _phi3_gate_up(config) -> dict[str, torch.Tensor]:
    # Phi3MLP: gate_up_proj(x).chunk(2, dim=-1) gives the gate first.
    width = config.intermediate_size
    return _contiguous({"gate": width, "up": width})


def _falcon_qkv(config) -> dict[str, torch.Tensor]:
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    if config.new_decoder_architecture:
        # Per key-value group: the group's queries, then its key, then its value.
        groups = config.num_kv_heads
        per_group = heads // groups
        starts = torch.arange(groups)[:, None] * (per_group + 2) * head_dim  # (groups, 1)
        queries = starts + torch.arange(per_group * head_dim)
        keys = starts + per_group * head_dim + torch.arange(head_dim)
        values = starts + (per_group + 1) * head_dim + torch.arange(head_dim)
        return {"q": queries.reshape(-1), "k": keys.reshape(-1), "v": values.reshape(-1)}
    if config.multi_query:
        # All query heads, then one key head and one value head.
        return _contiguous({"q": heads * head_dim, "k": head_dim, "v": head_dim})
    return _per_head(heads, head_dim)


_LLAMA_LIKE = Family(
    layers="model.layers",
    modules={
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    },
)

_QKV = ("q", "k", "v")

# model_type → family. Module names checked against transformers 5.25's modeling files.
FAMILIES: dict[str, Family] = {
    **{
        model_type: _LLAMA_LIKE
        for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
    },
    "phi3": Family(
        layers="model.layers",
        modules={"o": "self_attn.o_proj", "down": "mlp.down_proj"},
        fused={
            "self_attn.qkv_proj": FusedProjection(_QKV, _phi3_qkv),
            "mlp.gate_up_proj": FusedProjection(("gate", "up"), _phi3_gate_up),
        },
    ),
    "phi": Family(
        layers="model.layers",
        modules={
            "q": "self_attn.q_proj",
            "k": "self_attn.k_proj",
            "v": "self_attn.v_proj",
            "o": "self_attn.dense",
            "up": "mlp.fc1",
            "down": "mlp.fc2",
        },
    ),
    "gpt2": Family(
        layers="transformer.h",
        modules={"o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"},
        fused={"attn.c_attn": FusedProjection(_QKV, _gpt2_qkv)},
    ),
    "gpt_neox": Family(
        layers="gpt_neox.layers",
        modules={"o": "attention.dense", "up": "mlp.dense_h_to_4h", "down": "mlp.dense_4h_to_h"},
        fused={"attention.query_key_value": FusedProjection(_QKV, _gpt_neox_qkv)},
    ),
    "opt": Family(
        layers="model.decoder.layers",
        modules={
            "q": "self_attn.q_proj",
            "k": "self_attn.k_proj",
            "v": "self_attn.v_proj",
            "o": "self_attn.out_proj",
            "up": "fc1",
            "down": "fc2",
        },
    ),
    "falcon": Family(
        layers="transformer.h",
        modules={
            "o": "self_attention.dense",
            "up": "mlp.dense_h_to_4h",
            "down": "mlp.dense_4h_to_h",
        },
        fused={"self_attention.query_key_value": FusedProjection(_QKV, _falcon_qkv)},
    ),
}

# "<layer list>.<index>[.<module>][:<part>]", such as "transformer.h.3.attn.c_attn:q".
_SITE_PATTERN = re.compile(
    r"^(?P<layers>[^:]+?)\.(?P<layer>\d+)(?:\.(?P<module>[^:]+))?(?::(?P<part>\w+))?$"
)


@dataclass(frozen=True)
class Site:
    """One adapted module, or one role's rows of a fused module, in one decoder layer.

    Attributes:
        layer: decoder layer index.
        module: module path inside the layer (``self_attn.q_proj``); empty for the layer's own
            output, the residual stream after the layer.
        layers: path of the decoder layer list in the model (``model.layers``, ``transformer.h``).
        part: for a fused projection, the role whose output rows this site covers.
    """

    layer: int
    module: str
    layers: str = DEFAULT_LAYERS
    part: str | None = None

    @property
    def module_name(self) -> str:
        """Full module name as in ``model.named_modules()``."""
        layer = f"{self.layers}.{self.layer}"
        return f"{layer}.{self.module}" if self.module else layer

    @property
    def name(self) -> str:
        """Unique name: ``module_name``, plus ``:<role>`` for a part of a fused projection."""
        return f"{self.module_name}:{self.part}" if self.part else self.module_name

    @property
    def is_layer_output(self) -> bool:
        return not self.module

    @property
    def sort_key(self) -> tuple[str, int, str, str]:
        return (self.layers, self.layer, self.module, self.part or "")

    def whole(self) -> Site:
        """Return the site of the whole module (without ``part``)."""
        return replace(self, part=None)


def parse_site(name: str) -> Site:
    """Split a site name such as ``model.layers.3.self_attn.q_proj`` into a site.

    The layer list is the path before the first numeric component, and a ``:<role>`` suffix
    names a part of a fused projection (``transformer.h.3.attn.c_attn:q``).

    Raises:
        ValueError: the name has no ``.<index>`` component, or its part is not a role.
    """
    match = _SITE_PATTERN.match(name)
    if match is None:
        raise ValueError(
            f"module {name!r} is not inside a decoder layer (expected '<layer list>.<index>."
            "<module>', such as 'model.layers.3.self_attn.q_proj'); loracast carries LoRAs on "
            "modules inside decoder layers only"
        )
    part = match["part"]
    if part is not None and part not in ROLES:
        raise ValueError(f"site {name!r} names part {part!r}; expected one of {ROLES}")
    return Site(int(match["layer"]), match["module"] or "", match["layers"], part)


def family_of(model: nn.Module) -> Family | None:
    """Return the model's entry in ``FAMILIES``, or None for a family not in the table."""
    return FAMILIES.get(getattr(model.config, "model_type", None))


_DISCOVERED_LAYERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _discover_layers(model: nn.Module) -> str:
    """Find the decoder layer list of a family not in ``FAMILIES``.

    It is the only ``nn.ModuleList`` with ``config.num_hidden_layers`` entries.
    """
    if model in _DISCOVERED_LAYERS:
        return _DISCOVERED_LAYERS[model]
    model_type = getattr(model.config, "model_type", None)
    count = getattr(model.config, "num_hidden_layers", None)
    candidates = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and count is not None and len(module) == count
    ]
    if len(candidates) != 1:
        found = "none" if not candidates else ", ".join(candidates)
        raise ValueError(
            f"model type {model_type!r} is not in loracast.architectures.FAMILIES, and its "
            f"decoder layer list could not be found (module lists with num_hidden_layers={count} "
            f"entries: {found}); add a Family entry for {model_type!r} to FAMILIES. Supported "
            f"types: {sorted(FAMILIES)}"
        )
    logger.info(
        "model type %r is not in FAMILIES; using %s as its decoder layer list",
        model_type,
        candidates[0],
    )
    _DISCOVERED_LAYERS[model] = candidates[0]
    return candidates[0]


def layers_path(model: nn.Module) -> str:
    """Return the path of the decoder layer list (``model.layers``, ``transformer.h``, ...).

    Raises:
        ValueError: the family is not in ``FAMILIES`` and no unique layer list was found.
    """
    family = family_of(model)
    return family.layers if family is not None else _discover_layers(model)


def num_layers(model: nn.Module) -> int:
    """Return the number of decoder layers."""
    return len(model.get_submodule(layers_path(model)))


def role_of(model: nn.Module, site: Site) -> str | None:
    """Return the role of a site in the model's family, or None when the table has none.

    A part of a fused projection has the role it names. A whole fused projection has several
    roles; split it with ``expand_sites`` first.

    Raises:
        ValueError: ``site`` is a whole fused projection.
    """
    if site.part is not None:
        return site.part
    family = family_of(model)
    if family is None or site.is_layer_output:
        return None
    if site.module in family.fused:
        raise ValueError(
            f"{site.name} computes the roles {family.fused[site.module].roles}; split it into "
            "one site per role with expand_sites() first"
        )
    for role, path in family.modules.items():
        if path == site.module:
            return role
    return None


def input_group(model: nn.Module, site: Site) -> str:
    """Return a name shared by the sites of one layer that read the same input."""
    role = role_of(model, site)
    return INPUT_GROUPS[role] if role is not None else f"module:{site.module}"


def expand_sites(model: nn.Module, sites: Iterable[Site]) -> list[Site]:
    """Split each site on a fused projection into one site per role, keeping the order."""
    family = family_of(model)
    expanded = []
    for site in sites:
        projection = family.fused.get(site.module) if family is not None else None
        if projection is None or site.part is not None:
            expanded.append(site)
        else:
            expanded.extend(replace(site, part=role) for role in projection.roles)
    return expanded


def output_rows(model: nn.Module, site: Site) -> torch.Tensor | None:
    """Return the output rows of a fused projection that ``site.part`` covers, or None.

    Raises:
        ValueError: ``site`` names a part, but its module is not a fused projection with that role.
    """
    if site.part is None:
        return None
    family = family_of(model)
    projection = family.fused.get(site.module) if family is not None else None
    if projection is None or site.part not in projection.roles:
        model_type = getattr(model.config, "model_type", None)
        raise ValueError(
            f"{site.name}: {site.module!r} is not a fused projection with role {site.part!r} in "
            f"the {model_type} table"
        )
    return projection.rows(model.config)[site.part]


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


def _matches_target(module_name: str, target: str) -> bool:
    # PEFT's rule for a list of target modules: the whole name, or a suffix after a dot.
    return module_name == target or module_name.endswith("." + target)


def lora_target_modules(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Return LoRA target modules for ``model``, mapping Llama-style names to its family's.

    Names that match a module of ``model`` (as PEFT matches them) are kept. A name that matches
    none but is a Llama-style projection name (``q_proj``, ``v_proj``, ``gate_proj``, ...) is
    replaced by the module of ``model``'s family with the same role, such as GPT-2's
    ``attn.c_attn`` for ``q_proj``. A fused module covers several roles, so a LoRA on it also
    changes the roles that share it.

    Raises:
        ValueError: no name matches a module of ``model``, even after mapping.
    """
    names = [name for name, _ in model.named_modules()]
    family = family_of(model)
    llama_roles = {path.rsplit(".", 1)[-1]: role for role, path in _LLAMA_LIKE.modules.items()}
    resolved: list[str] = []
    for target in targets:
        mapped = target
        if not any(_matches_target(name, target) for name in names):
            role = llama_roles.get(target)
            placed = family.place(role) if family is not None and role is not None else None
            if placed is None:
                logger.warning(
                    "LoRA target %r matches no module of this %s model; skipped",
                    target,
                    family_name(model),
                )
                continue
            mapped = placed[0]
            logger.info("LoRA target %r is %r in this %s model", target, mapped, family_name(model))
        if mapped not in resolved:
            resolved.append(mapped)
    if not resolved:
        linear = sorted(
            {
                name.rsplit(".", 1)[-1]
                for name, module in model.named_modules()
                if linear_shape(module) is not None
            }
        )
        raise ValueError(
            f"none of the LoRA target modules {list(targets)} is in this "
            f"{family_name(model)} model; pass module names from its linear layers: {linear}"
        )
    return resolved


def family_name(model: nn.Module) -> str:
    """Return the model's ``model_type``, or its class name when the config has none."""
    return str(getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__)


def _place(family: Family, role: str) -> tuple[str, str | None] | None:
    for candidate in (role, ROLE_FALLBACKS.get(role), RESIDUAL_WRITERS[role]):
        placed = family.place(candidate) if candidate is not None else None
        if placed is not None:
            return placed
    return None


def anchor_for(source: nn.Module, target: nn.Module, site: Site, layer_map: list[int]) -> Site:
    """Return the target module (anchor) that matches ``site``, in the mapped layer.

    The anchor has the site's role, else the fallback role, else the role's residual-stream
    writer. A site without a known role, or a target family not in ``FAMILIES``, gets the
    mapped layer's output.
    """
    layer = layer_map[site.layer]
    layers = layers_path(target)
    role = role_of(source, site)
    family = family_of(target)
    placed = _place(family, role) if role is not None and family is not None else None
    if placed is None:
        return Site(layer, "", layers)
    module, part = placed
    return Site(layer, module, layers, part)


def describe_role_changes(
    source: nn.Module, target: nn.Module, anchors: Mapping[Site, Site]
) -> list[str]:
    """Summarise the sites whose anchor has another role, as ``"<n> <role> sites → <role>"``."""
    counts: dict[tuple[str, str], int] = {}
    for site, anchor in anchors.items():
        before = role_of(source, site) or "unknown-role"
        after = role_of(target, anchor) or "layer output"
        if before != after:
            counts[(before, after)] = counts.get((before, after), 0) + 1
    return [f"{count} {before} sites → {after}" for (before, after), count in counts.items()]


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """Return ``(out_features, in_features)`` of a linear or GPT-2 Conv1D module, else None."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, Conv1D):
        # Conv1D stores its weight as (in_features, out_features).
        return module.weight.shape[1], module.weight.shape[0]
    return None


def linear_weight(module: nn.Module) -> torch.Tensor:
    """Return the weight of a linear or Conv1D module as ``(out_features, in_features)``."""
    if isinstance(module, Conv1D):
        return module.weight.T
    return module.weight
