"""Read PEFT LoRA folders into kernels and validate them against the source model."""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from loracast.architectures import Site, layers_path, linear_shape, parse_site

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"

SUPPORTED = (
    "loracast carries PEFT LoRA adapters (peft_type 'LORA') on linear and GPT-2 Conv1D layers "
    "inside decoder layers, with or without rsLoRA, rank_pattern and alpha_pattern"
)

# LoraConfig fields that turn a LoRA into a variant whose update is not scale · B · A · x.
_UNSUPPORTED_VARIANTS = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "a bias on lora_B",
    "alora_invocation_tokens": "activated LoRA (aLoRA), active only after its invocation tokens",
    "use_qalora": "QALoRA (pooled inputs for quantized layers)",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA)",
    "kasa_config": "KaSA (learned singular values)",
    "monteclora_config": "MonteCLoRA (sampled updates)",
    "arrow_config": "Arrow routing between LoRAs",
}

# Initialisations that also change the base weights, so the adapter needs that modified base.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")


@dataclass
class Kernel:
    """A frozen LoRA update at one site: ``delta(x) = scale · B · A · x``."""

    A: torch.Tensor  # (r, d_in)
    B: torch.Tensor  # (d_out, r)
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def rows(self, index: torch.Tensor) -> Kernel:
        """Return the kernel for the output rows ``index`` only (one role of a fused module)."""
        return Kernel(A=self.A, B=self.B[index], scale=self.scale)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """Return the LoRA's contribution for inputs ``x`` of shape ``(..., d_in)``."""
        return (x @ self.A.T @ self.B.T) * self.scale


@dataclass
class Adapter:
    """A PEFT LoRA read from disk: its config and one kernel per site."""

    path: Path
    config: dict
    kernels: dict[Site, Kernel] = field(default_factory=dict)
    # Names of trained weights in the adapter that loracast does not carry (modules_to_save).
    not_carried: list[str] = field(default_factory=list)

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def modules(self) -> list[str]:
        """Module paths inside a layer that the adapter touches, sorted."""
        return sorted({site.module for site in self.kernels})


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"adapter folder {folder} has no {CONFIG_FILE}; pass a PEFT LoRA folder "
            "saved with save_pretrained()"
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    _check_lora_config(path, config)
    return config


def _check_lora_config(path: Path, config: dict) -> None:
    """Raise ValueError for a PEFT type or LoRA variant whose update loracast cannot carry."""
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise ValueError(
            f"{path}: peft_type is {config.get('peft_type')!r}, which is not supported; "
            f"{SUPPORTED}. AdaLoRA, LoHa, LoKr, IA3, VeRA, OFT, prompt and prefix tuning and the "
            "other PEFT types are not supported"
        )
    for key, variant in _UNSUPPORTED_VARIANTS.items():
        if config.get(key):
            raise ValueError(
                f"{path}: {key} is {config[key]!r}, which makes the adapter {variant}. This "
                f"variant is not supported: {SUPPORTED}"
            )
    init = str(config.get("init_lora_weights", "")).lower()
    if init.startswith(_BASE_CHANGING_INITS):
        raise ValueError(
            f"{path}: init_lora_weights is {config['init_lora_weights']!r}, an initialisation "
            "that also changes the base weights, so the adapter only works on its modified base. "
            "Convert it to a plain LoRA with save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...) and carry the converted folder"
        )


