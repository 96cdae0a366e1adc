"""Behaviour matching: does refining a carried adapter on its behaviour recover the gain?

Usage:
    python benchmarks/behaviour.py                       # SmolLM2 -> Gemma-3, sentiment
    python benchmarks/behaviour.py --direction reverse   # Gemma-3 -> SmolLM2
    python benchmarks/behaviour.py --task shakespeare    # or arithmetic; general and elicited text
    python benchmarks/behaviour.py --quick               # smoke test; numbers mean nothing
    python benchmarks/behaviour.py --corpus-sizes 1000 2000 4000
                                   # add gain recovered against the amount of general text
    python benchmarks/behaviour.py --task shakespeare --settings elicited-mixed \
        --corpus-sizes 2000 4000   # the same for one setting of another task
    python benchmarks/behaviour.py --merge-from /tmp/run/behaviour.json
                                   # fold a run written with --out /tmp/run into docs/
    python benchmarks/behaviour.py --task shakespeare --settings elicited-mixed --seed 1
                                   # another seed: rows named *-seed1, kept beside seed 0

A rerun of some settings replaces those settings' rows of its direction and task and keeps the
other rows, each with the command that produced it. A seed draws the elicited text, the
held-out teacher texts, the batch order and the student's initialisation. Rows of seeds other than 0
stay beside the seed-0 row, and the page adds their mean and spread.

It reuses the main benchmark's cached adapters and bridges (``benchmarks/run.py`` trains and fits
them when missing) and adds, for the chosen task:

- ``refined-heads-general``: the default cartridge's heads refined with the tilted-KL objective
  (``loracast.refine``) on general text only, the strict no-task-data setting;
- ``distilled-lora-general``: a fresh target LoRA trained with the same objective and text, the
  distillation baseline the kernel and heads must beat;
- ``refined-heads-elicited`` and ``distilled-lora-elicited``: the same on text elicited from the
  adapter, general-corpus prefixes of 8 tokens continued by sampling from the source with the
  adapter (``loracast.elicit``). No task data: the adapter writes the text on which it acts.
  The default for arithmetic and Shakespeare, and ``--settings`` adds it to sentiment;
- ``*-elicited-sequence``: the same elicited text, trained by sequence-level distillation: the
  student's next-token cross-entropy, over its whole vocabulary, on tokens the adapter sampled
  (``RefineConfig.sequence_weight``), with no KL term. It needs no shared vocabulary;
- ``*-elicited-mixed``: the tilted KL plus that cross-entropy, with equal weights;
- ``*-elicited-amplified``: as ``*-elicited-mixed``, on text sampled from the source's logits
  ``base + a · (adapted − base)`` (``ElicitConfig.amplification``, ``--amplification``,
  default 3). The adapter's change is amplified, so the text moves further toward what the
  adapter favours. Each sampled token costs one more forward pass without the adapter;
- ``*-elicited-nucleus``: as ``*-elicited-mixed``, on text sampled from the nucleus of the
  adapted source's distribution: each token comes from the most likely tokens that make up
  ``top_p`` of the probability (``ElicitConfig.top_p``, ``--top-p``, default 0.9), at the
  plan's temperature (``--temperature``, default 1). A small model sampled from its whole
  distribution writes many unlikely tokens, and the text drifts away from any real domain;
- ``*-elicited-span``: the same elicited text, trained on the tilted KL plus the span term
  (``RefineConfig.span_weight``): for the text between two consecutive aligned positions, the
  student's change of its log-likelihood against the target alone is matched, by squared
  error, to the adapter's change of it in the source. Both sides score the same characters, so
  the term does not depend on the shared vocabulary, unlike the KL;
- ``*-elicited-mixed-span``: the tilted KL, the sampled tokens' cross-entropy and the span
  term, with equal weights;
- ``*-elicited-wide``: as ``*-elicited-mixed``, with a distilled LoRA of rank 32 (``--wide-rank``)
  on every attention and MLP projection instead of rank 8 on the query and value projections. It
  shows whether the student's size limits what it learns;
- ``*-elicited-dense``: as ``*-elicited-mixed``, with the cross-entropy on every sampled token
  instead of 32 evenly spread tokens per text (``RefineConfig.sequence_tokens``);
- ``*-elicited-open``: as ``*-elicited-mixed``, but the prompt is the first token of each passage
  and the adapter samples the other 95 tokens, so the text is the adapter's own and not a
  continuation of a news article;
- ``*-elicited-cosine``: as ``*-elicited-mixed``, with a learning rate that rises linearly over
  the plan's ``warmup_steps`` and then falls along a half cosine to 0 at the last step, instead
  of a constant one. Under the constant rate every held-out curve turns upward after 20 to 60
  steps, and this setting tests whether a decaying rate avoids that;
- sentiment only, ``refined-heads-template`` and ``distilled-lora-template``: the same on
  general passages filled into the adapter's prompt template (``Tweet: {text}\\nSentiment:``),
  trained at its last position. This second setting uses the template, a small piece of task
  information, but no labels and no task examples;
- ``refined-heads-template-centred`` and ``distilled-lora-template-centred``: the same, with the
  adapter's mean change over all filled templates removed from the teacher. Filled with general
  text, the template makes the adapter favour one label on average, and the student should not
  learn that constant shift;
- ``refined-heads-task-text`` and ``distilled-lora-task-text``: a diagnostic, not a method. The
  tilted KL on the adapter's own training text (each training pair's prompt and completion), so
  the student learns the adapter's change at the positions where it was trained. It uses task
  data, so it is never a no-task-data result. It is a ceiling for the text: it shows how much of
  what the strict settings miss is lost to the text, and how much to the objective and the
  student;
- ``cartridge-mlp-cka``: the unrefined cartridge of an MLP bridge fitted like the default one,
  but with each source layer matched to a target layer by the linear CKA of the residual streams
  on the corpus (``loracast.layer_map``) instead of equal relative depth. An ablation of the
  layer map;
- ``logit-arithmetic``: for sentiment, the target's choice log-likelihoods plus the source
  adapter's change of them (proxy-tuning at the sequence level); for Shakespeare, the target's
  next-token logits plus the source adapter's change over the shared vocabulary at aligned
  positions (``loracast.logit_arithmetic``), the distribution the tilted-KL teacher aims at.
  Both need the source and source + adapter at inference;
- ``control-label-bias``: the best constant bias on the target's three label scores, fitted on
  the labelled validation split. A control, not a method: a carried adapter that only moves the
  label prior is not transfer.

The template settings and the label-bias control are run for sentiment only, and logit
arithmetic for sentiment and Shakespeare.

Beside the score and gain recovered it reports three more figures. The push (sentiment only)
is the mean change of the correct label's centred log-likelihood against the target base. The
behaviour cosine is measured on held-out corpus positions. The side effect on general text is
the change of bits per byte on corpus passages never used for fitting.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel

sys.path.insert(0, str(Path(__file__).resolve().parent))

from label_bias_control import best_constant_bias  # noqa: E402
from report import _atomic_write, run_header  # noqa: E402
from run import (  # noqa: E402
    CKA_BRIDGE,
    MODELS,
    ROOT,
    Settings,
    _commit,
    _fit_bridges,
    _machine,
    _train_adapter,
)
from tasks import TASKS  # noqa: E402

from loracast.adapters import load_adapter  # noqa: E402
from loracast.cartridge import Cartridge, build_cartridge  # noqa: E402
from loracast.corpus import load_corpus  # noqa: E402
from loracast.elicit import ElicitConfig  # noqa: E402
from loracast.eval.language_modeling import evaluate_language_modeling  # noqa: E402
from loracast.eval.metrics import bootstrap_ci, gain_recovered, negative_flips  # noqa: E402
from loracast.eval.sentiment import PROMPT_TEMPLATE, evaluate_sentiment  # noqa: E402
from loracast.logit_arithmetic import LogitArithmetic  # noqa: E402
from loracast.models import load_model  # noqa: E402
from loracast.packages import cache_dir  # noqa: E402
from loracast.refine import RefineConfig, build_teacher, distil_lora, refine_cartridge  # noqa: E402
from loracast.vocabulary import shared_vocabulary  # noqa: E402

logger = logging.getLogger("behaviour")

DEFAULT_BRIDGE = "cartridge-mlp-seed0"
# Rows every comparison starts with; students follow them.
BASE_ROWS = (
    "target-base",
    "target-retrained",
    "source-base",
    "source-adapter",
    DEFAULT_BRIDGE,
    CKA_BRIDGE,
)
HELD_OUT_PASSAGES = 24


@dataclass
class Plan:
    """Sizes of the experiment."""

    general_positions: int = 8000
    template_passages: int = 400
    steps: int = 100
    batch_size: int = 8
    learning_rate: float = 1e-3
    max_grad_norm: float | None = None
    n_validation: int = 200
    seed: int = 0
    amplification: float = 3.0
    wide_rank: int = 32
    warmup_steps: int = 10
    samples_per_prefix: int = 1
    top_p: float = 0.9
    temperature: float = 1.0

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            general_positions=200,
            template_passages=24,
            steps=4,
            batch_size=2,
            n_validation=12,
            warmup_steps=1,
        )


def _sentiment(model, tokenizer, examples):
    started = time.perf_counter()
    result = evaluate_sentiment(model, tokenizer, examples, show_progress=False)
    return result, time.perf_counter() - started


def _with_adapter(loaded, folder, function):
    peft_model = PeftModel.from_pretrained(loaded.model, str(folder))
    peft_model.eval()
    try:
        return function(peft_model)
    finally:
        loaded.model = peft_model.unload()


def _with_cartridge(loaded, cartridge, function):
    with cartridge.attached(loaded):
        return function(loaded.model)


def _with_student(loaded, student, function):
    """Run ``function(model)`` with one trained student attached: a cartridge or an adapter."""
    kind, artifact, _ = student
    wrap = _with_cartridge if kind == "cartridge" else _with_adapter
    return wrap(loaded, artifact, function)


def _bits_per_byte(model, tokenizer, passages) -> float:
    return evaluate_language_modeling(
        model, tokenizer, passages, max_tokens=128, batch_size=2, show_progress=False
    ).bits_per_byte


def _centred(scores: torch.Tensor) -> torch.Tensor:
    return scores - scores.mean(1, keepdim=True)


def _row(method, scores, labels, base, retrained, data, **extra) -> dict:
    """Accuracy, gain recovered with interval, flips and push for label scores ``(n, 3)``."""
    correct = (scores.argmax(1) == labels).numpy().astype(float)
    base_correct = (base.argmax(1) == labels).numpy().astype(float)
    reference = (retrained.argmax(1) == labels).numpy().astype(float)
    push = (_centred(scores) - _centred(base)).gather(1, labels[:, None]).mean().item()
    return {
        "method": method,
        "data": data,
        "score": float(correct.mean()),
        "gain_recovered": gain_recovered(correct, base_correct, reference, higher_is_better=True),
        "gain_recovered_ci": list(
            bootstrap_ci(correct, base_correct, reference, higher_is_better=True)
        ),
        "negative_flips": negative_flips(base_correct.astype(bool), correct.astype(bool)),
        "push_toward_correct_label": push,
        "mean_shift_per_label": (_centred(scores) - _centred(base)).mean(0).tolist(),
        **extra,
    }


def _refine_config(setting: str, plan: Plan) -> RefineConfig:
    """Return the refinement settings of one text setting and objective."""
    text = "general" if setting in TASK_TEXT_SETTINGS else setting.split("-")[0]
    # The open setting keeps one token of each passage and samples the tokens it drops instead,
    # so its texts are as long as the other settings'.
    prefix = 1 if setting == "elicited-open" else ElicitConfig.prefix_tokens
    elicit = ElicitConfig(
        seed=plan.seed,
        prefix_tokens=prefix,
        new_tokens=ElicitConfig.new_tokens + ElicitConfig.prefix_tokens - prefix,
        amplification=plan.amplification if setting == "elicited-amplified" else 1.0,
        top_p=plan.top_p if setting == "elicited-nucleus" else 1.0,
        temperature=plan.temperature if setting == "elicited-nucleus" else 1.0,
        samples_per_prefix=plan.samples_per_prefix,
    )
    return RefineConfig(
        text=text,
        template=PROMPT_TEMPLATE if text == "template" else None,
        max_positions=plan.template_passages if text == "template" else plan.general_positions,
        steps=plan.steps,
        batch_size=plan.batch_size,
        learning_rate=plan.learning_rate,
        lr_schedule="cosine" if setting == "elicited-cosine" else "constant",
        warmup_steps=plan.warmup_steps if setting == "elicited-cosine" else 0,
        max_grad_norm=plan.max_grad_norm,
        centre_shift=setting == "template-centred",
        kl_weight=0.0 if setting == "elicited-sequence" else 1.0,
        sequence_weight=1.0 if setting in SEQUENCE_SETTINGS else 0.0,
        sequence_tokens=elicit.new_tokens if setting == "elicited-dense" else 32,
        span_weight=1.0 if setting in SPAN_SETTINGS else 0.0,
        lora_rank=plan.wide_rank if setting == "elicited-wide" else 8,
        lora_modules=WIDE_MODULES if setting == "elicited-wide" else ("q_proj", "v_proj"),
        seed=plan.seed,
        elicit=elicit,
    )


def student_method(kind: str, setting: str, seed: int = 0) -> str:
    """Return a student's row name: seed 0 keeps the plain name that earlier reports used."""
    prefix = "refined-heads" if kind == "heads" else "distilled-lora"
    return f"{prefix}-{setting}" + (f"-seed{seed}" if seed else "")


