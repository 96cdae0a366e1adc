"""Score multiple-choice classification tasks by the log-likelihood a causal LM gives each choice.

A prompt and a choice are tokenized separately and their token ids concatenated: the prompt with
the tokenizer's special tokens (Gemma adds a BOS, SmolLM2 adds none) and the choice without any.
The choice tokens are then exactly the tokens after the prompt's tokens, so the score of a choice
is the sum of the log-probabilities of those tokens. ``loracast.train`` tokenizes training
examples with the same functions, so training and evaluation see identical token sequences.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassificationExample:
    """One labelled example of a classification task.

    Attributes:
        text: the input text, before any prompt template is applied.
        label: the index of the correct choice in the task's list of choices.
    """

    text: str
    label: int


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> list[list[int]]:
    """Tokenize prompts with the tokenizer's special tokens, as the start of a scored sequence.

    A trailing EOS that the tokenizer appends as a special token is removed, because the
    completion must follow the prompt's text directly.

    Args:
        tokenizer: a Hugging Face tokenizer.
        prompts: the prompt strings.

    Returns:
        One list of token ids per prompt.

    Raises:
        ValueError: a prompt produced no tokens, so no position would predict the first
            completion token.
    """
    encoded = [list(ids) for ids in tokenizer(list(prompts))["input_ids"]]
    eos_id = tokenizer.eos_token_id
    if eos_id is not None and eos_id != tokenizer.bos_token_id:
        for index, ids in enumerate(encoded):
            if ids and ids[-1] == eos_id and not prompts[index].endswith(str(tokenizer.eos_token)):
                ids.pop()

    for index, ids in enumerate(encoded):
        if not ids:
            raise ValueError(
                f"prompt {index} ({prompts[index]!r}) tokenizes to no tokens; a prompt needs at "
                "least one token (non-empty text, or a tokenizer that adds a BOS token)"
            )
    return encoded


def encode_completions(
    tokenizer: PreTrainedTokenizerBase, completions: Sequence[str]
) -> list[list[int]]:
    """Tokenize completions (choices or training targets) without special tokens.

    Args:
        tokenizer: a Hugging Face tokenizer.
        completions: the completion strings, usually starting with a space, e.g. ``" positive"``.

    Returns:
        One list of token ids per completion.

    Raises:
        ValueError: a completion produced no tokens.
    """
    encoded = [
        list(ids) for ids in tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    ]
    for index, ids in enumerate(encoded):
        if not ids:
            raise ValueError(
                f"completion {index} ({completions[index]!r}) tokenizes to no tokens; "
                "use a non-empty completion such as ' positive'"
            )
    return encoded


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Return the id used for right padding: the pad token, else the EOS token, else 0.

    The value never affects results, because padding sits after every real token and is masked.
    """
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def pad_left(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into ``(input_ids, attention_mask)``, both ``(batch, max_len)``."""
    max_len = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), max_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), max_len), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, max_len - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, max_len - len(ids) :] = 1
    return input_ids, attention_mask


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into a batch.

    Args:
        sequences: token id lists of any lengths.
        pad_id: the id written into padding positions.

    Returns:
        ``(input_ids, attention_mask)``, both ``(batch, max_len)`` int64 tensors on the CPU.
    """
    max_len = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), max_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), max_len), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


def model_device(model: torch.nn.Module) -> torch.device:
    """Return the device of the model's first parameter (CPU for a model without parameters)."""
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def _forward_parameters(model: torch.nn.Module) -> set[str]:
    # A PeftModel forwards **kwargs to the wrapped transformers model, so inspect that one.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


