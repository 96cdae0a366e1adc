"""Layer maps: which target layer each source layer is matched to.

``relative-depth`` matches equal relative depth, ``m = round(l · (L_t − 1) / (L_s − 1))``, and needs
no data. ``cka`` reads a general corpus with both models and compares the residual streams
entering each pair of layers by linear CKA at aligned positions, after standardising them.
Each source layer then gets the target layer that maximises the summed similarity, and the map
never goes back in depth.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from loracast.architectures import layers_path, num_layers, relative_depth_layer_map
from loracast.capture import record_pair

logger = logging.getLogger(__name__)

LAYER_MAPS = ("relative-depth", "cka")
# Aligned positions compared by the cka map, read from the first passages of the corpus.
CKA_POSITIONS = 2000


def _centred_features(states: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Return the centred features in float64 and the Frobenius norm of their Gram matrix."""
    centred = states.double() - states.double().mean(0)
    gram = centred.T @ centred
    return centred, float(torch.linalg.matrix_norm(gram))


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Return the linear CKA of two feature sets of the same rows, between 0 and 1.

    Args:
        x: ``(n, d_x)`` features, one row per input.
        y: ``(n, d_y)`` features of the same inputs.

    Raises:
        ValueError: the row counts differ, or fewer than 2 rows.
    """
    return float(cka_matrix([x], [y])[0, 0])


def cka_matrix(source: Sequence[torch.Tensor], target: Sequence[torch.Tensor]) -> torch.Tensor:
    """Return the ``(len(source), len(target))`` matrix of linear CKA between feature sets.

    Every feature set has the same rows (the same inputs). A constant feature set has no
    similarity to anything, and its entries are 0.

    Raises:
        ValueError: the row counts differ, or fewer than 2 rows.
    """
    rows = {states.shape[0] for states in (*source, *target)}
    if len(rows) != 1:
        raise ValueError(
            f"every feature set needs the same rows, got row counts {sorted(rows)}; pass "
            "features recorded at the same positions"
        )
    count = rows.pop()
    if count < 2:
        raise ValueError(f"linear CKA needs at least 2 rows, got {count}; record more positions")
    targets = [_centred_features(states) for states in target]
    similarity = torch.zeros(len(source), len(target), dtype=torch.float64)
    for i, states in enumerate(source):
        x, x_norm = _centred_features(states)
        for j, (y, y_norm) in enumerate(targets):
            if x_norm > 0 and y_norm > 0:
                cross = (x.T @ y).pow(2).sum()
                similarity[i, j] = cross / (x_norm * y_norm)
    return similarity


def standardise_streams(states: torch.Tensor) -> torch.Tensor:
    """Return residual-stream rows divided by their RMS, then each feature standardised.

    A few dimensions of a residual stream can be orders of magnitude larger than the rest, and
    on raw activations they decide linear CKA alone, so the map collapses onto a few layers.
    Dividing each row by its RMS is what the layer's own pre-norm does, and standardising each
    feature gives every dimension the same weight. A feature without spread after the division
    is 0.
    """
    states = states.double()
    rows = states / states.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-12)
    centred = rows - rows.mean(0)
    spread = centred.std(0)
    return torch.where(spread > 0, centred / spread.clamp_min(1e-12), torch.zeros_like(centred))


def monotone_layer_map(similarity: torch.Tensor) -> list[int]:
    """Return, per row, the column that maximises the summed similarity of a monotone map.

    A map is monotone when a later source layer never maps to an earlier target layer. Several
    source layers may share a target layer, and a target layer may be skipped. Ties go to the
    earlier column.

    Raises:
        ValueError: ``similarity`` is not a non-empty 2-D matrix.
    """
    if similarity.dim() != 2 or 0 in similarity.shape:
        raise ValueError(
            f"similarity must be a non-empty 2-D matrix, got {tuple(similarity.shape)}"
        )
    rows, columns = similarity.shape
    values = similarity.double()
    # best[i, j]: the largest sum over rows 0..i with row i mapped to column j.
    best = torch.empty(rows, columns, dtype=torch.float64)
    best[0] = values[0]
    for i in range(1, rows):
        best[i] = values[i] + torch.cummax(best[i - 1], dim=0).values
    layer_map = [0] * rows
    layer_map[-1] = int(torch.argmax(best[-1]))
    for i in range(rows - 2, -1, -1):
        layer_map[i] = int(torch.argmax(best[i, : layer_map[i + 1] + 1]))
    return layer_map


def cka_layer_map(
    source,
    target,
    texts: Sequence[str],
    *,
    max_tokens: int = 128,
    batch_size: int = 8,
    max_positions: int = CKA_POSITIONS,
    show_progress: bool = True,
) -> tuple[list[int], torch.Tensor]:
    """Match layers by the linear CKA of the residual streams entering them.

    Each stream is standardised first (``standardise_streams``).

    Args:
        source, target: ``LoadedModel`` objects.
        texts: general-corpus passages; the first ones that give ``max_positions`` aligned
            positions are read.
        max_tokens: source tokens per passage.
        batch_size: passages per forward pass.
        max_positions: aligned positions compared.
        show_progress: show a progress bar.

    Returns:
        The layer map (a target layer per source layer, never decreasing) and the
        ``(L_s, L_t)`` similarity matrix it was chosen from.
    """
    started = time.perf_counter()
    # A decoder layer's input is the residual stream entering it.
    names = [
        [f"{layers_path(loaded.model)}.{layer}" for layer in range(num_layers(loaded.model))]
        for loaded in (source, target)
    ]
    recording = record_pair(
        source,
        target,
        texts,
        names[0],
        names[1],
        max_tokens=max_tokens,
        batch_size=batch_size,
        max_positions=max_positions,
        show_progress=show_progress,
    )
    source_states = [recording.source[name]["input"] for name in names[0]]
    target_states = [recording.target[name]["input"] for name in names[1]]
    similarity = cka_matrix(
        [standardise_streams(states) for states in source_states],
        [standardise_streams(states) for states in target_states],
    )
    layer_map = monotone_layer_map(similarity)
    depth = relative_depth_layer_map(len(source_states), len(target_states))
    moved = sum(chosen != default for chosen, default in zip(layer_map, depth, strict=True))
    logger.info(
        "CKA layer map on %d positions in %.1f s: %d of %d source layers differ from relative "
        "depth",
        source_states[0].shape[0],
        time.perf_counter() - started,
        moved,
        len(layer_map),
    )
    return layer_map, similarity