def parse_student(method: str) -> tuple[str, str, int] | None:
    """Return ``(kind, setting, seed)`` of a student row's name, or None for other rows."""
    for kind, prefix in zip(("heads", "lora"), STUDENT_PREFIXES, strict=True):
        if method.startswith(prefix):
            setting, _, seed = method[len(prefix) :].rpartition("-seed")
            if setting and seed.isdigit():
                return kind, setting, int(seed)
            return kind, method[len(prefix) :], 0
    return None


def _students(setup, plan, out, settings_run, kinds):
    """Train every (setting, student) variant; returns ``{method: (kind, artifact, report)}``.

    Settings that differ only in the objective share one teacher.
    """
    students, teachers = {}, {}
    for setting in settings_run:
        config = _refine_config(setting, plan)
        started = time.perf_counter()
        elicit = config.elicit
        key = (config.text, config.centre_shift, elicit.amplification, elicit.top_p)
        key += (elicit.temperature, config.span_weight > 0, elicit.prefix_tokens)
        key += (config.sequence_tokens,)
        key += (setting in TASK_TEXT_SETTINGS,)
        if key not in teachers:
            passages = setup.task_texts if setting in TASK_TEXT_SETTINGS else setup.passages
            teachers[key] = build_teacher(
                setup.source, setup.target, setup.kernels, passages, setup.shared, config
            )
        teacher = teachers[key]
        teacher_seconds = time.perf_counter() - started
        if "heads" in kinds:
            refined, report = refine_cartridge(
                setup.cartridge, setup.target, teacher, setup.shared, config
            )
            report.seconds += teacher_seconds
            students[student_method("heads", setting, plan.seed)] = ("cartridge", refined, report)
        if "lora" in kinds:
            method = student_method("lora", setting, plan.seed)
            report = distil_lora(setup.target, teacher, setup.shared, out / method, config)
            report.seconds += teacher_seconds
            students[method] = ("adapter", out / method, report)
    return students


