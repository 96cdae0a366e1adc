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
    *,
    dtype: torch.dtype = torch.float32,
    store_device: torch.device | str | None = "cpu",
) -> Iterator[None]:
    """Record each named module's input and output rows at ``index`` while the context is open.

    Args:
        model: the model whose modules are hooked.
        module_names: full module names, as in ``model.named_modules()``.
        index: ``{"batch": LongTensor, "position": LongTensor, "length": int}``, with
            ``length`` the padded sequence length; read at every forward call, so the caller
            updates it before each batch.
        store: receives ``store[name]["input"]`` and ``store[name]["output"]`` lists of
            ``(n_rows, d)`` tensors of ``dtype``.
        dtype: dtype of the stored rows.
        store_device: where the stored rows go; None keeps them on the model's device, so a GPU
            forward pass is not stopped by a copy to the CPU at every module.
    """
    handles = []

    def make_hook(name: str):
        def hook(module, args, kwargs, output):
            entry = store.setdefault(name, {"input": [], "output": []})
            x = _select(hook_input(args, kwargs), index).detach()
            y = _select(hook_output(output), index).detach()
            entry["input"].append(x.to(device=store_device, dtype=dtype))
            entry["output"].append(y.to(device=store_device, dtype=dtype))

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
    # The target layer per source layer that chose the anchors, when the recording was made for
    # a bridge.
    layer_map: list[int] | None = None

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


def _forward_recorded(model, tokenizer, encoded, rows, module_names, store, **hook_options):
    device = next(model.parameters()).device
    # The index lives on the model's device, so indexing a GPU activation copies nothing.
    batch_index = torch.tensor([row for row, _ in rows], dtype=torch.long, device=device)
    position_index = torch.tensor([position for _, position in rows], dtype=torch.long)
    index = {"batch": batch_index, "position": position_index.to(device)}
    batch = _pad_batch(encoded, tokenizer.pad_token_id, device)
    index["length"] = batch["input_ids"].shape[1]
    with torch.no_grad(), recording_hooks(model, module_names, index, store, **hook_options):
        decoder_of(model)(**batch, use_cache=False)


def _concatenate(store) -> dict[str, dict[str, torch.Tensor]]:
    return {
        name: {kind: torch.cat(parts) for kind, parts in entry.items()}
        for name, entry in store.items()
    }


@dataclass
class BatchPlan:
    """The encoded texts of one batch and the aligned rows to record from them.

    Attributes:
        text_ids: corpus index of each text in the batch.
        source_encoded, target_encoded: each text encoded by the source and target tokenizers.
        source_rows, target_rows: ``(batch row, token index)`` of every aligned position.
        row_text_ids: corpus index of the text of every aligned position.
        source_tokens: source text tokens read in the batch.
        aligned_tokens: aligned positions in the batch before ``keep_rows``.
    """

    text_ids: list[int] = field(default_factory=list)
    source_encoded: list[Encoded] = field(default_factory=list)
    target_encoded: list[Encoded] = field(default_factory=list)
    source_rows: list[tuple[int, int]] = field(default_factory=list)
    target_rows: list[tuple[int, int]] = field(default_factory=list)
    row_text_ids: list[int] = field(default_factory=list)
    source_tokens: int = 0
    aligned_tokens: int = 0

    def keep_rows(self, count: int) -> None:
        """Keep only the first ``count`` aligned positions."""
        count = max(count, 0)
        self.source_rows = self.source_rows[:count]
        self.target_rows = self.target_rows[:count]
        self.row_text_ids = self.row_text_ids[:count]


def plan_batch(
    source_tokenizer,
    target_tokenizer,
    indexed_texts: Sequence[tuple[int, str]],
    max_tokens: int,
    *,
    max_source_tokens: int | None = None,
) -> BatchPlan:
    """Cut, encode and align a batch of ``(corpus index, text)`` pairs.

    Each text is cut to what ``max_tokens`` source tokens read. Texts left empty are skipped.
    With ``max_source_tokens``, texts are taken until their source tokens reach that number; the
    text that reaches it is kept whole.
    """
    plan = BatchPlan()
    for text_id, text in indexed_texts:
        if max_source_tokens is not None and plan.source_tokens >= max_source_tokens:
            break
        text = truncate_text(source_tokenizer, text, max_tokens)
        if not text.strip():
            continue
        first, second = encode(source_tokenizer, text), encode(target_tokenizer, text)
        row = len(plan.text_ids)
        for i, j in aligned_positions(first, second):
            plan.source_rows.append((row, i))
            plan.target_rows.append((row, j))
            plan.row_text_ids.append(text_id)
        plan.text_ids.append(text_id)
        plan.source_encoded.append(first)
        plan.target_encoded.append(second)
        plan.source_tokens += sum(1 for special in first.special if not special)
    plan.aligned_tokens = len(plan.source_rows)
    return plan


def record_batch(
    source,
    target,
    plan: BatchPlan,
    site_names: Sequence[str],
    anchor_names: Sequence[str],
    source_store: dict,
    target_store: dict,
    **hook_options,
) -> None:
    """Run both models on a planned batch and append the aligned rows to the stores.

    ``hook_options`` (``dtype``, ``store_device``) go to ``recording_hooks``.
    """
    _forward_recorded(
        source.model,
        source.tokenizer,
        plan.source_encoded,
        plan.source_rows,
        site_names,
        source_store,
        **hook_options,
    )
    _forward_recorded(
        target.model,
        target.tokenizer,
        plan.target_encoded,
        plan.target_rows,
        anchor_names,
        target_store,
        **hook_options,
    )


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
    max_source_tokens: int | None = None,
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
        max_source_tokens: stop reading texts once this many source text tokens are read
            (None: no limit).
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
        if max_source_tokens is not None and source_tokens >= max_source_tokens:
            break
        room = None if max_source_tokens is None else max_source_tokens - source_tokens
        batch = list(enumerate(texts[start : start + batch_size], start=start))
        plan = plan_batch(
            source.tokenizer, target.tokenizer, batch, max_tokens, max_source_tokens=room
        )
        if not plan.text_ids:
            continue
        source_tokens += plan.source_tokens
        aligned_tokens += plan.aligned_tokens
        if max_positions is not None:
            plan.keep_rows(max_positions - total_positions)
        if not plan.source_rows:
            continue
        record_batch(source, target, plan, site_names, anchor_names, source_store, target_store)
        text_ids.extend(plan.row_text_ids)
        total_positions += len(plan.source_rows)
        used_texts += len(plan.text_ids)
        bar.update(len(plan.source_rows) if max_positions else len(plan.text_ids))
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
