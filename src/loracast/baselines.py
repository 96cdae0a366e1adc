"""Data-free baselines that carry a LoRA to the target through weight space, with no corpus.

Two baselines are compared against loracast's activation-space cartridges:

- ``weight_space_transfer`` follows the idea of Cross-LoRA (Xia et al., 2025). Each source
  update ``ΔW_s = scale · B · A`` is written in the coordinates of the top-k singular vectors of
  the source base weight, and those coordinates are emitted again along the top-k singular
  vectors of the target base weight at the anchor. Singular directions are paired by their
  index, because the two models share no coordinate system.
- ``copy_transfer`` copies each kernel unchanged to its anchor, which only works when the shapes
  of the two modules agree.

Both write a standard PEFT LoRA folder for the target, plus ``loracast_baseline.json``, which
records the method, its settings and the source adapter. Like cartridges, both work per role: a
LoRA on a fused projection is split into its roles' rows, and updates for the roles of a fused
target projection are merged into one LoRA on it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from loracast.adapters import Adapter, Kernel, load_adapter, validate_adapter
from loracast.architectures import (
    Site,
    anchor_for,
    expand_sites,
    linear_shape,
    linear_weight,
    num_layers,
    output_rows,
    relative_depth_layer_map,
)
from loracast.models import LoadedModel
from loracast.peft_export import check_output_free, merge_parts, write_peft_lora

logger = logging.getLogger(__name__)

BASELINE_FILE = "loracast_baseline.json"
WEIGHT_PROJECTION_METHOD = "weight_space_singular_coordinate_projection"
COPY_METHOD = "plain_copy"


@dataclass
class WeightProjectionConfig:
    """Settings of ``weight_space_transfer``.

    Attributes:
        rank_k: number of top singular directions of each base weight that carry the update.
            ``None`` uses all of them, ``min(d_out_s, d_in_s, d_out_t, d_in_t)`` per site. A
            larger value than a site allows is lowered to that site's maximum.
    """

    rank_k: int | None = None

    def __post_init__(self) -> None:
        if self.rank_k is None:
            return
        if isinstance(self.rank_k, bool) or not isinstance(self.rank_k, int):
            raise TypeError(
                f"rank_k must be an int or None, got {self.rank_k!r} "
                f"({type(self.rank_k).__name__}). Pass a positive integer, or None for full rank."
            )
        if self.rank_k < 1:
            raise ValueError(
                f"rank_k must be at least 1, got {self.rank_k}. Pass a positive integer, or None "
                "for full rank."
            )


def _top_singular_vectors(weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(U_k, V_k)`` of a float64 SVD, each pair's sign fixed by a convention.

    The SVD leaves the sign of each pair ``(u_i, v_i)`` arbitrary, and the projection depends on
    it. The largest-magnitude entry of each ``u_i`` is made positive, so the result does not
    depend on the LAPACK backend.
    """
    U, _, Vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    U_k = U[:, :k]  # (d_out, k)
    V_k = Vh[:k].T  # (d_in, k)
    pivot = U_k.abs().argmax(dim=0)
    signs = torch.sign(U_k[pivot, torch.arange(k)])
    signs[signs == 0] = 1.0
    return U_k * signs, V_k * signs