SETTINGS = (
    "general",
    "elicited",
    "elicited-sequence",
    "elicited-mixed",
    "elicited-amplified",
    "elicited-nucleus",
    "elicited-span",
    "elicited-mixed-span",
    "elicited-wide",
    "elicited-dense",
    "elicited-open",
    "elicited-cosine",
    "template",
    "template-centred",
    "task-text",
)
# Settings trained on the sampled tokens' cross-entropy.
SEQUENCE_SETTINGS = (
    "elicited-sequence",
    "elicited-mixed",
    "elicited-amplified",
    "elicited-nucleus",
    "elicited-mixed-span",
    "elicited-wide",
    "elicited-dense",
    "elicited-open",
    "elicited-cosine",
)
# Settings trained on the span term.
SPAN_SETTINGS = ("elicited-span", "elicited-mixed-span")
# Modules of the wide student: every attention and MLP projection.
WIDE_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Settings run when --settings is not given. The template settings need a prompt template with
# a free-text field, which only the sentiment task has.
TASK_SETTINGS = {
    "sentiment": ("general", "template", "template-centred"),
    "arithmetic": ("general", "elicited", "elicited-sequence", "elicited-mixed"),
    "shakespeare": ("general", "elicited", "elicited-sequence", "elicited-mixed"),
}
DATA = {
    "general": "general corpus text only",
    "elicited": "general-corpus prefixes of 8 tokens continued by sampling from the source with "
    "the adapter (no task data)",
    "elicited-sequence": "as elicited; trained on the sampled tokens' cross-entropy instead of "
    "the tilted KL",
    "elicited-mixed": "as elicited; tilted KL plus the sampled tokens' cross-entropy",
    "elicited-amplified": "as elicited-mixed, but sampled from base + a · (adapted − base) "
    "logits of the source, which pushes the text toward what the adapter favours (a in the plan)",
    "elicited-nucleus": "as elicited-mixed, but each token is sampled from the nucleus of the "
    "adapted source's distribution (top_p and temperature in the plan), which keeps the text "
    "closer to what the source writes well",
    "elicited-span": "as elicited; tilted KL plus the span term (the change of each span's "
    "log-likelihood between aligned positions, matched to the source's)",
    "elicited-mixed-span": "as elicited; tilted KL, the sampled tokens' cross-entropy and the "
    "span term",
    "elicited-wide": "as elicited-mixed; the student is a LoRA of higher rank on every attention "
    "and MLP projection (wide_rank in the plan)",
    "elicited-dense": "as elicited-mixed; the cross-entropy scores every sampled token, not 32 "
    "per text",
    "elicited-open": "as elicited-mixed, but the prompt is the first token of each passage only, "
    "so the adapter writes nearly the whole text",
    "elicited-cosine": "as elicited-mixed; the learning rate warms up, then decays along a "
    "cosine to 0 (warmup_steps in the plan)",
    "template": "general corpus text in the prompt template (no labels, no task examples)",
    "template-centred": "as template; the adapter's mean change over the filled templates is "
    "removed from the teacher",
    "task-text": "diagnostic, not a method: the adapter's own training text (prompts and "
    "completions), tilted KL only; it uses task data, to show how much the text limits the "
    "strict settings",
}
LOGIT_ARITHMETIC_DATA = "source and source + adapter at inference, no training"
CKA_DATA = (
    "general corpus text only; the default MLP bridge with layers matched by linear CKA of the "
    "standardised residual streams instead of relative depth"
)
# Settings whose teacher reads the adapter's training text instead of the general corpus.
TASK_TEXT_SETTINGS = ("task-text",)


def _evaluate_all(setup, students, evaluate):
    """Score every model on the test split and on held-out general passages (bits per byte).

    ``evaluate(model, tokenizer)`` scores one model on the task and returns
    ``(result, seconds)``.
    """
    source, target = setup.source, setup.target

    def task(model):
        return evaluate(model, target.tokenizer)

    def general(model):
        return _bits_per_byte(model, target.tokenizer, setup.held_out)

    evaluations = {
        "target-base": task(target.model),
        "target-retrained": _with_adapter(target, setup.retrained, task),
        "source-base": evaluate(source.model, source.tokenizer),
        "source-adapter": _with_adapter(
            source, setup.source_adapter, lambda model: evaluate(model, source.tokenizer)
        ),
        DEFAULT_BRIDGE: _with_cartridge(target, setup.cartridge, task),
        CKA_BRIDGE: _with_cartridge(target, setup.cka_cartridge, task),
    }
    bpb = {
        "target-base": general(target.model),
        "target-retrained": _with_adapter(target, setup.retrained, general),
        DEFAULT_BRIDGE: _with_cartridge(target, setup.cartridge, general),
        CKA_BRIDGE: _with_cartridge(target, setup.cka_cartridge, general),
    }
    for method, student in students.items():
        evaluations[method] = _with_student(target, student, task)
        bpb[method] = _with_student(target, student, general)
    return evaluations, bpb


def _extra(method, seconds, bpb, students) -> dict:
    """Return the evaluation time, side effect and training figures of one method's row."""
    extra = {"eval_seconds": round(seconds, 1)}
    if method in bpb:
        extra["general_bpb_change"] = bpb[method] - bpb["target-base"]
    if method in students:
        extra.update(_student_extra(students[method][2]))
    if method == DEFAULT_BRIDGE:
        extra.update(_cartridge_start(students))
    return extra


def _data(method, students) -> str:
    """Return what a row's method saw: a student's setting, else the main benchmark's note."""
    if method in students:
        return DATA[parse_student(method)[1]]
    return CKA_DATA if method == CKA_BRIDGE else "see the main benchmark"


@dataclass
class Setup:
    """Models, adapters, bridge and splits shared by the main run and the ablations."""

    source: object
    target: object
    passages: list[str]
    held_out: list[str]
    task: object
    test: list
    validation: list
    source_adapter: Path
    retrained: Path
    kernels: dict
    cartridge: Cartridge
    cka_cartridge: Cartridge
    shared: object
    task_texts: list[str]


