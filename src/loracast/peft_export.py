"""Write standard PEFT LoRA folders for the target model, atomically.

Both the data-free baselines and ``loracast bake`` return an ordinary PEFT LoRA. PEFT's own
``LoraConfig`` writes ``adapter_config.json``, and ``adapter_model.safetensors`` uses PEFT's key
names (``base_model.model.<module>.lora_A.weight``, ``...lora_B.weight`` and, with a bias,
``...lora_B.bias``). The folder therefore loads with ``PeftModel.from_pretrained`` and needs no
loracast code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from loracast.adapters import CONFIG_FILE, WEIGHTS_FILE
from loracast.architectures import Site
from loracast.serialization import make_staging_folder, provenance, replace_folder


def check_output_free(out_dir: Path, overwrite: bool) -> None:
    """Raise FileExistsError when ``out_dir`` exists and may not be replaced."""
    if out_dir.exists() and not overwrite:
        raise FileExistsError(
            f"output folder {out_dir} exists; choose another or pass overwrite=True (--overwrite)"
        )


def pad_rank(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Append zero rows to ``A`` and zero columns to ``B`` up to ``rank``, keeping ``B · A``."""
    missing = rank - A.shape[0]
    if missing == 0:
        return A, B
    A = torch.cat([A, A.new_zeros(missing, A.shape[1])], dim=0)
    B = torch.cat([B, B.new_zeros(B.shape[0], missing)], dim=1)
    return A, B


def write_peft_lora(
    out_dir: Path,
    target_name: str,
    factors: dict[Site, tuple[torch.Tensor, torch.Tensor]],
    *,
    scale: float,
    record: dict,
    record_file: str,
    overwrite: bool,
    biases: dict[Site, torch.Tensor] | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write ``factors`` (per anchor ``(A, B)``) as a PEFT LoRA folder for the target.

    Every anchor gets the same rank (the maximum) and the same scale, with zero padding where an
    anchor needs fewer ranks. A single ``r`` and ``lora_alpha`` load the same way in every PEFT
    version, whereas the matching rules of ``rank_pattern`` keys have changed between versions.

    Args:
        out_dir: the folder to write; it appears complete or not at all.
        target_name: written as ``base_model_name_or_path``.
        factors: ``{anchor: (A (r, d_in), B (d_out, r))}``; the update is ``scale · B · A``.
        scale: the LoRA scale, stored as ``lora_alpha = scale · r``.
        record: what produced the folder, written to ``record_file`` with provenance added.
        record_file: the name of the JSON record inside the folder.
        overwrite: replace ``out_dir`` if it exists.
        biases: ``{anchor: (d_out,)}`` added after the LoRA update, stored as PEFT's
            ``lora_B.bias`` (``lora_bias=True``). Every anchor in ``factors`` needs one.
        extra_files: ``{file name: text}`` written beside the weights, such as a model card.

    Returns:
        ``out_dir``.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
    """
    from peft import LoraConfig

    rank = max(A.shape[0] for A, _ in factors.values())
    tensors: dict[str, torch.Tensor] = {}
    for anchor, (A, B) in sorted(factors.items(), key=lambda item: item[0].name):
        A, B = pad_rank(A, B, rank)
        prefix = f"base_model.model.{anchor.name}"
        tensors[f"{prefix}.lora_A.weight"] = A.float().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = B.float().contiguous()
        if biases is not None:
            tensors[f"{prefix}.lora_B.bias"] = biases[anchor].float().contiguous()

    # Full module names restrict the LoRA to the anchors, not every layer with that module.
    lora_config = LoraConfig(
        r=rank,
        lora_alpha=scale * rank,
        target_modules=sorted(anchor.name for anchor in factors),
        lora_dropout=0.0,
        bias="none",
        lora_bias=biases is not None,
        task_type="CAUSAL_LM",
        inference_mode=True,
        base_model_name_or_path=target_name,
    )

    check_output_free(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_folder(out_dir)
    try:
        lora_config.save_pretrained(str(staging))
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        record = {**record, "lora_rank": rank, "lora_alpha": scale * rank, **provenance()}
        (staging / record_file).write_text(json.dumps(record, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
        if not (staging / CONFIG_FILE).is_file():
            raise RuntimeError(f"peft's LoraConfig.save_pretrained did not write {CONFIG_FILE}")
        replace_folder(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
