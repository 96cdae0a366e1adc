"""Text elicited from an adapted model: general-corpus prefixes continued by sampling.

General text barely triggers a task adapter, so a behavioural objective trained on it has few
positions where the adapter acts. Sampling continuations from the source with its adapter
gives text on which the adapter's own distribution has acted, without any task data: the only
inputs are short general-corpus prefixes. The caller attaches the adapter (for example with
``loracast.refine.kernel_hooks``) while ``elicit_texts`` runs.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList, TopPLogitsWarper

from loracast.align import truncate_text
from loracast.eval.classification import pad_left, pad_token_id

if TYPE_CHECKING:
    from loracast.refine import KernelSwitch

logger = logging.getLogger(__name__)


@dataclass
class ElicitConfig:
    """Settings of ``elicit_texts``.

    Attributes:
        prefix_tokens: tokens of each general passage kept as the prompt.
        new_tokens: tokens sampled after each prefix.
        temperature: sampling temperature. At 1.0 it samples the adapted model's own distribution.
        top_p: nucleus sampling: each token is drawn from the most likely tokens whose
            probabilities, after the temperature, add up to ``top_p``. 1.0 keeps every token.
        batch_size: prompts generated together.
        seed: seed of the sampling.
        samples_per_prefix: continuations sampled from each prefix. The prefixes are read once
            per sample, one pass after another, so the first pass gives the same text as 1.
            NOTE: refinement holds out whole texts, so above 1 a held-out text can share its
            prefix with a training text.
        amplification: factor ``a`` on the adapter's change of the next-token logits. Tokens are
            sampled from ``base + a · (adapted − base)``: 1.0 samples the adapted model, and
            larger values push the text further toward what the adapter favours, at the cost of
            a second forward pass without the adapter per token.
    """

    prefix_tokens: int = 8
    new_tokens: int = 88
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 16
    seed: int = 0
    samples_per_prefix: int = 1
    amplification: float = 1.0

    def __post_init__(self) -> None:
        errors = []
        for name in ("prefix_tokens", "new_tokens", "batch_size", "samples_per_prefix"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                errors.append(f"{name} must be a positive integer, got {value!r}")
        if not self.temperature > 0:
            errors.append(f"temperature must be positive, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            errors.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not self.amplification > 0:
            errors.append(f"amplification must be positive, got {self.amplification!r}")
        if errors:
            raise ValueError("invalid ElicitConfig: " + "; ".join(errors))


def _stop_tokens(model, tokenizer) -> set[int]:
    """Return the end-of-sequence ids of the model's generation settings and of the tokenizer."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None:
        configured = []
    stops = set(configured) if isinstance(configured, list | tuple) else {configured}
    if tokenizer.eos_token_id is not None:
        stops.add(tokenizer.eos_token_id)
    return stops


def _cache_argument(model: torch.nn.Module) -> str:
    """Return the name of the key-value cache argument of ``model.forward``.

    transformers 5.25 takes ``cache`` and warns that ``past_key_values`` will be removed; older
    versions take only ``past_key_values``.
    """
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