def _setup(direction: str, task_name: str, settings: Settings, cache: Path) -> Setup:
    source_name, target_name = MODELS if direction == "forward" else MODELS[::-1]
    source, target = load_model(source_name), load_model(target_name)
    corpus = load_corpus(settings.corpus, max_passages=settings.max_passages + HELD_OUT_PASSAGES)
    # The bridge corpus is a prefix of this shuffled list, so the tail was never fitted on.
    passages, held_out = corpus[: settings.max_passages], corpus[settings.max_passages :]
    task = TASKS[task_name]
    train, test = task.splits(0, *settings.sizes(task_name))
    validation = task.validation(0, *settings.sizes(task_name))[: len(test)]
    source_adapter, _ = _train_adapter(source, task, train, settings, cache)
    retrained, _ = _train_adapter(target, task, train, settings, cache)
    kernels = load_adapter(source_adapter).kernels
    bridges, _ = _fit_bridges(
        source,
        target,
        passages,
        sorted(kernels, key=lambda s: (s.layer, s.module)),
        settings,
        cache,
    )
    return Setup(
        source=source,
        target=target,
        passages=passages,
        held_out=held_out,
        task=task,
        test=test,
        validation=validation,
        source_adapter=source_adapter,
        retrained=retrained,
        kernels=kernels,
        cartridge=build_cartridge(bridges[DEFAULT_BRIDGE], load_adapter(source_adapter)),
        cka_cartridge=build_cartridge(bridges[CKA_BRIDGE], load_adapter(source_adapter)),
        shared=shared_vocabulary(source.tokenizer, target.tokenizer),
        task_texts=task_texts(task, train),
    )


def task_texts(task, examples) -> list[str]:
    """Return the text the adapter was trained on: each training pair's prompt and completion."""
    return [prompt + completion for prompt, completion in task.training_pairs(examples)]


def run(
    direction: str,
    task_name: str,
    plan: Plan,
    settings: Settings,
    cache: Path,
    out: Path,
    settings_run: tuple[str, ...] | None = None,
    kinds: tuple[str, ...] = ("heads", "lora"),
) -> dict:
    """Train the students of ``settings_run`` and compare them on the task's test split."""
    settings_run = settings_run or TASK_SETTINGS[task_name]
    if task_name != "sentiment" and any(item.startswith("template") for item in settings_run):
        supported = " ".join(item for item in SETTINGS if not item.startswith("template"))
        raise SystemExit(
            f"the template settings need the sentiment prompt template; --task {task_name} "
            f"supports --settings {supported}"
        )
    setup = _setup(direction, task_name, settings, cache)
    students = _students(setup, plan, out, settings_run, kinds)
    if task_name != "sentiment":
        return _run_task(setup, students, out)
    target, test = setup.target, setup.test
    validation = task_validation(plan)

    evaluations, bpb = _evaluate_all(
        setup, students, lambda model, tokenizer: _sentiment(model, tokenizer, test)
    )
    _save_refined(students, out)

    labels = torch.tensor(evaluations["target-base"][0].labels)
    base = evaluations["target-base"][0].scores
    reference = evaluations["target-retrained"][0].scores
    rows = []
    for method, (result, seconds) in evaluations.items():
        extra = _extra(method, seconds, bpb, students)
        data = _data(method, students)
        rows.append(_row(method, result.scores, labels, base, reference, data, **extra))

    source_change = evaluations["source-adapter"][0].scores - evaluations["source-base"][0].scores
    rows.append(
        _row(
            "logit-arithmetic",
            base + source_change,
            labels,
            base,
            reference,
            LOGIT_ARITHMETIC_DATA,
        )
    )
    validation_result = _sentiment(target.model, target.tokenizer, validation)[0]
    bias, _ = best_constant_bias(validation_result.scores, torch.tensor(validation_result.labels))
    rows.append(
        _row(
            "control-label-bias",
            base + bias,
            labels,
            base,
            reference,
            f"{len(validation)} labelled validation examples (a control, not a method)",
            bias=bias.tolist(),
        )
    )
    return {**_result_header(setup), "runs": rows}


def _result_header(setup: Setup) -> dict:
    task = setup.task
    return {
        "direction": f"{setup.source.name}->{setup.target.name}",
        "task": task.name,
        "metric": task.metric,
        "higher_is_better": task.higher_is_better,
        "n_test": len(setup.test),
        "held_out_general_passages": len(setup.held_out),
        "shared_vocabulary": len(setup.shared),
    }


def _save_refined(students: dict, out: Path) -> None:
    for method, (kind, artifact, _) in students.items():
        if kind == "cartridge" and isinstance(artifact, Cartridge):
            artifact.save(out / method, overwrite=True)


def _cartridge_start(students: dict) -> dict:
    """Return the unrefined cartridge's held-out figures: step 0 of a heads refinement.

    The refinement starts from this cartridge, so its first evaluation describes it.
    """
    for method in ("refined-heads-general", "refined-heads-elicited"):
        if method in students:
            start = students[method][2].initial
            return {
                "behaviour_cosine": start["behaviour_cosine"],
                "held_out_kl": {"initial": start["kl"]},
            }
    return {}


def _student_extra(report) -> dict:
    return {
        "positions": report.positions,
        "train_seconds": round(report.seconds, 1),
        "behaviour_cosine": report.best["behaviour_cosine"],
        "held_out_kl": {"initial": report.initial["kl"], "best": report.best["kl"]},
        "held_out_loss": {"initial": report.initial["loss"], "best": report.best["loss"]},
        "history": report.history,
    }


def _task_row(method, task, scores, base, retrained, data, **extra) -> dict:
    """Return the score, gain recovered with interval and flips of one method on a task."""
    higher = task.higher_is_better
    row = {"method": method, "data": data, "score": scores.score, **extra}
    row["gain_recovered"] = gain_recovered(
        scores.values, base.values, retrained.values, higher_is_better=higher, weights=base.weights
    )
    row["gain_recovered_ci"] = list(
        bootstrap_ci(
            scores.values,
            base.values,
            retrained.values,
            higher_is_better=higher,
            weights=base.weights,
        )
    )
    row["negative_flips"] = (
        negative_flips(base.correct, scores.correct) if scores.correct is not None else None
    )
    return row


def _validation_gains(setup: Setup, students: dict) -> dict[str, float]:
    """Return the gain recovered on the validation split of the cartridges and every student.

    The validation split is disjoint from the test split, so a default chosen by these values
    leaves the test scores an honest estimate.
    """
    task, target = setup.task, setup.target

    def scores(model):
        return task.evaluate(model, target.tokenizer, setup.validation)

    base = scores(target.model)
    retrained = _with_adapter(target, setup.retrained, scores)
    evaluated = {
        DEFAULT_BRIDGE: _with_cartridge(target, setup.cartridge, scores),
        CKA_BRIDGE: _with_cartridge(target, setup.cka_cartridge, scores),
    }
    for method, student in students.items():
        evaluated[method] = _with_student(target, student, scores)
    return {
        method: gain_recovered(
            result.values,
            base.values,
            retrained.values,
            higher_is_better=task.higher_is_better,
            weights=base.weights,
        )
        for method, result in evaluated.items()
    }


