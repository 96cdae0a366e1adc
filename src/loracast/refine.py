"""Refine a carried adapter so it moves the target as the adapter moves the source.

The objective compares next-token distributions at aligned positions, over the tokens whose
strings both vocabularies share (``loracast.vocabulary``). The teacher is the target's own
distribution tilted by the adapter's effect on the source:

    q* ∝ P_target · P_source+adapter / P_source

and the student, the target with the carried adapter, minimises KL(q* ‖ P_target+carried),
with positions weighted by KL(P_source+adapter ‖ P_source), i.e. by how much the adapter acts
there. On elicited text a second term is available: sequence-level distillation, the student's
next-token cross-entropy over its full vocabulary on the tokens the adapter wrote. It needs no
shared vocabulary, so it also carries the part of the adapter's change that falls on tokens
only one tokenizer has. Only general text is used, never task data. Three kinds of text are
supported:

- ``general``: every aligned position of general-corpus passages (the strict setting);
- ``elicited``: every aligned position of text sampled from the source with the adapter,
  continuing short general-corpus prefixes (``loracast.elicit``). Still no task data: the
  adapter writes the text on which it acts;
- ``template``: general passages filled into the prompt template the adapter was trained with,
  trained at the template's last position only. The template is a small piece of task
  information (no labels, no task examples), so its results belong in their own setting.

Two students are supported:

- ``heads``: the cartridge's heads gain zero-initialised low-rank corrections in the kernel's
  subspace (see ``CarriedSite``). The kernel and the bridge stay frozen, but the corrections
  belong to this adapter.
- ``lora``: a fresh PEFT LoRA on the target trained with the same objective and text, the
  distillation baseline the kernel and heads must beat.

``behaviour_cosine`` is the functional diagnostic: the cosine between the change the student
makes to the target's next-token log-probabilities and the change the adapter makes to the
source's, over the shared vocabulary, on held-out positions.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from loracast.adapters import Kernel
from loracast.align import aligned_positions, encode, truncate_text
from loracast.architectures import Site, lora_target_modules, output_rows
from loracast.capture import decoder_of
from loracast.cartridge import Cartridge
from loracast.elicit import ElicitConfig, elicit_texts
from loracast.models import LoadedModel
from loracast.serialization import make_staging_folder, provenance, replace_folder
from loracast.vocabulary import SharedVocabulary, output_embeddings, restricted_logits

logger = logging.getLogger(__name__)

STUDENTS = ("heads", "lora")
# Written beside the PEFT files of a distilled LoRA; PEFT ignores it.
DISTILLATION_REPORT = "loracast_distillation.json"
TEXTS = ("general", "template", "elicited")
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class RefineConfig:
    """Settings of ``refine_cartridge`` and ``distil_lora``.

    Attributes:
        text: ``general`` (every aligned position of corpus passages), ``elicited`` (every
            aligned position of corpus prefixes continued by the source with the adapter, see
            ``elicit``) or ``template`` (passages filled into ``template``, trained at its last
            position).
        template: the adapter's prompt template with a ``{text}`` field; needed for ``template``.
        max_tokens: source tokens read per passage (``template`` mode cuts the passage itself).
        max_positions: aligned positions in the teacher set, held-out ones included.
        validation_fraction: share of the passages held out for early stopping and diagnostics.
        steps: optimiser steps.
        batch_size: passages per step.
        learning_rate: AdamW learning rate of the trained low-rank matrices (the peak one under
            a schedule).
        lr_schedule: ``constant``, or ``cosine``: the rate rises linearly over
            ``warmup_steps``, then falls along a half cosine to 0 at the last step.
        warmup_steps: steps of the linear rise of the ``cosine`` schedule.
        weight_decay: AdamW weight decay. The trained matrices start at or near a zero change,
            so decay pulls the student toward the target without the adapter.
        max_grad_norm: total L2 norm the gradient is clipped to before each step, or ``None``
            for no clipping.
        weight_positions: weight each position by KL(P_source+adapter ‖ P_source).
        centre_shift: remove the adapter's mean change over all teacher positions from each
            position's change before tilting, so the student learns how the change varies
            between inputs and not a constant shift. A template filled with general text
            makes the adapter favour one label on average, and this is that shift.
        eval_every: steps between held-out evaluations; the best state is kept.
        lora_rank: rank of the ``lora`` student.
        lora_modules: module names of the ``lora`` student.
        seed: seed of the split, the batch order and the ``lora`` student's initialisation.
        elicit: sampling settings of the ``elicited`` text.
        kl_weight: weight of the tilted KL term.
        sequence_weight: weight of the sequence-level distillation term, the student's
            next-token cross-entropy on the tokens the adapter wrote. Needs ``elicited`` text.
        sequence_tokens: tokens per text scored by that term, spread evenly over the sampled
            part; full-vocabulary logits are costly for large vocabularies.
        span_weight: weight of the span term. A span is the text between two consecutive
            aligned positions. The term is the squared difference between the student's change
            of the span's log-likelihood (against the target alone) and the adapter's change
            of it in the source. Both sides score the same characters, so it needs no shared
            vocabulary. Needs ``general`` or ``elicited`` text.
        span_tokens: target tokens per text scored by the span term, in whole spans spread
            evenly over the text.
    """

    text: str = "general"
    template: str | None = None
    max_tokens: int = 96
    max_positions: int = 4000
    validation_fraction: float = 0.1
    steps: int = 100
    batch_size: int = 8
    learning_rate: float = 1e-3
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    weight_positions: bool = True
    centre_shift: bool = False
    eval_every: int = 20
    lora_rank: int = 8
    lora_modules: tuple[str, ...] = ("q_proj", "v_proj")
    seed: int = 0
    elicit: ElicitConfig = field(default_factory=ElicitConfig)
    kl_weight: float = 1.0
    sequence_weight: float = 0.0
    sequence_tokens: int = 32
    span_weight: float = 0.0
    span_tokens: int = 32

    def __post_init__(self) -> None:
        errors = []
        if isinstance(self.elicit, dict):
            self.elicit = ElicitConfig(**self.elicit)
        if self.text not in TEXTS:
            errors.append(f"text must be one of {TEXTS}, got {self.text!r}")
        if self.text == "template" and (not self.template or "{text}" not in self.template):
            errors.append(
                f"text='template' needs a template with a {{text}} field, got {self.template!r}"
            )
        for name in (
            "max_tokens",
            "max_positions",
            "steps",
            "batch_size",
            "eval_every",
            "sequence_tokens",
            "span_tokens",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                errors.append(f"{name} must be a positive integer, got {value!r}")
        if not 0 < self.validation_fraction < 1:
            errors.append(
                f"validation_fraction must be between 0 and 1, got {self.validation_fraction!r}"
            )
        if not self.learning_rate > 0:
            errors.append(f"learning_rate must be positive, got {self.learning_rate!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            errors.append(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if (
            isinstance(self.warmup_steps, bool)
            or not isinstance(self.warmup_steps, int)
            or not 0 <= self.warmup_steps < self.steps
        ):
            errors.append(
                f"warmup_steps must be an integer from 0 to steps - 1 ({self.steps - 1}), "
                f"got {self.warmup_steps!r}"
            )
        if not self.weight_decay >= 0:
            errors.append(f"weight_decay must be non-negative, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            errors.append(f"max_grad_norm must be positive or None, got {self.max_grad_norm!r}")
        weights = {
            "kl_weight": self.kl_weight,
            "sequence_weight": self.sequence_weight,
            "span_weight": self.span_weight,
        }
        negative = {name: value for name, value in weights.items() if not value >= 0}
        if negative:
            errors.append(f"objective weights must be non-negative, got {negative}")
        elif sum(weights.values()) == 0:
            errors.append(
                "kl_weight, sequence_weight and span_weight are all 0; set one of them above 0"
            )
        if self.span_weight > 0 and self.text == "template":
            errors.append(
                "span_weight > 0 needs text='general' or 'elicited' (spans of running text), "
                "got text='template'"
            )
        if self.sequence_weight > 0 and self.text != "elicited":
            errors.append(
                f"sequence_weight > 0 needs text='elicited' (the tokens the adapter wrote), "
                f"got text={self.text!r}"
            )
        if errors:
            raise ValueError("invalid RefineConfig: " + "; ".join(errors))


@dataclass
class SpanTargets:
    """The span term's targets in one text.

    Attributes:
        positions: target positions whose next token lies in a scored span.
        labels: those next tokens' target ids.
        span_of: for each position, the index of its span among this text's scored spans.
        base: the target's own log-probability of each label, without the student's change.
        change: per span, the adapter's change of the span's log-likelihood in the source.
    """

    positions: list[int]
    labels: list[int]
    span_of: list[int]
    base: list[float]
    change: list[float]


@dataclass
class TeacherSet:
    """Teacher distributions at aligned positions of a set of texts.

    Attributes:
        texts: the texts both models read.
        positions: per text, the target token positions used.
        log_teacher: ``(n, n_shared)`` log q* (float16 to save memory), rows in text order.
        source_change: ``(n, n_shared)`` centred change of the source's log-probabilities.
        weights: ``(n,)`` position weights.
        sequence_positions: per elicited text, the target positions whose next token the
            adapter wrote and which the sequence-level term scores (empty for other text).
        sequence_labels: per text, those next tokens' target ids.
        spans: per text, the span term's targets (empty unless ``span_weight`` is above 0).
    """

    texts: list[str]
    positions: list[list[int]]
    log_teacher: torch.Tensor
    source_change: torch.Tensor
    weights: torch.Tensor
    sequence_positions: list[list[int]] = field(default_factory=list)
    sequence_labels: list[list[int]] = field(default_factory=list)
    spans: list[SpanTargets] = field(default_factory=list)

    def rows(self, index: int) -> slice:
        start = sum(len(item) for item in self.positions[:index])
        return slice(start, start + len(self.positions[index]))


@dataclass
class RefineReport:
    """Held-out loss and behaviour cosine of a refinement, before, during and after training."""

    student: str
    config: dict
    positions: int
    validation_positions: int
    history: list[dict] = field(default_factory=list)
    best_step: int = 0
    seconds: float = 0.0
    stopped: str | None = None

    @property
    def initial(self) -> dict:
        return self.history[0]

    @property
    def best(self) -> dict:
        return next(entry for entry in self.history if entry["step"] == self.best_step)


@dataclass
class KernelSwitch:
    """Multiplier of every update that ``kernel_hooks`` adds; 0 turns the adapter off."""

    multiplier: float = 1.0


@contextmanager
def kernel_hooks(model: torch.nn.Module, kernels: dict[Site, Kernel]) -> Iterator[KernelSwitch]:
    """Add each kernel's LoRA update ``scale · B · A · x`` to its site while the context is open.

    A site that is one role of a fused projection adds its update to that role's rows only.
    The context yields a ``KernelSwitch``: setting its multiplier scales every update, so a
    caller can run the model without the adapter inside the context.
    """
    handles = []
    switch = KernelSwitch()

    def make_hook(kernel: Kernel, rows: torch.Tensor | None):
        A, B = kernel.A.float(), kernel.B.float()

        def hook(module, args, output):
            if switch.multiplier == 0:
                return output
            x = args[0]
            scale = kernel.scale * switch.multiplier
            delta = (x.float() @ A.to(x.device).T) @ B.to(x.device).T * scale
            if rows is None:
                return output + delta.to(output.dtype)
            return output.index_add(-1, rows.to(x.device), delta.to(output.dtype))

        return hook

    try:
        for site, kernel in kernels.items():
            module = model.get_submodule(site.module_name)
            hook = make_hook(kernel, output_rows(model, site))
            handles.append(module.register_forward_hook(hook))
        yield switch
    finally:
        for handle in handles:
            handle.remove()


def _final_hidden(model, input_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Final hidden states ``(batch, seq, d)`` without the vocabulary logits."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    mask = torch.ones_like(input_ids) if mask is None else mask
    return decoder_of(base)(input_ids=input_ids, attention_mask=mask, use_cache=False)[0]


def _right_padded(tokenizer, texts: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask ``(batch, seq)``; right padding keeps every position index."""
    encoded = [tokenizer(text)["input_ids"] for text in texts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(encoded), max(map(len, encoded))), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(encoded):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    return ids.to(device), mask.to(device)


