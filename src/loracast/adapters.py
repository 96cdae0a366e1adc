"""Read PEFT LoRA folders into kernels and validate them against the source model."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from loracast.architectures import Site, parse_site

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"


@dataclass
class Kernel:
    """A frozen LoRA update at one site: ``delta(x) = scale · B · A · x``."""

    A: torch.Tensor  # (r, d_in)
    B: torch.Tensor  # (d_out, r)
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """Return the LoRA's contribution for inputs ``x`` of shape ``(..., d_in)``."""
        return (x @ self.A.T @ self.B.T) * self.scale


@dataclass
class Adapter:
    """A PEFT LoRA read from disk: its config and one kernel per site."""

    path: Path
    config: dict
    kernels: dict[Site, Kernel] = field(default_factory=dict)

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
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise ValueError(
            f"{path}: peft_type is {config.get('peft_type')!r}; loracast carries LoRA adapters "
            "(peft_type 'LORA') only"
        )
    if config.get("use_dora"):
        raise ValueError(f"{path}: use_dora is true; DoRA adapters are not supported yet")
    return config


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


def _scale(config: dict, module_key: str, rank: int) -> float:
    alpha = config.get("lora_alpha", rank)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if module_key.endswith(pattern):
            alpha = value
    if config.get("use_rslora"):
        return alpha / math.sqrt(rank)
    return alpha / rank


def load_adapter(path: str | Path, *, allow_pickle: bool = False) -> Adapter:
    """Read a PEFT LoRA folder into one kernel per site.

    Args:
        path: folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
        allow_pickle: also read ``adapter_model.bin`` (a pickle) when no safetensors file exists.

    Returns:
        The adapter, kernels in float32 on the CPU.

    Raises:
        FileNotFoundError: the folder or one of its files is missing.
        ValueError: the adapter is not a LoRA, a file is corrupt, or the weights are incomplete.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} not found")
    config = _read_config(folder)
    weights = _read_weights(folder, allow_pickle)

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in key:
                module_key = key.split(marker)[0]
                pairs.setdefault(module_key, {})[part] = tensor.float()

    kernels: dict[Site, Kernel] = {}
    for module_key, parts in sorted(pairs.items()):
        if set(parts) != {"lora_A", "lora_B"}:
            raise ValueError(f"{folder / WEIGHTS_FILE}: {module_key} lacks lora_A or lora_B")
        A, B = parts["lora_A"], parts["lora_B"]
        name = module_key.removeprefix("base_model.model.")
        site = parse_site(name)
        kernels[site] = Kernel(A=A, B=B, scale=_scale(config, module_key, A.shape[0]))
    if not kernels:
        raise ValueError(f"{folder / WEIGHTS_FILE} contains no lora_A/lora_B weights")
    unsaved = config.get("modules_to_save")
    if unsaved:
        logger.warning("modules_to_save %s are fully trained copies and are not carried", unsaved)
    return Adapter(path=folder, config=config, kernels=kernels)


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
    for site, kernel in adapter.kernels.items():
        try:
            module = source.get_submodule(site.name)
        except AttributeError as error:
            raise ValueError(f"module {site.name} not found in the source model: {hint}") from error
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"module {site.name} is a {type(module).__name__}, not a Linear layer; "
                "loracast carries LoRAs on linear layers"
            )
        expected = (module.out_features, module.in_features)
        found = (kernel.B.shape[0], kernel.A.shape[1])
        if expected != found or kernel.B.shape[1] != kernel.A.shape[0]:
            raise ValueError(
                f"shape mismatch at {site.name}: the source module is (out={expected[0]}, "
                f"in={expected[1]}) but the adapter's B·A is (out={found[0]}, in={found[1]}): "
                f"{hint}"
            )