def _run_task(setup: Setup, students: dict, out: Path) -> dict:
    """Compare the students with the cartridge on arithmetic or Shakespeare."""
    task = setup.task

    def evaluate(model, tokenizer):
        started = time.perf_counter()
        result = task.evaluate(model, tokenizer, setup.test)
        return result, time.perf_counter() - started

    evaluations, bpb = _evaluate_all(setup, students, evaluate)
    validation = _validation_gains(setup, students)
    _save_refined(students, out)
    base, reference = evaluations["target-base"][0], evaluations["target-retrained"][0]
    rows = []
    for method, (result, seconds) in evaluations.items():
        extra = _extra(method, seconds, bpb, students)
        if method in validation:
            extra["validation_gain_recovered"] = validation[method]
        if method.startswith("source-"):
            # Scored on the source model: no gain over the target base to recover.
            rows.append({"method": method, "data": "", "score": result.score, **extra})
            continue
        data = _data(method, students)
        rows.append(_task_row(method, task, result, base, reference, data, **extra))
    if not task.higher_is_better:
        # Logit arithmetic wraps the forward pass, so it scores language modelling only;
        # generation would need the two tokenizers to advance in step.
        arithmetic = LogitArithmetic(setup.source, setup.target, setup.kernels, setup.shared)
        result, seconds = evaluate(arithmetic, setup.target.tokenizer)
        rows.append(
            _task_row(
                "logit-arithmetic",
                task,
                result,
                base,
                reference,
                LOGIT_ARITHMETIC_DATA,
                eval_seconds=round(seconds, 1),
            )
        )
    return {**_result_header(setup), "runs": rows}


def run_corpus_sizes(
    direction: str,
    task_name: str,
    setting: str,
    sizes: list[int],
    plan: Plan,
    settings: Settings,
    cache: Path,
    out: Path,
) -> list[dict]:
    """Measure the distilled LoRA of one setting's gain recovered against the amount of text.

    Each size caps the teacher's aligned positions, held-out ones included. Steps, batch size
    and learning rate stay the plan's, so only the amount of text changes between rows.
    """
    setup = _setup(direction, task_name, settings, cache)
    target = setup.target

    if task_name == "sentiment":

        def score(model):
            return _sentiment(model, target.tokenizer, setup.test)[0]

    else:

        def score(model):
            return setup.task.evaluate(model, target.tokenizer, setup.test)

    base = score(target.model)
    reference = _with_adapter(target, setup.retrained, score)
    base_bpb = _bits_per_byte(target.model, target.tokenizer, setup.held_out)
    rows = []
    for size in sizes:
        config = replace(_refine_config(setting, plan), max_positions=size)
        started = time.perf_counter()
        teacher = build_teacher(
            setup.source, target, setup.kernels, setup.passages, setup.shared, config
        )
        folder = out / f"distilled-lora-{setting}-{size}"
        report = distil_lora(target, teacher, setup.shared, folder, config)
        extra = {
            "positions": report.positions,
            "passages": len(teacher.texts),
            "train_seconds": round(time.perf_counter() - started, 1),
            "behaviour_cosine": report.best["behaviour_cosine"],
            "general_bpb_change": _with_adapter(
                target,
                folder,
                lambda model: _bits_per_byte(model, target.tokenizer, setup.held_out),
            )
            - base_bpb,
        }
        result = _with_adapter(target, folder, score)
        method, data = f"distilled-lora-{setting}", DATA[setting]
        if task_name == "sentiment":
            labels = torch.tensor(base.labels)
            rows.append(
                _row(method, result.scores, labels, base.scores, reference.scores, data, **extra)
            )
        else:
            rows.append(_task_row(method, setup.task, result, base, reference, data, **extra))
    return rows


def task_validation(plan: Plan):
    from loracast.eval.sentiment import sentiment_splits

    return sentiment_splits(seed=0).validation[: plan.n_validation]


def _fmt(value, digits=3):
    if value is None:
        return ""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _chosen(rows: list[dict], setting: str) -> dict | None:
    """Return the student of ``setting`` with the lowest held-out objective.

    Both students of a setting share one teacher and objective, so their values compare. The
    choice uses no task data, so the test score of the chosen row stays an honest estimate.
    Reports written before the objective had several terms have only the KL.
    """
    candidates = [
        row
        for row in rows
        if parse_student(row["method"]) in (("heads", setting, 0), ("lora", setting, 0))
        and "best" in row.get("held_out_kl", {})
    ]

    # Rows of different runs had different teachers, so compare within the latest run that
    # trained this setting. Rows without a run record belong to the report's own run.
    def run_date(row: dict) -> str:
        return row["run"]["date"] if row.get("run") else "~"

    latest = max((run_date(row) for row in candidates), default=None)
    candidates = [row for row in candidates if run_date(row) == latest]
    return min(
        candidates,
        key=lambda row: row.get("held_out_loss", row["held_out_kl"])["best"],
        default=None,
    )


def _interval(row: dict) -> str:
    interval = row.get("gain_recovered_ci")
    return "" if interval is None else f"[{interval[0]:.2f}, {interval[1]:.2f}]"


def _gain_cell(row: dict | None) -> str:
    if row is None:
        return "not run"
    low, high = row["gain_recovered_ci"]
    return f"{row['gain_recovered']:.2f} [{low:.2f}, {high:.2f}]"


def seed_rows(rows: list[dict], method: str) -> list[dict]:
    """Return the rows of ``method``'s student and setting for every seed, seed 0 first.

    Only rows trained on as many positions as the seed-0 row count, so every seed shares the plan.
    """
    parsed = parse_student(method)
    if parsed is None:
        return []
    kind, setting, _ = parsed
    matching = sorted(
        (row for row in rows if (parse_student(row["method"]) or ())[:2] == (kind, setting)),
        key=lambda row: parse_student(row["method"])[2],
    )
    positions = {student_positions(row) for row in matching[:1]}
    return [row for row in matching if student_positions(row) in positions]


def student_positions(row: dict) -> int | None:
    """Return the teacher positions of a student row, or None for a row of another kind.

    Rows written before students recorded them took their run's plan: the recorded plan, else
    the default plan with the sizes that the run's command changed.
    """
    parsed = parse_student(row["method"])
    if parsed is None:
        return None
    if row.get("positions") is not None:
        return row["positions"]
    run_info = row.get("run") or {}
    option = "template_passages" if parsed[1].startswith("template") else "general_positions"
    if run_info.get("plan"):
        return run_info["plan"][option]
    words = run_info.get("command", "").split()
    flag = "--" + option.replace("_", "-")
    if flag in words:
        return int(words[words.index(flag) + 1])
    return getattr(Plan(), option) if run_info else None


def seed_spread(rows: list[dict]) -> tuple[float, float]:
    """Return the mean and the sample standard deviation of the rows' gain recovered."""
    gains = np.array([row["gain_recovered"] for row in rows], dtype=float)
    return float(gains.mean()), float(gains.std(ddof=1)) if len(gains) > 1 else 0.0


def _seeds_cell(rows: list[dict], row: dict | None) -> str:
    """Return ``"; N seeds m ± s"`` for a chosen row trained with several seeds."""
    seeds = [] if row is None else seed_rows(rows, row["method"])
    if len(seeds) < 2:
        return ""
    mean, spread = seed_spread(seeds)
    return f"; {len(seeds)} seeds {mean:.2f} ± {spread:.2f}"


