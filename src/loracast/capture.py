"""Record module inputs and outputs at aligned positions with forward hooks.

Hooks exist only inside ``recording_hooks`` and are removed in ``finally``. Each hook keeps only
the rows of the aligned positions, detached, so memory grows with the number of positions and
not with sequence length.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from loracast.align import Encoded, aligned_positions, encode, truncate_text

logger = logging.getLogger(__name__)


def hook_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """Return a module call's input: its first argument, or ``hidden_states`` passed by name.

    Decoder layers (the anchors of families not in the role table) may take their input by name.
    """
    return args[0] if args else kwargs["hidden_states"]


def hook_output(output) -> torch.Tensor:
    """Return a module's output tensor, the first item when a decoder layer returns a tuple."""
    return output[0] if isinstance(output, tuple) else output


def with_output(output, value: torch.Tensor):
    """Return ``output`` with its tensor replaced by ``value``, keeping a tuple's other items."""
    return (value, *output[1:]) if isinstance(output, tuple) else value


def _select(tensor: torch.Tensor, index: dict) -> torch.Tensor:
    """Return the rows of ``index`` from a ``(batch, seq, d)`` tensor or its flattened form.

    OPT's fc1 and fc2 read their input flattened to ``(batch · seq, d)``.
    """
    if tensor.dim() == 2:
        return tensor[index["batch"] * index["length"] + index["position"]]
    return tensor[index["batch"], index["position"]]