def _cached_singular_vectors(
    weight: torch.Tensor, k: int, cache: dict | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if cache is None:
        return _top_singular_vectors(weight, k)
    # _version changes on every in-place write, so an edited weight never reuses a stale SVD.
    # The stride distinguishes a Conv1D weight's transpose from the weight itself.
    key = (weight.data_ptr(), tuple(weight.shape), weight.stride(), weight._version, k)
    if key not in cache:
        cache[key] = _top_singular_vectors(weight, k)
    return cache[key]


def project_delta(
    delta_source: torch.Tensor,
    weight_source: torch.Tensor,
    weight_target: torch.Tensor,
    k: int,
    *,
    svd_cache: dict | None = None,
) -> torch.Tensor:
    """Project a source weight update onto a target module through singular coordinates.

    Computes ``ΔW_t = U_t,k · (U_s,kᵀ · ΔW_s · V_s,k) · V_t,kᵀ``, where ``W = U S Vᵀ`` is the
    SVD of each base weight truncated to its top ``k`` singular directions. The ``k × k`` core
    is ``ΔW_s`` in the source's singular coordinates, and the target's singular vectors with
    the same indices emit it again. The SVDs run in float64. With identical weights and full
    ``k``, the result is ``ΔW_s`` only when ``W`` is square and of full rank, because the parts of
    ``ΔW_s`` outside the column and row spaces of ``W`` are dropped.

    NOTE: the result depends on how singular vectors are paired by index. A sign convention
    fixes each pair's sign, but singular values that are equal or nearly equal leave their
    vectors' rotation within the shared subspace arbitrary.

    Args:
        delta_source: source update ``ΔW_s``, shape ``(d_out_s, d_in_s)``.
        weight_source: source base weight ``W_s``, shape ``(d_out_s, d_in_s)``.
        weight_target: target base weight ``W_t``, shape ``(d_out_t, d_in_t)``.
        k: number of singular directions, ``1 ≤ k ≤ min(d_out_s, d_in_s, d_out_t, d_in_t)``.
        svd_cache: a dict owned by the caller that keeps singular vectors between calls, so
            carrying several adapters between the same two models runs each SVD once. Keep it
            only while the weights stay loaded.

    Returns:
        ``ΔW_t``, shape ``(d_out_t, d_in_t)``, in the dtype of ``delta_source``.

    Raises:
        ValueError: a tensor is not 2-D, ``delta_source`` and ``weight_source`` differ in shape,
            or ``k`` is out of range.
    """
    for name, tensor in (
        ("delta_source", delta_source),
        ("weight_source", weight_source),
        ("weight_target", weight_target),
    ):
        if tensor.dim() != 2:
            raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(tensor.shape)}")
    if delta_source.shape != weight_source.shape:
        raise ValueError(
            f"delta_source has shape {tuple(delta_source.shape)} but weight_source has shape "
            f"{tuple(weight_source.shape)}. Pass the update of the module whose weight is given."
        )
    max_k = min(*weight_source.shape, *weight_target.shape)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= max_k:
        raise ValueError(
            f"k must be an integer from 1 to {max_k} (the smallest dimension of the two weights "
            f"{tuple(weight_source.shape)} and {tuple(weight_target.shape)}), got {k!r}"
        )

    U_s, V_s = _cached_singular_vectors(weight_source, k, svd_cache)  # (d_out_s, k), (d_in_s, k)
    U_t, V_t = _cached_singular_vectors(weight_target, k, svd_cache)  # (d_out_t, k), (d_in_t, k)
    core = U_s.T @ delta_source.detach().to(torch.float64) @ V_s  # (k, k)
    delta_target = U_t @ core @ V_t.T  # (d_out_t, d_in_t)
    return delta_target.to(delta_source.dtype)


def refactor_low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Factor a weight update into a rank-``rank`` LoRA by truncated SVD.

    Args:
        delta: the update, shape ``(d_out, d_in)``.
        rank: the LoRA rank. A value above ``min(d_out, d_in)`` gives ``min(d_out, d_in)`` factors.

    Returns:
        ``(A, B, error)``: ``A = V_rᵀ`` of shape ``(r, d_in)``, ``B = U_r · S_r`` of shape
        ``(d_out, r)`` (so ``B · A`` approximates ``delta`` at scale 1), and the relative
        Frobenius error ``‖delta − B·A‖ / ‖delta‖`` (0 when ``delta`` is zero).
    """
    delta = delta.detach().to(torch.float64)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    rank = min(rank, S.shape[0])
    B = U[:, :rank] * S[:rank]  # (d_out, r)
    A = Vh[:rank]  # (r, d_in)
    norm = torch.linalg.matrix_norm(delta)
    error = 0.0 if norm == 0 else float(torch.linalg.matrix_norm(delta - B @ A) / norm)
    return A, B, error


def _module(model: nn.Module, site: Site, side: str) -> nn.Module:
    module = model.get_submodule(site.module_name)
    if linear_shape(module) is None:
        raise ValueError(
            f"{side} module {site.module_name} is a {type(module).__name__}, not a Linear or "
            "Conv1D layer, but weight-space baselines need linear layers at every site and anchor"
        )
    return module


def _site_weight(model: nn.Module, site: Site, side: str, cache: dict | None) -> torch.Tensor:
    """Return the base weight ``(d_out, d_in)`` of a site: a whole module or a part's rows."""
    module = _module(model, site, side)
    weight = linear_weight(module)
    rows = output_rows(model, site)
    if rows is None:
        return weight
    if cache is None:
        return weight[rows]
    # The cache keeps each slice alive, so no later tensor can take its address, which
    # _cached_singular_vectors uses in its key.
    key = ("rows", module.weight.data_ptr(), module.weight._version, tuple(rows.tolist()))
    if key not in cache:
        cache[key] = weight[rows]
    return cache[key]


def _out_features(target: LoadedModel, anchors) -> dict[str, int]:
    return {
        anchor.module_name: linear_shape(_module(target.model, anchor, "target"))[0]
        for anchor in anchors
    }


