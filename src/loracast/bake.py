"""Bake a cartridge into a standard PEFT LoRA for the target.

A cartridge adds ``delta(x)`` to each anchor's output, where ``x`` is the anchor's input. Baking
replaces that with the best rank-``R`` linear map ``x → B · A · x`` (plus an optional bias).
The map is fitted per anchor on the target's own activations over a general corpus by
reduced-rank regression. Its closed form is the least-squares map, projected onto the top ``R``
directions of its fitted outputs. With linear heads the carried delta is itself an affine map
of rank at most the sum of the kernel ranks at the anchor, so a bake at that rank with a bias is
exact up to float error.

The folder written is an ordinary PEFT LoRA for the target (see ``loracast.peft_export``) plus
a model card, ``README.md``, and ``loracast_bake.json`` with the approximation error per anchor.
Anchors that are roles of one fused projection are fitted separately and merged into one LoRA
on the projection; GPT-2's Conv1D anchors get PEFT's ``fan_in_fan_out``. An anchor that is a
decoder layer's output (a target family not in ``loracast.architectures.FAMILIES``) cannot be
baked, because PEFT adapts linear modules only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from loracast.architectures import linear_shape
from loracast.capture import decoder_of, recording_hooks
from loracast.cartridge import Cartridge
from loracast.models import LoadedModel
from loracast.peft_export import check_output_free, merge_parts, write_peft_lora

logger = logging.getLogger(__name__)

BAKE_FILE = "loracast_bake.json"
CARD_FILE = "README.md"
# A bake keeping less than this share of the fitted delta's energy is reported as too low a rank.
ENERGY_WARNING = 0.999


@dataclass
class BakeConfig:
    """Settings of ``bake``.

    Attributes:
        rank: LoRA rank of the baked adapter. ``None`` uses, per anchor, the sum of the kernel
            ranks carried there, which is exact for linear heads.
        bias: also fit a constant per anchor, saved as PEFT's ``lora_B.bias``
            (``lora_bias=True``). It makes linear heads exact, but PEFT cannot merge such an
            adapter into a layer without a bias (Llama and Gemma projections have none), and not
            every server loads LoRA biases. Off by default.
        max_positions: corpus token positions recorded at the anchors.
        max_tokens: target tokens read per corpus passage.
        validation_fraction: share of the positions held out to report the error.
        ridge: ridge penalty relative to the mean input variance, for a stable solve.
        batch_size: passages per forward pass while recording.
    """

    rank: int | None = None
    bias: bool = False
    max_positions: int = 4000
    max_tokens: int = 128
    validation_fraction: float = 0.2
    ridge: float = 1e-6
    batch_size: int = 8

    def __post_init__(self) -> None:
        errors = []
        if self.rank is not None and (
            isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1
        ):
            errors.append(f"rank must be a positive integer or None, got {self.rank!r}")
        for name in ("max_positions", "max_tokens", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                errors.append(f"{name} must be a positive integer, got {value!r}")
        if not 0 < self.validation_fraction < 1:
            errors.append(
                f"validation_fraction must be between 0 and 1, got {self.validation_fraction!r}"
            )
        if not self.ridge >= 0:
            errors.append(f"ridge must be >= 0, got {self.ridge!r}")
        if errors:
            raise ValueError("invalid BakeConfig: " + "; ".join(errors))


@dataclass
class AnchorBake:
    """Fit quality of one anchor's baked LoRA against the carried delta.

    Attributes:
        anchor: the target module.
        rank: the rank used.
        kernel_rank: the sum of the kernel ranks carried to this anchor (exact for linear heads).
        energy_kept: share of the fitted delta's energy (sum of squared singular values) that
            the rank keeps, on the fitting positions.
        relative_error: ``‖delta − baked‖ / ‖delta‖`` on held-out positions.
    """

    anchor: str
    rank: int
    kernel_rank: int
    energy_kept: float
    relative_error: float


@dataclass
class BakeResult:
    """Output of ``bake``: the folder and the per-anchor report."""

    path: Path
    anchors: list[AnchorBake] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def worst_error(self) -> float:
        return max(anchor.relative_error for anchor in self.anchors)


def record_anchor_inputs(
    target: LoadedModel,
    texts: Sequence[str],
    anchors: Sequence[str],
    *,
    max_positions: int,
    max_tokens: int = 128,
    batch_size: int = 8,
    show_progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Run the target on ``texts`` and return each anchor's inputs, ``{anchor: (n, d_in)}``.

    Every token position of a passage is kept, except a leading BOS token, until
    ``max_positions`` rows are recorded.
    """
    tokenizer, model = target.tokenizer, target.model
    device = next(model.parameters()).device
    store: dict[str, dict[str, list[torch.Tensor]]] = {}
    recorded = 0
    with tqdm(total=max_positions, desc="Recording anchors", disable=not show_progress) as bar:
        for start in range(0, len(texts), batch_size):
            encoded = [
                tokenizer(text, truncation=True, max_length=max_tokens)["input_ids"]
                for text in texts[start : start + batch_size]
            ]
            rows, positions = [], []
            for row, ids in enumerate(encoded):
                first = 1 if ids and ids[0] == tokenizer.bos_token_id else 0
                for position in range(first, len(ids)):
                    if recorded + len(rows) < max_positions:
                        rows.append(row)
                        positions.append(position)
            if not rows:
                break
            length = max(len(ids) for ids in encoded)
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            input_ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for row, ids in enumerate(encoded):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                mask[row, : len(ids)] = 1
            index = {
                "batch": torch.tensor(rows),
                "position": torch.tensor(positions),
                "length": length,
            }
            with torch.no_grad(), recording_hooks(model, anchors, index, store):
                decoder_of(model)(
                    input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False
                )
            recorded += len(rows)
            bar.update(len(rows))
    if recorded == 0:
        raise ValueError("the corpus gave no token positions to record; pass non-empty texts")
    return {name: torch.cat(entry["input"]) for name, entry in store.items()}