@contextmanager
def recording_hooks(
    model: nn.Module,
    module_names: Sequence[str],
    index: dict[str, torch.Tensor],
    store: dict[str, dict[str, list[torch.Tensor]]],
) -> Iterator[None]:
    """Record each named module's input and output rows at ``index`` while the context is open.

    Args:
        model: the model whose modules are hooked.
        module_names: full module names, as in ``model.named_modules()``.
        index: ``{"batch": LongTensor, "position": LongTensor, "length": int}``, with
            ``length`` the padded sequence length; read at every forward call, so the caller
            updates it before each batch.
        store: receives ``store[name]["input"]`` and ``store[name]["output"]`` lists of
            ``(n_rows, d)`` float32 CPU tensors.
    """
    handles = []

    def make_hook(name: str):
        def hook(module, args, kwargs, output):
            entry = store.setdefault(name, {"input": [], "output": []})
            entry["input"].append(_select(hook_input(args, kwargs), index).detach().float().cpu())
            entry["output"].append(_select(hook_output(output), index).detach().float().cpu())

        return hook

    try:
        for name in module_names:
            module = model.get_submodule(name)
            handles.append(module.register_forward_hook(make_hook(name), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class Recording:
    """Paired activations of source sites and target anchors at the same aligned positions.

    ``source[name]["input"]`` is a ``(n_positions, d_in)`` tensor, likewise ``"output"`` and the
    ``target`` entries. Row ``k`` of every tensor belongs to the same text prefix.
    """

    source: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    target: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    text_ids: torch.Tensor | None = None  # (n_positions,) index of the passage of each row

    @property
    def num_positions(self) -> int:
        first = next(iter(self.source.values()))
        return first["input"].shape[0]


def _pad_batch(encoded: list[Encoded], pad_id: int, device) -> dict[str, torch.Tensor]:
    length = max(len(item.input_ids) for item in encoded)
    ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for row, item in enumerate(encoded):
        ids[row, : len(item.input_ids)] = torch.tensor(item.input_ids)
        mask[row, : len(item.input_ids)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def decoder_of(model: nn.Module) -> nn.Module:
    """Return the decoder stack without the LM head, so recording skips the vocabulary logits."""
    return getattr(model, model.base_model_prefix, model)


def _forward_recorded(model, tokenizer, encoded, rows, module_names, store) -> None:
    batch_index = torch.tensor([row for row, _ in rows], dtype=torch.long)
    position_index = torch.tensor([position for _, position in rows], dtype=torch.long)
    device = next(model.parameters()).device
    batch = _pad_batch(encoded, tokenizer.pad_token_id, device)
    index = {"batch": batch_index, "position": position_index}
    index["length"] = batch["input_ids"].shape[1]
    with torch.no_grad(), recording_hooks(model, module_names, index, store):
        decoder_of(model)(**batch, use_cache=False)


def _concatenate(store) -> dict[str, dict[str, torch.Tensor]]:
    return {
        name: {kind: torch.cat(parts) for kind, parts in entry.items()}
        for name, entry in store.items()
    }


def record_pair(
    source,
    target,
    texts: Sequence[str],
    site_names: Sequence[str],
    anchor_names: Sequence[str],
    *,
    max_tokens: int = 128,
    batch_size: int = 8,
    max_positions: int | None = None,
    show_progress: bool = True,
) -> Recording:
    """Run both models on the same texts and record sites and anchors at aligned positions.

    Args:
        source, target: ``LoadedModel`` objects (model and tokenizer).
        texts: general-corpus passages; each is cut to what ``max_tokens`` source tokens read.
        site_names, anchor_names: full module names to record in the source and the target.
        max_tokens: source tokens per passage.
        batch_size: passages per forward pass.
        max_positions: stop once this many aligned positions are recorded (None: no limit).
        show_progress: show a progress bar.

    Returns:
        The recording, with ``stats`` on texts, positions and alignment coverage.

    Raises:
        ValueError: no aligned position was found in the corpus.
    """
    source_store: dict = {}
    target_store: dict = {}
    text_ids: list[int] = []
    aligned_tokens = 0  # before the max_positions cap, for the coverage statistic
    total_positions = 0
    source_tokens = 0
    used_texts = 0
    bar = tqdm(
        total=max_positions or len(texts),
        disable=not show_progress,
        desc="recording",
        unit="pos" if max_positions else "text",
    )
    for start in range(0, len(texts), batch_size):
        indexed = [
            (start + offset, truncate_text(source.tokenizer, text, max_tokens))
            for offset, text in enumerate(texts[start : start + batch_size])
        ]
        indexed = [(text_id, text) for text_id, text in indexed if text.strip()]
        if not indexed:
            continue
        chunk = [text for _, text in indexed]
        source_encoded = [encode(source.tokenizer, text) for text in chunk]
        target_encoded = [encode(target.tokenizer, text) for text in chunk]
        source_rows, target_rows, row_texts = [], [], []
        for row, (first, second) in enumerate(zip(source_encoded, target_encoded, strict=True)):
            for i, j in aligned_positions(first, second):
                source_rows.append((row, i))
                target_rows.append((row, j))
                row_texts.append(indexed[row][0])
            source_tokens += sum(1 for special in first.special if not special)
        aligned_tokens += len(source_rows)
        if max_positions is not None:
            keep = max_positions - total_positions
            source_rows, target_rows = source_rows[:keep], target_rows[:keep]
            row_texts = row_texts[:keep]
        if not source_rows:
            continue
        _forward_recorded(
            source.model, source.tokenizer, source_encoded, source_rows, site_names, source_store
        )
        _forward_recorded(
            target.model, target.tokenizer, target_encoded, target_rows, anchor_names, target_store
        )
        text_ids.extend(row_texts)
        total_positions += len(source_rows)
        used_texts += len(chunk)
        bar.update(len(source_rows) if max_positions else len(chunk))
        if max_positions is not None and total_positions >= max_positions:
            break
    bar.close()

    if total_positions == 0:
        raise ValueError(
            f"no aligned positions found in {len(texts)} corpus texts; pass a corpus of "
            "ordinary prose (at least a few hundred words)"
        )
    stats = {
        "texts": used_texts,
        "positions": total_positions,
        "source_text_tokens": source_tokens,
        "aligned_fraction_of_source_tokens": aligned_tokens / max(source_tokens, 1),
    }
    logger.info("recorded %d aligned positions from %d texts", total_positions, used_texts)
    return Recording(
        source=_concatenate(source_store),
        target=_concatenate(target_store),
        stats=stats,
        text_ids=torch.tensor(text_ids, dtype=torch.long),
    )