def _anchors(
    source: LoadedModel, target: LoadedModel, adapter: Adapter
) -> dict[Site, list[tuple[Site, Kernel]]]:
    """Group the adapter's sites, split per role, by their anchor in the target, in site order."""
    layer_map = relative_depth_layer_map(num_layers(source.model), num_layers(target.model))
    groups: dict[Site, list[tuple[Site, Kernel]]] = {}
    for site in sorted(adapter.kernels, key=lambda site: site.sort_key):
        kernel = adapter.kernels[site]
        for part in expand_sites(source.model, [site]):
            anchor = anchor_for(source.model, target.model, part, layer_map)
            rows = output_rows(source.model, part)
            groups.setdefault(anchor, []).append(
                (part, kernel if rows is None else kernel.rows(rows))
            )
    return groups


def _write(target: LoadedModel, factors: dict, **options) -> Path:
    """Merge fused parts and write the PEFT folder, with ``fan_in_fan_out`` for Conv1D."""
    rows = {anchor: output_rows(target.model, anchor) for anchor in factors}
    widths = _out_features(target, factors)
    merged, _ = merge_parts(factors, rows, widths)
    conv1d = any(not isinstance(target.model.get_submodule(name), nn.Linear) for name in widths)
    return write_peft_lora(
        target_name=target.name, factors=merged, fan_in_fan_out=conv1d, **options
    )


def _load_checked_adapter(source: LoadedModel, adapter_path: str | Path) -> Adapter:
    adapter = load_adapter(adapter_path)
    validate_adapter(adapter, source.model)
    return adapter


def _project_anchor(
    source: LoadedModel,
    target: LoadedModel,
    anchor: Site,
    contributions: list[tuple[Site, Kernel]],
    rank_k: int | None,
    svd_cache: dict | None,
) -> tuple[torch.Tensor, list[int]]:
    """Return the summed ``ΔW_t`` at one anchor (float64) and the ``k`` used for each site."""
    weight_target = _site_weight(target.model, anchor, "target", svd_cache)
    delta_target = torch.zeros(weight_target.shape, dtype=torch.float64)
    ks = []
    for site, kernel in contributions:
        weight_source = _site_weight(source.model, site, "source", svd_cache)
        max_k = min(*weight_source.shape, *weight_target.shape)
        k = max_k if rank_k is None else min(rank_k, max_k)
        if rank_k is not None and rank_k > max_k:
            logger.info("rank_k %d lowered to %d at %s → %s", rank_k, k, site.name, anchor.name)
        delta_source = kernel.scale * (kernel.B.double() @ kernel.A.double())  # (d_out_s, d_in_s)
        delta_target += project_delta(
            delta_source, weight_source, weight_target, k, svd_cache=svd_cache
        )
        ks.append(k)
    return delta_target, ks


def weight_space_transfer(
    source: LoadedModel,
    target: LoadedModel,
    adapter_path: str | Path,
    out_dir: str | Path,
    *,
    config: WeightProjectionConfig | None = None,
    overwrite: bool = False,
    svd_cache: dict | None = None,
) -> Path:
    """Carry a LoRA to the target through the singular subspaces of the base weights.

    Each site maps to its anchor, the target module with the same role in the layer given by the
    relative-depth layer map. ``project_delta`` carries the site's update to the anchor, the
    updates of sites that share an anchor are summed, and the sum is factored again by truncated
    SVD into a LoRA whose rank is the largest rank among those sites. The target model is only
    read.

    Args:
        source: the model the adapter was trained on.
        target: the model to write the adapter for. Its ``name`` becomes
            ``base_model_name_or_path``.
        adapter_path: PEFT LoRA folder trained on ``source``.
        out_dir: output folder, a PEFT LoRA folder that ``PeftModel.from_pretrained`` loads.
        config: projection settings; defaults to ``WeightProjectionConfig()``.
        overwrite: replace ``out_dir`` if it exists.
        svd_cache: a dict to reuse the base weights' SVDs across calls (see ``project_delta``).

    Returns:
        ``out_dir``. It also contains ``loracast_baseline.json`` with the method, ``k`` and the
        relative error of the low-rank refactor for each anchor.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
        FileNotFoundError: the adapter folder or one of its files is missing.
        ValueError: the adapter does not fit ``source``, or a site has no anchor in ``target``.
    """
    config = config or WeightProjectionConfig()
    out_dir = Path(out_dir).expanduser()
    check_output_free(out_dir, overwrite)
    adapter = _load_checked_adapter(source, adapter_path)

    factors: dict[Site, tuple[torch.Tensor, torch.Tensor]] = {}
    anchor_records = []
    for anchor, contributions in _anchors(source, target, adapter).items():
        delta_target, ks = _project_anchor(
            source, target, anchor, contributions, config.rank_k, svd_cache
        )
        rank = max(kernel.rank for _, kernel in contributions)
        A, B, error = refactor_low_rank(delta_target, rank)
        factors[anchor] = (A, B)
        anchor_records.append(
            {
                "anchor": anchor.name,
                "sites": [site.name for site, _ in contributions],
                "k": ks,
                "rank": A.shape[0],
                "relative_refactor_error": error,
            }
        )
        logger.debug("%s: rank %d, refactor error %.3g", anchor.name, A.shape[0], error)

    record = {
        "method": WEIGHT_PROJECTION_METHOD,
        "config": {"rank_k": config.rank_k},
        "source_adapter": str(adapter.path.resolve()),
        "source_model": source.name,
        "target_model": target.name,
        "anchors": anchor_records,
    }
    logger.info("weight-space transfer: %d sites → %d anchors", len(adapter.kernels), len(factors))
    return _write(
        target,
        factors,
        out_dir=out_dir,
        scale=1.0,
        record=record,
        record_file=BASELINE_FILE,
        overwrite=overwrite,
    )