def _read_weights(folder: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    path = folder / WEIGHTS_FILE
    if path.is_file():
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise ValueError(
                f"{path} is not a readable safetensors file ({error}); the file is corrupt or "
                "truncated: save the adapter again"
            ) from error
    pickle_path = folder / PICKLE_WEIGHTS_FILE
    if pickle_path.is_file():
        if not allow_pickle:
            raise ValueError(
                f"{pickle_path} is a pickle file, which can run code when loaded; convert it to "
                f"{WEIGHTS_FILE}, or pass allow_pickle=True (--allow-pickle) if you trust it"
            )
        return torch.load(pickle_path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"adapter folder {folder} has no {WEIGHTS_FILE}")


def _scale(config: dict, module_name: str, rank: int) -> float:
    """Return PEFT's scale for a module: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA.

    ``alpha_pattern`` keys match as in PEFT's ``get_pattern_key``: the first key that matches
    the end of the module name, on a dot boundary, as a regular expression.
    """
    alpha = config.get("lora_alpha", rank)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            alpha = value
            break
    if config.get("use_rslora"):
        return alpha / math.sqrt(rank)
    return alpha / rank


def _weight_name(key: str) -> str:
    """Return a weight's name in the base model (``model.layers.0.self_attn.q_proj.bias``)."""
    # PEFT saves the trained bias of a LoRA-wrapped module under its base_layer.
    return key.removeprefix("base_model.model.").replace(".base_layer.", ".")


def _split_keys(
    path: Path, weights: dict[str, torch.Tensor]
) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Group the LoRA weights per module, and return them with the other weights' names."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    others = set()
    for key, tensor in weights.items():
        if ".lora_embedding_A" in key or ".lora_embedding_B" in key:
            module = key.split(".lora_embedding_")[0].removeprefix("base_model.model.")
            raise ValueError(
                f"{path}: the adapter has a LoRA on the embedding {module!r}, which cannot be "
                f"carried because it is tied to the source vocabulary: {SUPPORTED}"
            )
        part = next((name for name in ("lora_A", "lora_B") if f".{name}." in key), None)
        if part is None:
            others.add(_weight_name(key))
            continue
        module_key, _, tensor_name = key.partition(f".{part}.")
        if not tensor_name.endswith("weight"):
            raise ValueError(
                f"{path}: {key} is not a LoRA weight; adapters with lora_bias are not supported"
            )
        pairs.setdefault(module_key.removeprefix("base_model.model."), {})[part] = tensor.float()
    return pairs, sorted(others)


def load_adapter(path: str | Path, *, allow_pickle: bool = False) -> Adapter:
    """Read a PEFT LoRA folder into one kernel per site.

    Args:
        path: folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
        allow_pickle: also read ``adapter_model.bin`` (a pickle) when no safetensors file exists.

    Other trained weights in the folder (``modules_to_save``, biases trained with
    ``bias="all"`` or ``"lora_only"``, trainable tokens) are not carried: their names are listed
    in ``Adapter.not_carried`` and in one logged warning.

    Returns:
        The adapter, kernels in float32 on the CPU, one per adapted module (a fused projection
        is one kernel here; ``loracast.architectures.expand_sites`` splits it per role).

    Raises:
        FileNotFoundError: the folder or one of its files is missing.
        ValueError: the adapter is not a LoRA or is an unsupported LoRA variant (DoRA, aLoRA,
            a LoRA bias, ...), it adapts an embedding or a module outside the decoder layers,
            a file is corrupt, or the weights are incomplete.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} not found")
    config = _read_config(folder)
    weights = _read_weights(folder, allow_pickle)

    pairs, others = _split_keys(folder / WEIGHTS_FILE, weights)

    kernels: dict[Site, Kernel] = {}
    for name, parts in sorted(pairs.items()):
        if set(parts) != {"lora_A", "lora_B"}:
            raise ValueError(f"{folder / WEIGHTS_FILE}: {name} lacks lora_A or lora_B")
        A, B = parts["lora_A"], parts["lora_B"]
        try:
            site = parse_site(name)
        except ValueError as error:
            raise ValueError(f"{folder / WEIGHTS_FILE}: {error}") from error
        kernels[site] = Kernel(A=A, B=B, scale=_scale(config, name, A.shape[0]))
    if not kernels:
        raise ValueError(f"{folder / WEIGHTS_FILE} contains no lora_A/lora_B weights")

    unsaved = [
        module
        for module in config.get("modules_to_save") or []
        if not any(name.startswith(f"{module}.") for name in others)
    ]
    not_carried = others + unsaved
    if not_carried or config.get("trainable_token_indices"):
        logger.warning(
            "%s: these trained weights are not carried, only the LoRA weights are: %s%s",
            folder,
            ", ".join(not_carried) or "none",
            " (and trainable_token_indices)" if config.get("trainable_token_indices") else "",
        )
    return Adapter(path=folder, config=config, kernels=kernels, not_carried=not_carried)


def validate_adapter(adapter: Adapter, source: nn.Module) -> None:
    """Check that every site exists in the source model as a linear layer of matching shape.

    Raises:
        ValueError: a module is missing or its shape differs. The message names the module and
            both shapes, and states that the adapter was trained for another base model.
    """
    hint = (
        f"the adapter (base model {adapter.base_model!r}) was trained for another base model; "
        "pass the source model it was trained on"
    )
    layers = layers_path(source)
    for site, kernel in adapter.kernels.items():
        if site.layers != layers:
            raise ValueError(
                f"module {site.module_name} is not inside the source's decoder layers "
                f"({layers}.<index>): {hint}"
            )
        try:
            module = source.get_submodule(site.module_name)
        except AttributeError as error:
            raise ValueError(
                f"module {site.module_name} not found in the source model: {hint}"
            ) from error
        expected = linear_shape(module)
        if expected is None:
            raise ValueError(
                f"module {site.module_name} is a {type(module).__name__}, not a Linear or Conv1D "
                f"layer: {SUPPORTED}"
            )
        found = (kernel.B.shape[0], kernel.A.shape[1])
        if expected != found or kernel.B.shape[1] != kernel.A.shape[0]:
            raise ValueError(
                f"shape mismatch at {site.module_name}: the source module is (out={expected[0]}, "
                f"in={expected[1]}) but the adapter's B·A is (out={found[0]}, in={found[1]}): "
                f"{hint}"
            )