def reduced_rank_regression(
    x: torch.Tensor, y: torch.Tensor, rank: int, *, bias: bool, ridge: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """Fit ``y ≈ B · A · x (+ c)`` with ``A`` of ``rank`` rows, in closed form.

    The least-squares (ridge) map ``C`` is fitted first. The top ``rank`` right singular vectors
    ``V`` of its fitted outputs then give ``B = V`` and ``A = (C · V)ᵀ``. This minimises the
    squared error among rank-``rank`` maps for the given inputs.

    Args:
        x: inputs, ``(n, d_in)``.
        y: outputs, ``(n, d_out)``.
        rank: the rank of the map, at most ``min(d_in, d_out)``.
        bias: fit a constant ``c`` as well (on centred data).
        ridge: penalty relative to the mean diagonal of ``xᵀx``.

    Returns:
        ``(A (rank, d_in), B (d_out, rank), c (d_out,) or None, energy_kept)``, in float64.
    """
    x, y = x.double(), y.double()
    x_mean = x.mean(0) if bias else torch.zeros(x.shape[1], dtype=x.dtype)
    y_mean = y.mean(0) if bias else torch.zeros(y.shape[1], dtype=y.dtype)
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ xc  # (d_in, d_in)
    penalty = ridge * gram.diagonal().mean().clamp_min(1e-12)
    gram = gram + penalty * torch.eye(gram.shape[0], dtype=gram.dtype)
    coefficients = torch.linalg.solve(gram, xc.T @ yc)  # (d_in, d_out)
    _, singular, vh = torch.linalg.svd(xc @ coefficients, full_matrices=False)
    rank = min(rank, vh.shape[0])
    V = vh[:rank].T  # (d_out, rank)
    A = (coefficients @ V).T  # (rank, d_in)
    energy = singular.square()
    kept = float(energy[:rank].sum() / energy.sum()) if energy.sum() > 0 else 1.0
    constant = (y_mean - x_mean @ coefficients @ V @ V.T) if bias else None
    return A, V, constant, kept


def _affine_map(cartridge: Cartridge, anchor: str, d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the affine map of linear heads by probing: ``delta(x) = M · x + c``."""
    probes = torch.cat([torch.zeros(1, d_in), torch.eye(d_in)]).double()
    with torch.no_grad():
        outputs = cartridge.anchor_delta(anchor, probes)  # (1 + d_in, d_out)
    constant = outputs[0]
    return (outputs[1:] - constant).T, constant  # (d_out, d_in), (d_out,)


def _exact_linear_bake(cartridge, anchor, kernel_rank, x):
    """Factor linear heads' map exactly; returns ``(A, B, c, energy_kept)``."""
    M, constant = _affine_map(cartridge, anchor, x.shape[1])
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    energy = S.square()
    kept = float(energy[:kernel_rank].sum() / energy.sum()) if energy.sum() > 0 else 1.0
    return Vh[:kernel_rank], U[:, :kernel_rank] * S[:kernel_rank], constant, kept


def _kernel_ranks(cartridge: Cartridge) -> dict[str, int]:
    return {
        anchor: sum(cartridge.carried[key].A.shape[0] for key in keys)
        for anchor, keys in cartridge.anchors.items()
    }


def _bake_anchor(cartridge, anchor, inputs, kernel_rank, config):
    """Fit one anchor; returns ``(A, B, c, report)``."""
    n_val = max(1, int(len(inputs) * config.validation_fraction))
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(inputs), generator=generator)
    x_fit, x_val = inputs[order[n_val:]], inputs[order[:n_val]]
    with torch.no_grad():
        y_fit = cartridge.anchor_delta(anchor, x_fit)  # (n_fit, d_out)
        y_val = cartridge.anchor_delta(anchor, x_val)

    rank = config.rank or kernel_rank
    linear = all(cartridge.carried[key].decoder.is_linear for key in cartridge.anchors[anchor])
    linear = linear and all(
        cartridge.carried[key].encoder.is_linear for key in cartridge.anchors[anchor]
    )
    if linear and config.bias and rank >= kernel_rank:
        A, B, constant, kept = _exact_linear_bake(cartridge, anchor, kernel_rank, x_fit)
    else:
        A, B, constant, kept = reduced_rank_regression(
            x_fit, y_fit, rank, bias=config.bias, ridge=config.ridge
        )
    baked = x_val @ A.T @ B.T
    if constant is not None:
        baked = baked + constant
    norm = torch.linalg.norm(y_val)
    error = float(torch.linalg.norm(y_val - baked) / norm) if norm > 0 else 0.0
    report = AnchorBake(anchor, A.shape[0], kernel_rank, kept, error)
    return A, B, constant, report


def _anchor_widths(cartridge: Cartridge, target: LoadedModel) -> dict[str, int]:
    """Return ``{module name: out_features}`` of every anchor module, checking it can be baked.

    Raises:
        ValueError: an anchor is not a linear or Conv1D module.
    """
    widths = {}
    for anchor in cartridge.anchors:
        name = cartridge.anchor_site(anchor).module_name
        module = target.model.get_submodule(name)
        shape = linear_shape(module)
        if shape is None:
            raise ValueError(
                f"anchor {name} is a {type(module).__name__}, not a Linear or Conv1D module, so "
                "no PEFT LoRA can hold its update; its target family "
                f"({target.model.config.model_type}) is not in loracast.architectures.FAMILIES. "
                "Use the cartridge itself, or add the family to FAMILIES and carry the adapter "
                "again"
            )
        widths[name] = shape[0]
    return widths


def _warn_if_rank_low(reports: list[AnchorBake]) -> None:
    """Log one warning naming the anchors whose rank keeps too little of the carried delta."""
    low = [report for report in reports if report.energy_kept < ENERGY_WARNING]
    if not low:
        return
    worst = min(low, key=lambda report: report.energy_kept)
    logger.warning(
        "at %d of %d anchors the rank keeps less than %.3f of the carried delta's energy; worst "
        "%s: rank %d keeps %.4f (held-out error %.3g, kernel rank %d). Raise --rank if the "
        "held-out errors in %s are too large; nonlinear heads are never exactly low-rank",
        len(low),
        len(reports),
        ENERGY_WARNING,
        worst.anchor,
        worst.rank,
        worst.energy_kept,
        worst.relative_error,
        worst.kernel_rank,
        BAKE_FILE,
    )


def _model_card(cartridge: Cartridge, target_name: str, result: BakeResult, extra: dict) -> str:
    bridge = cartridge.bridge
    adapter = cartridge.adapter_info
    errors = [anchor.relative_error for anchor in result.anchors]
    lines = [
        "---",
        f"base_model: {target_name}",
        "library_name: peft",
        "tags: [lora, loracast, baked-cartridge]",
        "---",
        "",
        f"# Baked LoRA for {target_name}",
        "",
        "A standard PEFT LoRA distilled by `loracast bake` from a cartridge: an adapter trained",
        f"for `{bridge.source.get('name')}` and carried to `{target_name}` through a bridge.",
        "It loads with `PeftModel.from_pretrained` and needs no loracast code.",
        "",
        "| | |",
        "|---|---|",
        f"| source adapter | `{adapter.get('path')}` (base"
        f" `{adapter.get('base_model_name_or_path')}`, r {adapter.get('r')}, modules"
        f" {adapter.get('target_modules')}) |",
        f"| source model | `{bridge.source.get('name')}` (fingerprint"
        f" {bridge.source.get('fingerprint')}) |",
        f"| target model | `{target_name}` (fingerprint {bridge.target.get('fingerprint')}) |",
        f"| bridge positions | {bridge.stats.get('train_positions', 'not recorded')} aligned"
        " corpus positions |",
        f"| anchors | {len(result.anchors)} |",
        f"| rank | {max(anchor.rank for anchor in result.anchors)} |",
        f"| held-out relative error, mean / worst | {sum(errors) / len(errors):.3g} /"
        f" {max(errors):.3g} |",
        f"| bake corpus | {extra.get('corpus', 'not recorded')} |",
        f"| command | `{extra.get('command', '')}` |",
    ]
    if extra.get("benchmark"):
        lines += ["", "## Benchmark", "", str(extra["benchmark"])]
    lines += [
        "",
        "The relative error compares the baked update with the cartridge's carried delta at",
        "held-out corpus positions; `loracast_bake.json` lists it per anchor.",
        "",
    ]
    return "\n".join(lines)


def bake(
    cartridge: Cartridge,
    target: LoadedModel,
    texts: Sequence[str],
    out_dir: str | Path,
    *,
    config: BakeConfig | None = None,
    card: dict | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> BakeResult:
    """Distil a cartridge into a standard PEFT LoRA for ``target``.

    Args:
        cartridge: the cartridge to bake; it must belong to ``target``.
        target: the target model and tokenizer.
        texts: general-corpus passages whose activations the bake is fitted on.
        out_dir: the PEFT folder to write.
        config: bake settings; defaults to ``BakeConfig()``.
        card: extra facts for the model card: ``corpus``, ``command``, ``benchmark``.
        overwrite: replace ``out_dir`` if it exists.
        show_progress: show a progress bar while recording.

    Returns:
        The folder and the per-anchor errors. Anchors whose rank keeps less than
        ``ENERGY_WARNING`` of the fitted delta's energy are logged as warnings.

    Raises:
        ValueError: ``target`` is not the cartridge's target, ``texts`` is empty, or an anchor
            is not a linear or Conv1D module.
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
    """
    config = config or BakeConfig()
    out_dir = Path(out_dir).expanduser()
    check_output_free(out_dir, overwrite)
    cartridge.check_target(target)
    if not texts:
        raise ValueError("texts is empty; pass general-corpus passages to fit the bake on")
    started = time.perf_counter()

    anchors = sorted(cartridge.anchors)
    widths = _anchor_widths(cartridge, target)
    inputs = record_anchor_inputs(
        target,
        texts,
        sorted(widths),
        max_positions=config.max_positions,
        max_tokens=config.max_tokens,
        batch_size=config.batch_size,
        show_progress=show_progress,
    )
    kernel_ranks = _kernel_ranks(cartridge)
    factors, biases, reports = {}, {}, []
    # Float64 throughout, so the error reported is the bake's and not rounding's.
    cartridge.to("cpu").double()
    try:
        for anchor in anchors:
            site = cartridge.anchor_site(anchor)
            A, B, constant, report = _bake_anchor(
                cartridge, anchor, inputs[site.module_name].double(), kernel_ranks[anchor], config
            )
            factors[site] = (A, B)
            if constant is not None:
                biases[site] = constant
            reports.append(report)
    finally:
        cartridge.float()
    _warn_if_rank_low(reports)
    rows = {cartridge.anchor_site(anchor): cartridge.anchor_rows(anchor) for anchor in anchors}
    factors, biases = merge_parts(factors, rows, widths, biases if config.bias else None)
    conv1d = any(
        not isinstance(target.model.get_submodule(name), torch.nn.Linear) for name in widths
    )

    result = BakeResult(path=out_dir, anchors=reports, seconds=time.perf_counter() - started)
    record = {
        "method": "reduced_rank_regression",
        "config": asdict(config),
        "cartridge_adapter": cartridge.adapter_info,
        "source": cartridge.bridge.source,
        "target": cartridge.bridge.target,
        "positions": int(next(iter(inputs.values())).shape[0]),
        "anchors": [asdict(report) for report in reports],
        "seconds": round(result.seconds, 2),
    }
    write_peft_lora(
        out_dir,
        target.name,
        factors,
        # The fitted deltas already include cartridge.scale.
        scale=1.0,
        record=record,
        record_file=BAKE_FILE,
        overwrite=overwrite,
        biases=biases,
        extra_files={CARD_FILE: _model_card(cartridge, target.name, result, card or {})},
        fan_in_fan_out=conv1d,
    )
    logger.info(
        "baked %d anchors in %.1f s; held-out relative error worst %.3g",
        len(reports),
        result.seconds,
        result.worst_error,
    )
    return result