def _check_copy_shapes(target: LoadedModel, groups: dict[Site, list[tuple[Site, Kernel]]]) -> None:
    for anchor, contributions in groups.items():
        expected = tuple(_site_weight(target.model, anchor, "target", None).shape)
        for site, kernel in contributions:
            found = (kernel.B.shape[0], kernel.A.shape[1])
            if found != expected:
                raise ValueError(
                    f"cannot copy the kernel at {site.name} to {anchor.name}: the source module is "
                    f"(out={found[0]}, in={found[1]}) but the target module is "
                    f"(out={expected[0]}, in={expected[1]}); a plain copy needs equal shapes, so "
                    "use weight_space_transfer or a cartridge for this pair"
                )


def copy_transfer(
    source: LoadedModel,
    target: LoadedModel,
    adapter_path: str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
) -> Path:
    """Copy each LoRA kernel unchanged to its anchor, for models whose module shapes agree.

    When all kernels share one scale, ``A`` and ``B`` are copied as they are (zero-padded to the
    largest rank) and ``lora_alpha`` keeps the scale. Otherwise, and at anchors that receive
    several source sites, each scale is multiplied into its ``B`` and the kernels of an anchor are
    concatenated along the rank, so the anchor's update is the sum of theirs.

    Args:
        source: the model the adapter was trained on.
        target: the model to write the adapter for. Its ``name`` becomes
            ``base_model_name_or_path``.
        adapter_path: PEFT LoRA folder trained on ``source``.
        out_dir: output folder, a PEFT LoRA folder that ``PeftModel.from_pretrained`` loads.
        overwrite: replace ``out_dir`` if it exists.

    Returns:
        ``out_dir``, which also contains ``loracast_baseline.json``.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
        FileNotFoundError: the adapter folder or one of its files is missing.
        ValueError: the adapter does not fit ``source``, a site has no anchor in ``target``, or
            the first site (by layer, then module) whose shape differs from its anchor's; the
            message names both and their shapes.
    """
    out_dir = Path(out_dir).expanduser()
    check_output_free(out_dir, overwrite)
    adapter = _load_checked_adapter(source, adapter_path)
    groups = _anchors(source, target, adapter)
    _check_copy_shapes(target, groups)

    scales = {kernel.scale for kernel in adapter.kernels.values()}
    shared_scale = len(scales) == 1 and all(len(group) == 1 for group in groups.values())
    factors: dict[Site, tuple[torch.Tensor, torch.Tensor]] = {}
    for anchor, contributions in groups.items():
        if shared_scale:
            kernel = contributions[0][1]
            factors[anchor] = (kernel.A, kernel.B)
            continue
        A = torch.cat([kernel.A for _, kernel in contributions], dim=0)  # (sum r, d_in)
        B = torch.cat([kernel.B * kernel.scale for _, kernel in contributions], dim=1)
        factors[anchor] = (A, B)
    scale = scales.pop() if shared_scale else 1.0

    record = {
        "method": COPY_METHOD,
        "source_adapter": str(adapter.path.resolve()),
        "source_model": source.name,
        "target_model": target.name,
        "anchors": [
            {"anchor": anchor.name, "sites": [site.name for site, _ in contributions]}
            for anchor, contributions in groups.items()
        ],
    }
    return _write(
        target,
        factors,
        out_dir=out_dir,
        scale=scale,
        record=record,
        record_file=BASELINE_FILE,
        overwrite=overwrite,
    )