def _texts_and_pairs(source, target, kernels, passages, config, show_progress):
    """Cut, fill or continue passages and return ``(texts, [(source_pos, target_pos), ...])``.

    Stops once the texts contain ``config.max_positions`` aligned positions.
    """
    if config.text == "elicited":
        # Consumed inside the context, so every sample is drawn with the adapter attached.
        with kernel_hooks(source.model, kernels) as switch:
            candidates = elicit_texts(
                source.model,
                source.tokenizer,
                passages,
                config.elicit,
                adapter=switch,
                show_progress=show_progress,
            )
            with closing(candidates):
                texts, pairs = _collect(source, target, candidates, config)
        logger.info("elicited %d texts from the source with the adapter", len(texts))
        return texts, pairs
    return _collect(source, target, passages, config)


def _collect(source, target, passages, config):
    """Turn passages into texts with aligned pairs until ``max_positions`` are gathered."""
    texts, pairs, total = [], [], 0
    for passage in passages:
        if total >= config.max_positions:
            break
        if config.text == "template":
            cut = truncate_text(source.tokenizer, passage, max(8, config.max_tokens // 2))
            text = config.template.format(text=cut.strip())
        else:
            text = truncate_text(source.tokenizer, passage, config.max_tokens)
        if not text.strip():
            continue
        aligned = aligned_positions(encode(source.tokenizer, text), encode(target.tokenizer, text))
        if config.text == "template":
            # Only the template's last position, where the adapter's output would start.
            target_length = len(encode(target.tokenizer, text).input_ids)
            aligned = [pair for pair in aligned[-1:] if pair[1] == target_length - 1]
        if aligned:
            texts.append(text)
            pairs.append(aligned)
            total += len(aligned)
    return texts, pairs


def _source_logits(source, text, positions, shared, kernels=None):
    ids = torch.tensor([source.tokenizer(text)["input_ids"]], device=source.device)
    context = kernel_hooks(source.model, kernels) if kernels else _no_hooks()
    with torch.no_grad(), context:
        hidden = _final_hidden(source.model, ids)[0, positions]  # (n, d_source)
    return restricted_logits(source.model, hidden, shared.source_ids)


@contextmanager
def _no_hooks() -> Iterator[None]:
    yield


@contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    """Turn off gradients of the model's own weights, restoring each flag afterwards."""
    flags = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    model.requires_grad_(False)
    try:
        yield
    finally:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(flags.get(name, False))


def build_teacher(
    source: LoadedModel,
    target: LoadedModel,
    kernels: dict[Site, Kernel],
    passages: Sequence[str],
    shared: SharedVocabulary,
    config: RefineConfig,
    *,
    show_progress: bool = True,
) -> TeacherSet:
    """Compute q*, the source's change and the position weights on general passages.

    Raises:
        ValueError: no passage gives an aligned position.
    """
    texts, pairs = _texts_and_pairs(source, target, kernels, passages, config, show_progress)
    kept_texts, kept_positions, teacher, change, weights = [], [], [], [], []
    sequence_positions: list[list[int]] = []
    sequence_labels: list[list[int]] = []
    spans: list[SpanTargets] = []
    total = 0
    for text, aligned in tqdm(
        list(zip(texts, pairs, strict=True)), desc="Teacher", disable=not show_progress
    ):
        if total >= config.max_positions:
            break
        aligned = aligned[: config.max_positions - total]
        source_positions = [pair[0] for pair in aligned]
        target_positions = [pair[1] for pair in aligned]
        base = _source_logits(source, text, source_positions, shared)
        adapted = _source_logits(source, text, source_positions, shared, kernels)
        ids = torch.tensor([target.tokenizer(text)["input_ids"]], device=target.device)
        with torch.no_grad():
            hidden = _final_hidden(target.model, ids)[0, target_positions]
        target_logits = restricted_logits(target.model, hidden, shared.target_ids).cpu()

        log_base, log_adapted = base.log_softmax(-1).cpu(), adapted.log_softmax(-1).cpu()
        shift = log_adapted - log_base  # (n, n_shared)
        if config.centre_shift:
            # Kept apart until the mean shift over all positions is known.
            teacher.append((target_logits.half(), shift.half()))
        else:
            teacher.append((target_logits + shift).log_softmax(-1).half())
        change.append((shift - shift.mean(-1, keepdim=True)).half())
        weights.append((log_adapted.exp() * shift).sum(-1).clamp_min(0.0))
        kept_texts.append(text)
        kept_positions.append(target_positions)
        if config.text == "elicited":
            positions, labels = _sampled_tokens(source, target, text, config)
            sequence_positions.append(positions)
            sequence_labels.append(labels)
        if config.span_weight > 0:
            spans.append(_span_targets(source, target, kernels, text, aligned, config))
        total += len(aligned)
    if not kept_texts:
        raise ValueError("no passage gave an aligned position; pass longer general-corpus passages")
    if config.centre_shift:
        mean_shift = sum(shift.float().sum(0) for _, shift in teacher) / total  # (n_shared,)
        teacher = [
            (logits.float() + shift.float() - mean_shift).log_softmax(-1).half()
            for logits, shift in teacher
        ]
    return TeacherSet(
        texts=kept_texts,
        positions=kept_positions,
        log_teacher=torch.cat(teacher),
        source_change=torch.cat(change),
        weights=torch.cat(weights),
        sequence_positions=sequence_positions,
        sequence_labels=sequence_labels,
        spans=spans,
    )


def _sampled_tokens(source, target, text: str, config: RefineConfig) -> tuple[list[int], list[int]]:
    """Return target positions, and their next tokens, in the part of ``text`` the adapter wrote.

    The prompt is taken to be the characters read within the source's first
    ``elicit.prefix_tokens`` tokens. At most ``sequence_tokens`` positions are kept, evenly
    spaced.
    """
    prompt_chars = len(truncate_text(source.tokenizer, text, config.elicit.prefix_tokens))
    encoded = encode(target.tokenizer, text)
    candidates = [
        index - 1
        for index in range(1, len(encoded.input_ids))
        if not encoded.special[index] and encoded.offsets[index][0] >= prompt_chars
    ]
    if len(candidates) > config.sequence_tokens:
        step = len(candidates) / config.sequence_tokens
        candidates = [candidates[int(k * step)] for k in range(config.sequence_tokens)]
    return candidates, [encoded.input_ids[index + 1] for index in candidates]


def _next_token_log_probs(model, ids: torch.Tensor, kernels=None) -> torch.Tensor:
    """Return the log-probability of each next token of ``ids`` ``(1, n)``: ``(n - 1,)``."""
    context = kernel_hooks(model, kernels) if kernels else _no_hooks()
    with torch.no_grad(), context:
        hidden = _final_hidden(model, ids)[0, :-1]
        log_probs = _full_logits(model, hidden).log_softmax(-1)
    return log_probs.gather(1, ids[0, 1:, None])[:, 0].cpu()


def _span_targets(source, target, kernels, text: str, aligned, config) -> SpanTargets:
    """Return the span term's targets: spans between consecutive aligned positions of ``text``.

    Whole spans are taken evenly over the text until ``span_tokens`` target tokens are scored.
    The source's change of a span is the sum, over its source tokens, of the adapter's change
    of each token's log-probability.

    NOTE: this runs the source twice and the target once more per text, on top of the passes
    ``build_teacher`` already makes over the same text; sharing them would remove that cost.
    """
    source_ids = torch.tensor([source.tokenizer(text)["input_ids"]], device=source.device)
    source_change = _next_token_log_probs(source.model, source_ids, kernels)
    source_change -= _next_token_log_probs(source.model, source_ids)
    bounds = list(zip(aligned, aligned[1:], strict=False))
    target_tokens = sum(end[1] - start[1] for start, end in bounds)
    stride = max(1, round(target_tokens / config.span_tokens))
    positions, span_of, change = [], [], []
    for start, end in bounds[::stride]:
        if len(positions) + end[1] - start[1] > config.span_tokens:
            break
        positions += range(start[1], end[1])
        span_of += [len(change)] * (end[1] - start[1])
        change.append(float(source_change[start[0] : end[0]].sum()))
    target_ids = target.tokenizer(text)["input_ids"]
    labels = [target_ids[position + 1] for position in positions]
    base: list[float] = []
    if positions:
        ids = torch.tensor([target_ids], device=target.device)
        with torch.no_grad():
            hidden = _final_hidden(target.model, ids)[0, positions]
            log_probs = _full_logits(target.model, hidden).log_softmax(-1)
        base = log_probs.gather(1, torch.tensor(labels, device=log_probs.device)[:, None])
        base = base[:, 0].tolist()
    return SpanTargets(positions, labels, span_of, base, change)


def _full_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Return next-token logits over the whole vocabulary from final hidden states ``(n, d)``."""
    logits = output_embeddings(model)(hidden)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cap = getattr(base.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


@dataclass
class _Student:
    """The parts of a student that the training loop uses.

    ``switched_off`` is a context manager that turns the student's delta off, so the target
    alone can be measured.
    """

    model: torch.nn.Module
    tokenizer: object
    parameters: list[torch.nn.Parameter]
    switched_off: object


def _batch_loss(student: _Student, teacher: TeacherSet, indices, shared, config, weighted):
    """Compute the objective on texts ``indices``: its value, its terms and the student's log-probs.

    The terms are the weighted KL(q* ‖ student) over aligned positions (``kl``) and, when
    ``config.sequence_weight`` is above 0, the next-token cross-entropy on the sampled tokens
    (``sequence_ce``) and, when ``config.span_weight`` is above 0, the span term (``span``).
    """
    device = student.parameters[0].device
    ids, mask = _right_padded(student.tokenizer, [teacher.texts[i] for i in indices], device)
    hidden = _final_hidden(student.model, ids, mask)  # (batch, seq, d_target)
    rows = [torch.full((len(teacher.positions[i]),), k) for k, i in enumerate(indices)]
    columns = [torch.tensor(teacher.positions[i]) for i in indices]
    selected = hidden[torch.cat(rows).to(device), torch.cat(columns).to(device)]  # (n, d_target)
    log_student = restricted_logits(student.model, selected, shared.target_ids).log_softmax(-1)

    spans = [teacher.rows(i) for i in indices]
    log_teacher = torch.cat([teacher.log_teacher[span] for span in spans]).float().to(device)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)  # (n,)
    if weighted:
        weight = torch.cat([teacher.weights[span] for span in spans]).to(device)
    else:
        weight = torch.ones_like(kl)
    sizes = [len(teacher.positions[i]) for i in indices]
    log_probs = list(log_student.detach().cpu().split(sizes))
    terms = {"kl": (kl * weight).sum() / weight.sum().clamp_min(1e-12)}
    loss = config.kl_weight * terms["kl"]
    if config.sequence_weight > 0:
        rows = [torch.full((len(teacher.sequence_positions[i]),), k) for k, i in enumerate(indices)]
        columns = [torch.tensor(teacher.sequence_positions[i], dtype=torch.long) for i in indices]
        labels = torch.tensor(
            [label for i in indices for label in teacher.sequence_labels[i]], dtype=torch.long
        )
        if labels.numel():
            sampled = hidden[torch.cat(rows).to(device), torch.cat(columns).to(device)]
            logits = _full_logits(student.model, sampled)
            terms["sequence_ce"] = F.cross_entropy(logits, labels.to(device))
            loss = loss + config.sequence_weight * terms["sequence_ce"]
    if config.span_weight > 0:
        terms["span"] = _span_loss(student, teacher, indices, hidden)
        loss = loss + config.span_weight * terms["span"]
    return loss, {name: float(value.detach()) for name, value in terms.items()}, log_probs


def _span_loss(student: _Student, teacher: TeacherSet, indices, hidden) -> torch.Tensor:
    """Return the mean squared difference of the student's and the source's span changes."""
    device = hidden.device
    spans = [teacher.spans[i] for i in indices]
    rows = torch.cat(
        [torch.full((len(item.positions),), k, dtype=torch.long) for k, item in enumerate(spans)]
    )
    columns = torch.tensor([p for item in spans for p in item.positions], dtype=torch.long)
    if not len(columns):
        return hidden.new_zeros(())
    labels = torch.tensor([label for item in spans for label in item.labels], device=device)
    log_probs = _full_logits(student.model, hidden[rows.to(device), columns.to(device)])
    change = log_probs.log_softmax(-1).gather(1, labels[:, None])[:, 0]
    change = change - torch.tensor([b for item in spans for b in item.base], device=device)
    offsets, span_of = 0, []
    for item in spans:
        span_of += [offsets + index for index in item.span_of]
        offsets += len(item.change)
    student_change = change.new_zeros(offsets).index_add(
        0, torch.tensor(span_of, device=device), change
    )
    source_change = torch.tensor([c for item in spans for c in item.change], device=device)
    return ((student_change - source_change) ** 2).mean()


def _evaluate(student: _Student, teacher, indices, shared, reference, config) -> dict:
    """Return the held-out objective, its terms and the behaviour cosine against ``reference``."""
    with torch.no_grad():
        loss, terms, log_probs = _batch_loss(
            student, teacher, indices, shared, config, config.weight_positions
        )
    change = torch.cat(log_probs) - torch.cat(reference)  # (n, n_shared)
    change = change - change.mean(-1, keepdim=True)
    source_change = torch.cat([teacher.source_change[teacher.rows(i)].float() for i in indices])
    cosine = F.cosine_similarity(change.flatten(), source_change.flatten(), dim=0)
    return {"loss": float(loss), **terms, "behaviour_cosine": float(cosine)}


def _split(n_texts: int, config: RefineConfig) -> tuple[list[int], list[int]]:
    order = list(range(n_texts))
    random.Random(config.seed).shuffle(order)
    n_val = max(1, int(n_texts * config.validation_fraction))
    if n_texts - n_val < 1:
        raise ValueError(f"{n_texts} teacher texts cannot be split; pass more passages")
    return sorted(order[n_val:]), sorted(order[:n_val])


def learning_rate_factor(step: int, config: RefineConfig) -> float:
    """Return the share of ``config.learning_rate`` used at optimiser step ``step`` (from 1)."""
    if config.lr_schedule == "constant":
        return 1.0
    if step <= config.warmup_steps:
        return step / config.warmup_steps
    done = (step - 1 - config.warmup_steps) / (config.steps - config.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * done))


def _train(student: _Student, teacher, shared, config, name, show_progress) -> RefineReport:
    """Train the student's parameters; restores the ones with the best held-out KL."""
    train, val = _split(len(teacher.texts), config)
    report = RefineReport(
        student=name,
        config=asdict(config),
        positions=int(teacher.weights.numel()),
        validation_positions=sum(len(teacher.positions[i]) for i in val),
    )
    started = time.perf_counter()
    with student.switched_off(), torch.no_grad():
        _, _, reference = _batch_loss(student, teacher, val, shared, config, False)

    def evaluate(step: int, **extra) -> float:
        entry = _evaluate(student, teacher, val, shared, reference, config)
        report.history.append({"step": step, **entry, **extra})
        logger.info(
            "step %d: held-out loss %.4f (KL %.4f), behaviour cosine %.3f",
            step,
            entry["loss"],
            entry["kl"],
            entry["behaviour_cosine"],
        )
        return entry["loss"]

    best = (evaluate(0), [parameter.detach().clone() for parameter in student.parameters])
    optimizer = torch.optim.AdamW(
        student.parameters, lr=config.learning_rate, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda done: learning_rate_factor(done + 1, config)
    )
    rng = random.Random(config.seed + 1)
    for step in tqdm(range(1, config.steps + 1), desc="Refining", disable=not show_progress):
        batch = rng.sample(train, min(config.batch_size, len(train)))
        loss, _, _ = _batch_loss(student, teacher, batch, shared, config, config.weight_positions)
        if not torch.isfinite(loss):
            logger.warning(
                "refinement loss became %s at step %d; stopping with the best state so far "
                "(step %d); lower RefineConfig.learning_rate",
                loss.item(),
                step,
                report.best_step,
            )
            report.stopped = f"non-finite loss at step {step}"
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(student.parameters, config.max_grad_norm)
        learning_rate = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        if step % config.eval_every == 0 or step == config.steps:
            held_out = evaluate(step, train_loss=loss.item(), learning_rate=learning_rate)
            if held_out < best[0]:
                best = (held_out, [parameter.detach().clone() for parameter in student.parameters])
                report.best_step = step
    with torch.no_grad():
        for parameter, kept in zip(student.parameters, best[1], strict=True):
            parameter.copy_(kept)
    report.seconds = time.perf_counter() - started
    if report.best_step == 0:
        logger.warning(
            "%s refinement never lowered the held-out loss below its start (%.4f), so the student "
            "is unchanged; lower RefineConfig.learning_rate (now %g) or set max_grad_norm",
            name,
            report.initial["loss"],
            config.learning_rate,
        )
    return report


def refine_cartridge(
    cartridge: Cartridge,
    target: LoadedModel,
    teacher: TeacherSet,
    shared: SharedVocabulary,
    config: RefineConfig | None = None,
    *,
    show_progress: bool = True,
) -> tuple[Cartridge, RefineReport]:
    """Refine a copy of ``cartridge``'s heads with the behavioural objective.

    The kernel and the bridge's heads stay frozen; each site gains zero-initialised low-rank
    corrections (``CarriedSite.add_corrections``) that are trained, so the result belongs to
    this adapter.

    Returns:
        The refined cartridge (a copy; ``cartridge`` is unchanged) and the report.
    """
    config = config or RefineConfig()
    refined = copy.deepcopy(cartridge)
    refined.requires_grad_(False)
    for carried in refined.carried.values():
        carried.add_corrections()
    parameters = [
        parameter
        for carried in refined.carried.values()
        for parameter in (carried.read_correction, carried.write_correction)
    ]

    @contextmanager
    def switched_off() -> Iterator[None]:
        refined.enabled = False
        try:
            yield
        finally:
            refined.enabled = True

    student = _Student(target.model, target.tokenizer, parameters, switched_off)
    with _frozen(target.model), refined.attached(target):
        report = _train(student, teacher, shared, config, "heads", show_progress)
    refined.requires_grad_(False)
    refined.refinement = {
        "objective": "tilted_kl_shared_vocabulary",
        "kl_weight": config.kl_weight,
        "sequence_weight": config.sequence_weight,
        "text": config.text,
        "template": config.template,
        "report": asdict(report),
    }
    return refined, report


def distil_lora(
    target: LoadedModel,
    teacher: TeacherSet,
    shared: SharedVocabulary,
    out_dir,
    config: RefineConfig | None = None,
    *,
    show_progress: bool = True,
) -> RefineReport:
    """Train a fresh PEFT LoRA on the target with the behavioural objective; save it to ``out_dir``.

    This is the distillation baseline: the same objective and text as ``refine_cartridge``,
    without the source's kernel or the bridge. The folder is written atomically and contains,
    beside the PEFT files, ``DISTILLATION_REPORT`` with the settings and held-out history.
    """
    from peft import LoraConfig, get_peft_model

    config = config or RefineConfig()
    torch.manual_seed(config.seed)
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=2 * config.lora_rank,
        target_modules=lora_target_modules(target.model, config.lora_modules),
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        base_model_name_or_path=target.name,
    )
    flags = {name: parameter.requires_grad for name, parameter in target.model.named_parameters()}
    peft_model = get_peft_model(target.model, lora)
    parameters = [parameter for parameter in peft_model.parameters() if parameter.requires_grad]
    student = _Student(peft_model, target.tokenizer, parameters, peft_model.disable_adapter)
    try:
        report = _train(student, teacher, shared, config, "lora", show_progress)
        out_dir = Path(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = make_staging_folder(out_dir)
        try:
            peft_model.save_pretrained(str(staging))
            record = {"report": asdict(report), "provenance": provenance()}
            (staging / DISTILLATION_REPORT).write_text(json.dumps(record, indent=2) + "\n")
            replace_folder(staging, out_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    finally:
        target.model = peft_model.unload()
        for name, parameter in target.model.named_parameters():
            parameter.requires_grad_(flags.get(name, False))
    return report