class AdapterAmplifier(LogitsProcessor):
    """Logits processor that scales the adapter's change of the next-token logits.

    At each step it runs the model once more with the adapter switched off, on the new tokens
    only (its own key-value cache), and returns ``(base + a · (adapted − base)) / temperature``.
    ``generate`` must run at temperature 1, so the temperature is applied here, after the
    amplification.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        adapter: KernelSwitch,
        prompt_mask: torch.Tensor,
        amplification: float,
        temperature: float,
    ) -> None:
        self.model = model
        self.adapter = adapter
        self.prompt_mask = prompt_mask
        self.amplification = amplification
        self.temperature = temperature
        self.cache = None
        self.seen = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids.shape[1] - self.prompt_mask.shape[1]
        mask = torch.cat(
            [self.prompt_mask, self.prompt_mask.new_ones(len(input_ids), generated)], 1
        )
        # Left padding: positions count real tokens only, as ``generate`` counts them.
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        self.adapter.multiplier = 0.0
        try:
            with torch.no_grad():
                output = self.model(
                    input_ids=input_ids[:, self.seen :],
                    attention_mask=mask,
                    position_ids=positions[:, self.seen :],
                    use_cache=True,
                    **{_cache_argument(self.model): self.cache},
                )
        finally:
            self.adapter.multiplier = 1.0
        key = "cache" if "cache" in output else "past_key_values"
        self.cache, self.seen = output[key], input_ids.shape[1]
        base = output.logits[:, -1].float()
        amplified = base + self.amplification * (scores.float() - base)
        return (amplified / self.temperature).to(scores.dtype)


def elicit_texts(
    model: torch.nn.Module,
    tokenizer,
    passages: Sequence[str],
    config: ElicitConfig | None = None,
    *,
    adapter: KernelSwitch | None = None,
    show_progress: bool = True,
) -> Iterator[str]:
    """Yield, per passage, its first ``prefix_tokens`` tokens continued by sampling from ``model``.

    With ``samples_per_prefix`` above 1 the passages are read that many times.

    Texts are generated a batch at a time, so a caller that stops iterating early pays only for
    what it read. A continuation stops at the end-of-sequence token. A passage whose prefix is
    empty is skipped.

    Args:
        model: the model to sample from, with the adapter attached.
        tokenizer: its tokenizer.
        passages: general-corpus passages; only their prefixes are read.
        config: sampling settings.
        adapter: the switch that ``kernel_hooks`` yields. Needed when ``config.amplification``
            is not 1, to run the model without the adapter.
        show_progress: show a progress bar.

    Raises:
        ValueError: ``config.amplification`` is not 1 and no ``adapter`` switch is given.
    """
    config = config or ElicitConfig()
    amplify = config.amplification != 1.0
    if amplify and adapter is None:
        raise ValueError(
            f"amplification {config.amplification} needs the adapter's switch: pass "
            "adapter=switch from `with kernel_hooks(model, kernels) as switch`"
        )
    prompts = [truncate_text(tokenizer, passage, config.prefix_tokens) for passage in passages]
    prompts = [prompt for prompt in prompts if prompt.strip()]
    # Each pass is batched on its own, so the first pass is the text that one sample gives.
    bounds = [
        (start, min(start + config.batch_size, len(prompts)))
        for _ in range(config.samples_per_prefix)
        for start in range(0, len(prompts), config.batch_size)
    ]
    pad_id = pad_token_id(tokenizer)
    stops = _stop_tokens(model, tokenizer)
    device = next(model.parameters()).device
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(config.seed)
    try:
        for start, end in tqdm(bounds, desc="Eliciting", disable=not show_progress):
            batch = prompts[start:end]
            ids, mask = pad_left([tokenizer(prompt)["input_ids"] for prompt in batch], pad_id)
            ids, mask = ids.to(device), mask.to(device)
            processors = LogitsProcessorList()
            if amplify:
                # The amplifier applies the temperature, so the nucleus is cut after it here.
                processors.append(
                    AdapterAmplifier(model, adapter, mask, config.amplification, config.temperature)
                )
                if config.top_p < 1.0:
                    processors.append(TopPLogitsWarper(config.top_p))
            with torch.no_grad():
                output = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    do_sample=True,
                    temperature=1.0 if amplify else config.temperature,
                    top_k=0,
                    top_p=1.0 if amplify else config.top_p,
                    max_new_tokens=config.new_tokens,
                    pad_token_id=pad_id,
                    logits_processor=processors,
                )
            for row, length in enumerate(mask.sum(1).tolist()):
                continuation = output[row, ids.shape[1] :].tolist()
                ends = [index for index, token in enumerate(continuation) if token in stops]
                if ends:
                    continuation = continuation[: ends[0]]
                # Decoding prompt and continuation together keeps the space between them.
                tokens = output[row, ids.shape[1] - length : ids.shape[1]].tolist() + continuation
                yield tokenizer.decode(tokens, skip_special_tokens=True)
    finally:
        torch.random.set_rng_state(generator_state)