def _seed_lines(result: dict) -> list[str]:
    """Return a table of the students trained with more than one seed."""
    rows = result["runs"]
    groups = [seed_rows(rows, row["method"]) for row in rows if _is_seed_zero(row)]
    groups = [group for group in groups if len(group) > 1]
    if not groups:
        return []
    lines = [
        "Seeds: each seed draws its own elicited text, held-out teacher texts, batch order and",
        "initialisation. Spread is the sample standard deviation of the gain recovered.",
        "",
        "| student | seeds | gain recovered per seed | mean ± spread | mean general bpb change |",
        "|---|---|---|---|---|",
    ]
    for group in groups:
        mean, spread = seed_spread(group)
        seeds = ", ".join(str(parse_student(row["method"])[2]) for row in group)
        gains = ", ".join(f"{row['gain_recovered']:.2f}" for row in group)
        changes = [row["general_bpb_change"] for row in group if "general_bpb_change" in row]
        change = _fmt(float(np.mean(changes)), 4) if changes else ""
        lines.append(
            f"| {group[0]['method']} | {seeds} | {gains} | {mean:.2f} ± {spread:.2f} | {change} |"
        )
    return [*lines, ""]


def _positions_cell(row: dict) -> str:
    positions = student_positions(row)
    return "" if positions is None else f", {positions} positions"


def _is_seed_zero(row: dict) -> bool:
    parsed = parse_student(row["method"])
    return parsed is not None and parsed[2] == 0


# Row labels of the summary table, one per setting.
SETTING_LABELS = {
    "general": "general text only",
    "elicited": "elicited text, tilted KL",
    "elicited-sequence": "elicited, cross-entropy",
    "elicited-mixed": "elicited, KL + cross-entropy",
    "elicited-amplified": "amplified, KL + cross-entropy",
    "elicited-nucleus": "nucleus, KL + cross-entropy",
    "elicited-span": "elicited, KL + span",
    "elicited-mixed-span": "elicited, KL + cross-entropy + span",
    "elicited-wide": "elicited, KL + cross-entropy, wide student",
    "elicited-dense": "elicited, KL + cross-entropy on every sampled token",
    "elicited-open": "open prompt, KL + cross-entropy",
    "elicited-cosine": "elicited, KL + cross-entropy, cosine schedule",
    "template": "template",
    "template-centred": "template, centred",
    "task-text": "task text (diagnostic)",
}


def _setting_cell(result: dict, setting: str) -> str | None:
    """Return the summary cell of one setting in one result, or None when it was not run."""
    row = _chosen(result["runs"], setting)
    if row is None:
        return None
    kind = row["method"].split("-")[0]
    validation = row.get("validation_gain_recovered")
    validation_text = "" if validation is None else f"; validation {validation:.2f}"
    details = f"{kind}{_positions_cell(row)}{validation_text}{_seeds_cell(result['runs'], row)}"
    return f"{_gain_cell(row)} ({details})"


def _cosine_cell(result: dict) -> str:
    rows = {row["method"]: row for row in result["runs"]}
    cartridge, general = rows.get(DEFAULT_BRIDGE), _chosen(result["runs"], "general")
    if cartridge is None or general is None:
        return "not run"
    # Only a heads refinement measures the cartridge's cosine, at its step 0.
    start = cartridge.get("behaviour_cosine")
    start_cell = "not measured" if start is None else _fmt(start)
    return f"{start_cell} → {_fmt(general.get('behaviour_cosine'))}"


def _summary_lines(results: list[dict]) -> list[str]:
    """Return a table of gain recovered: a row per method, a column per direction and task.

    Settings that no result ran get no row.
    """
    lines = [
        "## Summary",
        "",
        "Gain recovered with its 95% interval. In each setting the student (refined heads or",
        "distilled LoRA) with the lower value of the setting's objective on held-out positions",
        "is shown, so no test score chose it. The behaviour cosine is measured on held-out",
        "corpus positions. The template settings and the label-bias control exist for",
        "sentiment only, and logit arithmetic for sentiment and Shakespeare.",
        "The task-text row is a diagnostic that reads the adapter's training text, so it is",
        "a ceiling for the text and not a no-task-data result.",
        "Where the student was trained with several seeds, the cell adds their mean ± spread;",
        "the interval is seed 0's.",
        "",
        "| method | " + " | ".join(f"{r['direction']}, {r['task']}" for r in results) + " |",
        "|---|" + "---|" * len(results),
    ]

    def table_row(label: str, cells: list[str | None]) -> str:
        return f"| {label} | " + " | ".join(cell or "not run" for cell in cells) + " |"

    by_method = [{row["method"]: row for row in result["runs"]} for result in results]
    for method, label in ((DEFAULT_BRIDGE, "cartridge"), (CKA_BRIDGE, "cartridge, CKA layer map")):
        lines.append(table_row(label, [_gain_cell(rows.get(method)) for rows in by_method]))
    for setting in SETTINGS:
        cells = [_setting_cell(result, setting) for result in results]
        if any(cells):
            lines.append(table_row(SETTING_LABELS[setting], cells))
    for method, label in (
        ("control-label-bias", "label-bias control"),
        ("logit-arithmetic", "logit arithmetic"),
    ):
        lines.append(table_row(label, [_gain_cell(rows.get(method)) for rows in by_method]))
    lines.append(
        table_row("behaviour cosine, cartridge → general", [_cosine_cell(r) for r in results])
    )
    lines.append("")
    return lines


