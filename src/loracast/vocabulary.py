"""Tokens whose decoded strings both vocabularies share, and next-token scores restricted to them.

Two models' next-token distributions can be compared only over tokens that mean the same text.
A token qualifies when it decodes, on its own, to the same non-empty string in both tokenizers
(special tokens and byte-fallback pieces that decode to U+FFFD never do). When several ids of one
tokenizer decode to the same string, the lowest id is kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)


@dataclass
class SharedVocabulary:
    """Index pairs of tokens with the same decoded string.

    Attributes:
        source_ids: ``(n,)`` ids in the source vocabulary.
        target_ids: ``(n,)`` ids in the target vocabulary; entry ``k`` decodes like
            ``source_ids[k]``.
    """

    source_ids: torch.Tensor
    target_ids: torch.Tensor

    def __len__(self) -> int:
        return int(self.source_ids.numel())


def _strings(tokenizer) -> dict[str, int]:
    special = set(tokenizer.all_special_ids)
    ids = [index for index in range(len(tokenizer)) if index not in special]
    decoded = tokenizer.batch_decode([[index] for index in ids], clean_up_tokenization_spaces=False)
    strings: dict[str, int] = {}
    for index, text in zip(ids, decoded, strict=True):
        if text and "\ufffd" not in text and text not in strings:
            strings[text] = index
    return strings


def shared_vocabulary(source_tokenizer, target_tokenizer) -> SharedVocabulary:
    """Find the tokens both tokenizers decode to the same string.

    Raises:
        ValueError: the tokenizers share no token string.
    """
    source, target = _strings(source_tokenizer), _strings(target_tokenizer)
    common = sorted(set(source) & set(target), key=lambda text: source[text])
    if not common:
        raise ValueError(
            "the source and target tokenizers share no decoded token string, so their next-token "
            "distributions cannot be compared; behaviour refinement needs overlapping vocabularies"
        )
    logger.info(
        "shared vocabulary: %d tokens (%.0f%% of the source's, %.0f%% of the target's)",
        len(common),
        100 * len(common) / len(source),
        100 * len(common) / len(target),
    )
    return SharedVocabulary(
        source_ids=torch.tensor([source[text] for text in common]),
        target_ids=torch.tensor([target[text] for text in common]),
    )


def output_embeddings(model: nn.Module) -> nn.Module:
    """Return the LM head of a causal LM (or of the model a PEFT wrapper holds)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(base).__name__} has no output embeddings (LM head)")
    return head


def restricted_logits(model: nn.Module, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token logits for ``ids`` only, from final hidden states ``(n, d)``: ``(n, len(ids))``.

    Applying only the needed rows of the LM head keeps a 262k-token vocabulary affordable.
    Final-logit soft-capping (Gemma 2) is applied when the model's config sets it.
    """
    head = output_embeddings(model)
    weight = head.weight[ids.to(head.weight.device)]  # (n_ids, d)
    logits = hidden.to(weight.dtype) @ weight.T
    bias = getattr(head, "bias", None)
    if bias is not None:
        logits = logits + bias[ids.to(bias.device)]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cap = getattr(base.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()