def _logits_at_positions(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """Run the model and return logits only at ``positions``: ``(batch, len(positions), vocab)``."""
    parameters = _forward_parameters(model)
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "use_cache" in parameters:
        kwargs["use_cache"] = False

    # transformers applies the LM head only to the kept positions, so a 262k-token vocabulary
    # costs batch x len(positions) x vocab floats instead of batch x seq x vocab.
    if "logits_to_keep" in parameters:
        return model(**kwargs, logits_to_keep=positions).logits

    # NOTE: models without `logits_to_keep` compute logits at every position first, so peak
    # memory is batch x seq x vocab floats for them.
    return model(**kwargs).logits[:, positions]


def completion_log_softmax(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_lengths: Sequence[int],
    lengths: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compute next-token log-probabilities at the positions that predict completion tokens.

    Row ``i`` contains a prompt of ``prompt_lengths[i]`` tokens followed by completion tokens
    up to ``lengths[i]``. Gradients flow when autograd is enabled, so training uses this too.

    Args:
        model: a causal LM returning ``.logits``.
        input_ids: ``(batch, seq)`` token ids on the model's device.
        attention_mask: ``(batch, seq)`` mask, 1 for real tokens.
        prompt_lengths: the number of prompt tokens in each row, at least 1.
        lengths: the number of real tokens in each row.

    Returns:
        ``(log_probs, targets, mask)``. ``log_probs`` is float32 ``(batch, width, vocab)``,
        where ``width`` is the longest completion and slot ``j`` contains the distribution over
        completion token ``j``. ``targets`` ``(batch, width)`` contains the completion token ids,
        and ``mask`` ``(batch, width)`` is False in padding slots, whose values are meaningless.
    """
    batch_size, seq_len = input_ids.shape
    completion_lengths = [
        total - prompt for prompt, total in zip(prompt_lengths, lengths, strict=True)
    ]
    width = max(completion_lengths)

    # The logits at position t predict token t + 1, so completion token j of row i, which sits
    # at position prompt_lengths[i] + j, is scored by the logits at prompt_lengths[i] - 1 + j.
    score_positions = torch.zeros((batch_size, width), dtype=torch.long)
    mask = torch.zeros((batch_size, width), dtype=torch.bool)
    for row, (prompt_len, completion_len) in enumerate(
        zip(prompt_lengths, completion_lengths, strict=True)
    ):
        score_positions[row, :completion_len] = torch.arange(
            prompt_len - 1, prompt_len - 1 + completion_len
        )
        mask[row, :completion_len] = True

    device = input_ids.device
    score_positions = score_positions.to(device)
    mask = mask.to(device)
    kept_positions = torch.unique(score_positions[mask])  # sorted, shared by all rows
    logits = _logits_at_positions(model, input_ids, attention_mask, kept_positions)
    # logits: (batch, len(kept_positions), vocab)

    # Map every score position to its column among the kept positions. Padding slots are
    # clamped to a valid column and stay masked.
    columns = torch.searchsorted(kept_positions, score_positions)
    columns = columns.clamp(max=len(kept_positions) - 1)
    rows = torch.arange(batch_size, device=device)[:, None]
    log_probs = logits[rows, columns].float().log_softmax(dim=-1)  # (batch, width, vocab)

    targets = input_ids.gather(1, (score_positions + 1).clamp(max=seq_len - 1))  # (batch, width)
    return log_probs, targets, mask


def completion_token_log_probs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_lengths: Sequence[int],
    lengths: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute the log-probability of each completion token in a right-padded batch.

    Takes the same arguments as ``completion_log_softmax``.

    Returns:
        ``(log_probs, mask)``, both ``(batch, max_completion_len)``. ``log_probs`` is float32
        and 0 where ``mask`` is False.
    """
    log_probs, targets, mask = completion_log_softmax(
        model, input_ids, attention_mask, prompt_lengths, lengths
    )
    token_log_probs = log_probs.gather(-1, targets[..., None]).squeeze(-1)
    return token_log_probs.masked_fill(~mask, 0.0), mask


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def score_choices(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    choices: Sequence[str],
    *,
    batch_size: int = 8,
    show_progress: bool = True,
) -> torch.Tensor:
    """Score every choice after every prompt by its summed token log-likelihood.

    Each prompt is tokenized with special tokens and each choice without, and the ids are
    concatenated (see ``encode_prompts``). The sequences are sorted by length and run in
    right-padded batches under ``torch.no_grad()`` with the model in eval mode. The model's
    previous train/eval mode is restored afterwards. A choice of several tokens gets its own
    sequence. All single-token choices of a prompt share one, because the logits after the
    prompt score every next token at once.

    Args:
        model: a causal LM (a transformers model or a PeftModel around one).
        tokenizer: the model's tokenizer.
        prompts: the prompts, e.g. ``format_prompt(text)`` for the sentiment task.
        choices: the choice strings, each usually starting with a space, e.g. ``" positive"``.
        batch_size: the number of sequences per forward pass.
        show_progress: show a tqdm progress bar over batches.

    Returns:
        A float32 CPU tensor ``(len(prompts), len(choices))`` of summed log-likelihoods.

    Raises:
        ValueError: ``prompts`` or ``choices`` is empty, ``batch_size`` is not a positive
            integer, or a prompt or choice tokenizes to no tokens.
    """
    if len(prompts) == 0:
        raise ValueError("prompts is empty; pass at least one prompt to score")
    if len(choices) == 0:
        raise ValueError("choices is empty; pass at least one choice such as ' positive'")
    _check_positive_int("batch_size", batch_size)

    prompt_ids = encode_prompts(tokenizer, prompts)
    choice_ids = encode_completions(tokenizer, choices)
    requests = _scoring_requests(len(prompts), choice_ids)
    # Similar lengths in a batch mean less padding and fewer distinct positions to keep logits at.
    requests.sort(key=lambda request: len(prompt_ids[request[0]]) + len(request[1]), reverse=True)

    scores = torch.empty((len(prompts), len(choices)), dtype=torch.float32)
    device = model_device(model)
    pad_id = pad_token_id(tokenizer)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            starts = range(0, len(requests), batch_size)
            for start in tqdm(
                starts, desc="Scoring choices", unit="batch", disable=not show_progress
            ):
                batch = requests[start : start + batch_size]
                _score_batch(model, batch, prompt_ids, choice_ids, pad_id, device, scores)
    finally:
        model.train(was_training)
    return scores


def _scoring_requests(
    n_prompts: int, choice_ids: Sequence[Sequence[int]]
) -> list[tuple[int, list[int], list[int]]]:
    """Plan the sequences to run as ``(prompt_index, completion_ids, choice_indexes)``.

    A choice of several tokens needs its own sequence. All single-token choices of a prompt are
    scored from one sequence, because the logits after the prompt give every next token at
    once. That sequence carries the first single-token choice as its completion.
    """
    single = [c for c, ids in enumerate(choice_ids) if len(ids) == 1]
    multi = [c for c, ids in enumerate(choice_ids) if len(ids) > 1]
    requests = []
    for p in range(n_prompts):
        if single:
            requests.append((p, list(choice_ids[single[0]]), single))
        requests += [(p, list(choice_ids[c]), [c]) for c in multi]
    return requests


def _score_batch(
    model: torch.nn.Module,
    batch: Sequence[tuple[int, list[int], list[int]]],
    prompt_ids: Sequence[list[int]],
    choice_ids: Sequence[list[int]],
    pad_id: int,
    device: torch.device,
    scores: torch.Tensor,
) -> None:
    """Run one batch of scoring requests and write their sums into ``scores``."""
    sequences = [prompt_ids[p] + completion for p, completion, _ in batch]
    input_ids, attention_mask = pad_right(sequences, pad_id)
    log_probs, _, _ = completion_log_softmax(
        model,
        input_ids.to(device),
        attention_mask.to(device),
        prompt_lengths=[len(prompt_ids[p]) for p, _, _ in batch],
        lengths=[len(ids) for ids in sequences],
    )
    # log_probs: (batch, width, vocab)
    for row, (p, completion, choice_indexes) in enumerate(batch):
        if len(completion) == 1:
            # Single-token choices: every choice's token is read from the first slot.
            tokens = torch.tensor([choice_ids[c][0] for c in choice_indexes], device=device)
            scores[p, choice_indexes] = log_probs[row, 0, tokens].cpu()
        else:
            slots = torch.arange(len(completion), device=device)
            tokens = torch.tensor(completion, device=device)
            scores[p, choice_indexes[0]] = log_probs[row, slots, tokens].sum().cpu()


def predictions(scores: torch.Tensor) -> list[int]:
    """Return the index of the highest-scoring choice for each row of ``scores``.

    Raises:
        ValueError: ``scores`` is not a 2-D tensor with at least one column.
    """
    if scores.dim() != 2 or scores.shape[1] == 0:
        raise ValueError(
            f"scores must be a (n_examples, n_choices) tensor, got shape {tuple(scores.shape)}"
        )
    return scores.argmax(dim=1).tolist()


def accuracy(scores: torch.Tensor, labels: Sequence[int]) -> float:
    """Return the fraction of rows whose highest-scoring choice equals the label.

    Args:
        scores: ``(n_examples, n_choices)`` scores, higher is better.
        labels: the correct choice index of each row.

    Raises:
        ValueError: the numbers of rows and labels differ, or there are no rows.
    """
    predicted = predictions(scores)
    if len(predicted) != len(labels):
        raise ValueError(
            f"scores has {len(predicted)} rows but labels has {len(labels)} entries; "
            "pass one label per scored example"
        )
    if not predicted:
        raise ValueError("scores has no rows; accuracy needs at least one example")
    correct = sum(int(p == label) for p, label in zip(predicted, labels, strict=True))
    return correct / len(predicted)