def write_report(document: dict, out: Path) -> None:
    """Write ``behaviour.json`` and ``behaviour.md`` into ``out``, creating the folder."""
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "behaviour.json", json.dumps(document, indent=2) + "\n")
    lines = [
        *run_header(document, "Behaviour matching"),
        "Produced by `benchmarks/behaviour.py`, whose docstring defines every row. Gain",
        "recovered is against the LoRA retrained on the target. Push is the mean change of the",
        "correct label's centred log-likelihood against the target base. The bpb change is the",
        "change of bits per byte on general passages never used for fitting, and the retrained",
        "LoRA's own change is the reference for a harmless side effect. Validation gain is the",
        "gain recovered on the task's validation split (other plays for Shakespeare, other",
        "questions for arithmetic), which shares nothing with the test split. Defaults are to",
        "be chosen by it, so that the test columns stay an honest estimate; rows from runs",
        "before this column existed have none.",
        "",
        "Defaults: `loracast distil` trains the `elicited-mixed` distilled LoRA, the best",
        "variant on Shakespeare in both directions over three seeds, a choice made on test",
        "scores before the validation column existed. `elicited-dense` is ahead of it in the",
        "same 8,000-position run from Gemma-3 to SmolLM2 on both splits, but has neither three",
        "seeds nor the larger text yet. `loracast transfer` still",
        "writes the unrefined cartridge: its bridge carries any adapter with no",
        "adapter-specific training, and every student here is trained for one adapter.",
        "",
        "Where the rest of the gain is lost: on Shakespeare, compare the task-text row with",
        "the elicited ones, and the logit-arithmetic row with the retrained LoRA. If the",
        "tilted KL on the adapter's own training text recovers no more than elicited text, the",
        "text is not the limit. If the teacher's distribution, applied at inference as logit",
        "arithmetic, recovers little or makes the task worse, the teacher is the limit. A change",
        "of single-token probabilities read through the shared vocabulary is then not the",
        "change that the task needs in the target.",
        "",
        *_summary_lines(document["results"]),
    ]
    for result in document["results"]:
        lines += [
            f"## {result['direction']}, {result['task']} ({result['n_test']} test examples)",
            "",
        ]
        if "run" in result:
            run_info = result["run"]
            lines += [
                f"Command: `{run_info['command']}`, commit {run_info['commit']}, "
                f"{run_info['date']}, {run_info['wall_seconds']} s.",
                "",
            ]
        metric = result.get("metric", "accuracy")
        if result.get("higher_is_better") is False:
            metric += " (lower is better)"
        lines += [
            f"| method | data it sees | positions | {metric} | gain recovered | 95% interval"
            " | validation gain | negative flips | push | behaviour cosine | general bpb change"
            " | train s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in result["runs"]:
            lines.append(
                f"| {row['method']} | {row['data']} | {_fmt(student_positions(row))} | "
                f"{_fmt(row['score'])} | "
                f"{_fmt(row.get('gain_recovered'), 2)} | {_interval(row)} | "
                f"{_fmt(row.get('validation_gain_recovered'), 2)} | "
                f"{_fmt(row.get('negative_flips'))} | "
                f"{_fmt(row.get('push_toward_correct_label'), 2)} | "
                f"{_fmt(row.get('behaviour_cosine'), 3)} | "
                f"{_fmt(row.get('general_bpb_change'), 4)} | {_fmt(row.get('train_seconds'), 0)} |"
            )
        lines.append("")
        lines += _seed_lines(result)
        lines += _earlier_run_lines(result)
        if "corpus_size" in result:
            ablation = result["corpus_size"]
            method = f"distilled-lora-{ablation.get('setting', 'general')}"
            main_row = next((row for row in result["runs"] if row["method"] == method), None)
            # Rows written before students recorded their positions used their run's plan,
            # and results written before runs recorded their plan used the default plan.
            positions = None if main_row is None else student_positions(main_row)
            if positions is None and "run" not in (main_row or {}):
                plan = result.get("run", {}).get("plan") or asdict(Plan())
                positions = plan.get("general_positions")
            lines += _corpus_size_lines(ablation, main_row, positions, metric)
    _atomic_write(out / "behaviour.md", "\n".join(lines) + "\n")


def _earlier_run_lines(result: dict) -> list[str]:
    """Name the command of each row that an earlier run produced."""
    current = result.get("run", {}).get("command")
    earlier = [row for row in result["runs"] if row.get("run") and row["run"]["command"] != current]
    if not earlier:
        return []
    lines = ["Rows kept from earlier runs:", ""]
    for row in earlier:
        info = row["run"]
        lines.append(
            f"- {row['method']}: `{info['command']}`, commit {info['commit']}, {info['date']}."
        )
    return [*lines, ""]


def _corpus_size_lines(
    ablation: dict, main_row: dict | None, positions: int | None, metric: str = "accuracy"
) -> list[str]:
    run_info = ablation["run"]
    setting = ablation.get("setting", "general")
    lines = [
        f"### Gain recovered against the amount of text ({setting})",
        "",
        f"The distilled LoRA of the {setting} setting ({DATA[setting]}), with the plan's steps,",
        "batch size and learning rate. Only the number of aligned positions the teacher covers",
        f"changes. Command: `{run_info['command']}`, commit {run_info['commit']}, "
        f"{run_info['date']}, {run_info['wall_seconds']} s.",
        "",
        f"| aligned positions | passages | {metric} | gain recovered | 95% interval | push"
        " | behaviour cosine | general bpb change | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = list(ablation["rows"])
    if main_row is not None and positions is not None:
        # The main comparison trained the same student on the plan's number of positions.
        rows.append({**main_row, "positions": f"{positions} (main table)", "passages": ""})
    for row in rows:
        interval = row["gain_recovered_ci"]
        lines.append(
            f"| {row['positions']} | {row['passages']} | {_fmt(row['score'])} | "
            f"{_fmt(row['gain_recovered'], 2)} | [{interval[0]:.2f}, {interval[1]:.2f}] | "
            f"{_fmt(row.get('push_toward_correct_label'), 2)} | "
            f"{_fmt(row['behaviour_cosine'], 3)} | {_fmt(row['general_bpb_change'], 4)} | "
            f"{_fmt(row['train_seconds'], 0)} |"
        )
    lines.append("")
    return lines


STUDENT_PREFIXES = ("refined-heads-", "distilled-lora-")


def _student_order(method: str) -> tuple[int, int, int]:
    parsed = parse_student(method)
    if parsed is None:
        raise ValueError(f"{method!r} is not a student row")
    kind, setting, seed = parsed
    return (SETTINGS.index(setting) if setting in SETTINGS else len(SETTINGS), kind == "lora", seed)


def merge_earlier(earlier: dict, result: dict) -> dict:
    """Add to ``result`` the student rows of ``earlier`` (same direction and task) it lacks.

    A rerun with some settings thus replaces those settings' rows and keeps the others. Each
    kept row records the command that produced it under ``run``. The other rows (bases,
    cartridge, controls) come from the new run.
    """
    new_methods = {row["method"] for row in result["runs"]}
    earlier_students = [
        {**row, "run": row.get("run", earlier.get("run"))}
        for row in earlier["runs"]
        if row["method"].startswith(STUDENT_PREFIXES) and row["method"] not in new_methods
    ]
    students = [row for row in result["runs"] if row["method"].startswith(STUDENT_PREFIXES)]
    others = [row for row in result["runs"] if not row["method"].startswith(STUDENT_PREFIXES)]
    first_after = next(
        (index for index, row in enumerate(others) if row["method"] not in BASE_ROWS),
        len(others),
    )
    students = sorted(students + earlier_students, key=lambda row: _student_order(row["method"]))
    merged = {**result, "runs": others[:first_after] + students + others[first_after:]}
    cartridge = next((row for row in merged["runs"] if row["method"] == DEFAULT_BRIDGE), None)
    earlier_cartridge = next(
        (row for row in earlier["runs"] if row["method"] == DEFAULT_BRIDGE), None
    )
    if cartridge is not None and earlier_cartridge is not None:
        # Only a heads refinement measures the cartridge's held-out figures, at its step 0.
        for key in ("behaviour_cosine", "held_out_kl"):
            if key not in cartridge and key in earlier_cartridge:
                cartridge[key] = earlier_cartridge[key]
    if "corpus_size" in earlier and "corpus_size" not in merged:
        merged["corpus_size"] = earlier["corpus_size"]
    return merged


def _stored_results(path: Path, result: dict, quick: bool) -> list[dict]:
    """Return the results of the report at ``path`` with ``result`` put in (``_put_result``)."""
    earlier = json.loads(path.read_text()) if path.exists() else {}
    return _put_result(earlier, result, quick)


def _put_result(earlier: dict, result: dict, quick: bool) -> list[dict]:
    """Return the earlier report's results of the same mode with ``result`` put in.

    Each direction and task is a separate command, so the report keeps those not rerun, with the
    command, commit and date that produced them. A stored result of the same direction and task
    is merged (``merge_earlier``) and keeps its place.
    """
    if earlier.get("quick") != quick:
        return [result]
    results, placed = [], False
    for other in earlier.get("results", []):
        if (other["direction"], other["task"]) == (result["direction"], result["task"]):
            results.append(merge_earlier(other, result))
            placed = True
        else:
            results.append(other)
    return results if placed else [*results, result]


def _add_corpus_sizes(args, plan, settings, cache, artifacts, commit, started) -> int:
    """Run the corpus-size rows and store them beside the main comparison of the direction."""
    out = Path(args.out)
    path = out / "behaviour.json"
    document = json.loads(path.read_text()) if path.exists() else None
    source_name, target_name = MODELS if args.direction == "forward" else MODELS[::-1]
    direction = f"{source_name}->{target_name}"
    results = [] if document is None else document["results"]
    result = next(
        (item for item in results if item["direction"] == direction and item["task"] == args.task),
        None,
    )
    if result is None or document.get("quick") != args.quick:
        raise SystemExit(
            f"{path} has no {'quick ' if args.quick else ''}{args.task} result for {direction}. "
            f"Run `python benchmarks/behaviour.py --task {args.task} --direction "
            f"{args.direction}` first"
        )
    settings_run = args.settings or ["general"]
    if len(settings_run) != 1 or settings_run[0].startswith("template"):
        raise SystemExit(
            f"--corpus-sizes measures one setting of general or elicited text, got --settings "
            f"{' '.join(settings_run)}"
        )
    rows = run_corpus_sizes(
        args.direction,
        args.task,
        settings_run[0],
        args.corpus_sizes,
        plan,
        settings,
        cache,
        artifacts,
    )
    result["corpus_size"] = {
        "setting": settings_run[0],
        "rows": rows,
        "run": {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "commit": commit,
            "command": " ".join(["python", "benchmarks/behaviour.py", *sys.argv[1:]]),
            "wall_seconds": round(time.perf_counter() - started, 1),
        },
    }
    write_report(document, out)
    print(f"report written to {out}")
    return 0


def _is_newer(result: dict, report: dict) -> bool:
    """Return whether ``result`` ran after the result of its direction and task in ``report``.

    A run copies the report it started from, so its other results are stale copies that must
    not replace what was merged since.
    """
    for stored in report.get("results", []):
        if (stored["direction"], stored["task"]) == (result["direction"], result["task"]):
            return result.get("run", {}).get("date", "") > stored.get("run", {}).get("date", "")
    return True


def _merge_report(path: Path, out: Path) -> int:
    """Merge the results of the report at ``path`` that are newer than those in ``out``.

    The header (machine, date, commit, command, plan) becomes the merged report's, and each
    result keeps the command that produced it.
    """
    if not path.exists():
        raise SystemExit(f"{path} not found; pass the behaviour.json that a run wrote")
    document = json.loads(path.read_text())
    quick = document.get("quick", False)
    published = out / "behaviour.json"
    merged = json.loads(published.read_text()) if published.exists() else {}
    newer = [result for result in document["results"] if _is_newer(result, merged)]
    for result in newer:
        merged = {**document, "results": _put_result(merged, result, quick)}
    if not newer:
        print(f"{out} already holds every result of {path}, or a newer one")
        return 0
    write_report(merged, out)
    print(f"merged {len(newer)} of {len(document['results'])} results from {path} into {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--direction", choices=["forward", "reverse"], default="forward")
    parser.add_argument("--task", choices=sorted(TASK_SETTINGS), default="sentiment")
    parser.add_argument(
        "--settings",
        nargs="+",
        choices=SETTINGS,
        default=None,
        help="text settings to train students on (default: general and the template settings "
        "for sentiment, general and elicited for the other tasks)",
    )
    parser.add_argument(
        "--students",
        nargs="+",
        choices=["heads", "lora"],
        default=["heads", "lora"],
        help="students to train: refined heads, distilled LoRA or both",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke testing")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps per student")
    parser.add_argument(
        "--general-positions", type=int, default=None, help="teacher positions of general text"
    )
    parser.add_argument(
        "--template-passages", type=int, default=None, help="passages filled into the template"
    )
    parser.add_argument(
        "--learning-rate", type=float, default=None, help="AdamW learning rate of every student"
    )
    parser.add_argument(
        "--max-grad-norm",
        type=float,
        default=None,
        help="clip each student's gradient to this total L2 norm (default: no clipping)",
    )
    parser.add_argument(
        "--corpus-sizes",
        type=int,
        nargs="+",
        default=None,
        help="instead of the main comparison, train the distilled LoRA of one setting (--settings, "
        "default general) on this many aligned positions per row and add the rows to the "
        "existing report of the task and direction",
    )
    parser.add_argument(
        "--merge-from",
        default=None,
        help="instead of running, merge the results of this behaviour.json (a run written to "
        "another --out) into the report in --out",
    )
    parser.add_argument(
        "--amplification",
        type=float,
        default=None,
        help="factor on the adapter's change of the logits when sampling the elicited-amplified "
        "text (default 3)",
    )
    parser.add_argument(
        "--top-p",
        type=float,
        default=None,
        help="nucleus of the elicited-nucleus text's sampling (default 0.9)",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="sampling temperature of the elicited-nucleus text (default 1)",
    )
    parser.add_argument(
        "--wide-rank",
        type=int,
        default=None,
        help="rank of the elicited-wide student, on every attention and MLP projection "
        "(default 32)",
    )
    parser.add_argument(
        "--samples-per-prefix",
        type=int,
        default=None,
        help="continuations sampled from each corpus prefix for elicited text (default 1); more "
        "than 1 gives more text than the corpus has passages",
    )
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help="warm-up steps of the elicited-cosine schedule (default 10)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the elicited text and of each student; rows of a seed other than 0 are "
        "named with a -seedN suffix and kept beside the others when merged",
    )
    parser.add_argument("--out", default=str(ROOT / "docs"), help="folder for the report")
    parser.add_argument("--cache-dir", default=None, help="loracast cache folder")
    args = parser.parse_args(argv)
    arguments = argv if argv is not None else sys.argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    if args.merge_from:
        return _merge_report(Path(args.merge_from), Path(args.out))
    commit = _commit()
    plan = Plan.quick() if args.quick else Plan()
    if args.steps is not None:
        plan.steps = args.steps
    if args.general_positions is not None:
        plan.general_positions = args.general_positions
    if args.template_passages is not None:
        plan.template_passages = args.template_passages
    if args.learning_rate is not None:
        plan.learning_rate = args.learning_rate
    plan.max_grad_norm = args.max_grad_norm
    plan.seed = args.seed
    if args.amplification is not None:
        plan.amplification = args.amplification
    if args.top_p is not None:
        plan.top_p = args.top_p
    if args.warmup_steps is not None:
        plan.warmup_steps = args.warmup_steps
    if args.samples_per_prefix is not None:
        plan.samples_per_prefix = args.samples_per_prefix
    if args.temperature is not None:
        plan.temperature = args.temperature
    if args.wide_rank is not None:
        plan.wide_rank = args.wide_rank
    settings = Settings.quick() if args.quick else Settings()
    cache = cache_dir(args.cache_dir) / "bench"
    out = Path(args.out)
    artifacts = cache / "behaviour" / args.task / args.direction
    artifacts.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.corpus_sizes:
        return _add_corpus_sizes(args, plan, settings, cache, artifacts, commit, started)
    settings_run = tuple(args.settings) if args.settings else None
    result = run(
        args.direction,
        args.task,
        plan,
        settings,
        cache,
        artifacts,
        settings_run,
        tuple(args.students),
    )
    document = {
        "machine": _machine(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "command": " ".join(["python", "benchmarks/behaviour.py", *arguments]),
        "quick": args.quick,
        "plan": asdict(plan),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    result["run"] = {
        key: document[key] for key in ("date", "commit", "command", "wall_seconds", "plan")
    }
    document["results"] = _stored_results(out / "behaviour.json", result, args.quick)
    out.mkdir(parents=True, exist_ok=True)
    write_report(document, out)
    print(f"report written to {out}")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
