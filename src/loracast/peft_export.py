"""Write standard PEFT LoRA folders for the target model, atomically.

Both the data-free baselines and ``loracast bake`` return an ordinary PEFT LoRA. PEFT's own
``LoraConfig`` writes ``adapter_config.json``, and ``adapter_model.safetensors`` uses PEFT's key
names (``base_model.model.<module>.lora_A.weight``, ``...lora_B.weight`` and, with a bias,
``...lora_B.bias``). The folder therefore loads with ``PeftModel.from_pretrained`` and needs no
loracast code. Updates computed per role of a fused projection are merged into one LoRA on the
projection (``merge_parts``), because PEFT adapts whole modules.
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


def merge_parts(
    factors: dict[Site, tuple[torch.Tensor, torch.Tensor]],
    rows: dict[Site, torch.Tensor | None],
    widths: dict[str, int],
    biases: dict[Site, torch.Tensor] | None = None,
) -> tuple[dict[Site, tuple[torch.Tensor, torch.Tensor]], dict[Site, torch.Tensor] | None]:
    """Merge the factors of a fused projection's parts into one ``(A, B)`` per whole module.

    Part ``p`` with output rows ``I_p`` and factors ``(A_p, B_p)`` contributes its own rank:
    ``A`` stacks every ``A_p``, and ``B`` contains ``B_p`` in rows ``I_p`` of ``p``'s columns and
    zeros elsewhere. So ``B · A`` is exactly each part's update placed in its rows.

    Args:
        factors: ``{site: (A (r, d_in), B (d_out_part, r))}``; whole modules pass through.
        rows: ``{site: output rows of the part, or None for a whole module}``.
        widths: ``{module name: out_features}`` of every fused projection in ``factors``.
        biases: ``{site: (d_out_part,)}``, merged the same way, or None.

    Returns:
        ``(factors, biases)`` keyed by whole-module sites.
    """
    merged_factors: dict[Site, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    merged_biases: dict[Site, torch.Tensor] = {}
    for site, (A, B) in factors.items():
        part_rows = rows.get(site)
        whole = site.whole()
        if part_rows is None:
            merged_factors.setdefault(whole, []).append((A, B))
            if biases is not None:
                merged_biases[whole] = biases[site]
            continue
        width = widths[whole.module_name]
        placed = B.new_zeros(width, B.shape[1])  # (out_features, r_part)
        placed[part_rows] = B
        merged_factors.setdefault(whole, []).append((A, placed))
        if biases is not None:
            bias = merged_biases.setdefault(whole, biases[site].new_zeros(width))
            bias[part_rows] += biases[site]
    result = {
        whole: (torch.cat([A for A, _ in pairs]), torch.cat([B for _, B in pairs], dim=1))
        for whole, pairs in merged_factors.items()
    }
    return result, (merged_biases if biases is not None else None)


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
    fan_in_fan_out: bool = False,
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
        fan_in_fan_out: set PEFT's ``fan_in_fan_out``, which GPT-2's Conv1D layers need
            (their weight is stored as ``(in, out)``); ``A`` and ``B`` keep their usual shapes.

    Returns:
        ``out_dir``.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
        ValueError: an anchor is a part of a fused projection; merge it with ``merge_parts``.
    """
    from peft import LoraConfig

    parts = [anchor.name for anchor in factors if anchor.part is not None]
    if parts:
        raise ValueError(f"anchors {parts} are parts of fused projections; merge_parts first")
    rank = max(A.shape[0] for A, _ in factors.values())
    tensors: dict[str, torch.Tensor] = {}
    for anchor, (A, B) in sorted(factors.items(), key=lambda item: item[0].name):
        A, B = pad_rank(A, B, rank)
        prefix = f"base_model.model.{anchor.module_name}"
        tensors[f"{prefix}.lora_A.weight"] = A.float().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = B.float().contiguous()
        if biases is not None:
            tensors[f"{prefix}.lora_B.bias"] = biases[anchor].float().contiguous()

    # Full module names restrict the LoRA to the anchors, not every layer with that module.
    lora_config = LoraConfig(
        r=rank,
        lora_alpha=scale * rank,
        target_modules=sorted(anchor.module_name for anchor in factors),
        lora_dropout=0.0,
        fan_in_fan_out=fan_in_fan_out,
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
