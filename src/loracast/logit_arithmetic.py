"""Logit arithmetic across tokenizers: the target's logits plus the adapter's change in the source.

A baseline with no training, in the style of proxy-tuning: at every aligned position the
target's next-token logits gain ``scale · (log p_source+adapter − log p_source)`` on the tokens
whose strings both vocabularies share (each side's log-softmax taken over those tokens). Tokens
outside the shared vocabulary and positions where only one tokenizer ends a token keep the
target's own logits. It needs the source, with and without the adapter, at inference, so every
forward pass costs two passes of the source besides the target's.

This is the distribution that the behavioural objective's teacher (``loracast.refine``) tilts
the target toward, so its score is also a measure of how good that teacher is.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from loracast.adapters import Kernel
from loracast.align import aligned_positions, encode
from loracast.architectures import Site
from loracast.capture import decoder_of
from loracast.models import LoadedModel
from loracast.refine import kernel_hooks
from loracast.vocabulary import SharedVocabulary, restricted_logits


class LogitArithmetic(nn.Module):
    """The target as a causal LM whose logits carry the source adapter's change.

    ``forward(input_ids, attention_mask)`` takes the target's token ids (right or left
    padding) and returns the shifted logits. Each row is decoded to text, read by the source
    with and without the adapter, and the change is added at the aligned positions.

    Args:
        source: the source model; ``kernels`` are hooked into it only during a forward pass.
        target: the target model.
        kernels: the adapter's kernels, from ``loracast.adapters.load_adapter(path).kernels``.
        shared: the shared vocabulary of the two tokenizers.
        scale: the factor on the source's change (1 adds it as it is).
    """

    def __init__(
        self,
        source: LoadedModel,
        target: LoadedModel,
        kernels: dict[Site, Kernel],
        shared: SharedVocabulary,
        *,
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.target_model = target.model
        self.source = source
        self.target_tokenizer = target.tokenizer
        self.kernels = kernels
        self.shared = shared
        self.scale = scale

    def _source_change(self, text: str) -> tuple[list[int], torch.Tensor]:
        """Return the target positions aligned in ``text`` and the source's change at each."""
        source_encoded = encode(self.source.tokenizer, text)
        target_encoded = encode(self.target_tokenizer, text)
        pairs = aligned_positions(source_encoded, target_encoded)
        if not pairs:
            return [], torch.empty(0, len(self.shared))
        model = self.source.model
        ids = torch.tensor([source_encoded.input_ids], device=next(model.parameters()).device)
        source_positions = [pair[0] for pair in pairs]
        decoder = decoder_of(model)
        with torch.no_grad():
            base = decoder(input_ids=ids, use_cache=False)[0][0, source_positions]
            with kernel_hooks(model, self.kernels):
                adapted = decoder(input_ids=ids, use_cache=False)[0][0, source_positions]
            shared_ids = self.shared.source_ids
            change = restricted_logits(model, adapted, shared_ids).log_softmax(-1)
            change -= restricted_logits(model, base, shared_ids).log_softmax(-1)
        return [pair[1] for pair in pairs], change

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> CausalLMOutput:
        """Return the target's logits ``(batch, seq, vocab)`` with the source's change added.

        Raises:
            ValueError: a row's tokens, decoded and encoded again, do not give back the same
                ids, so its positions cannot be matched to the text.
        """
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        output = self.target_model(input_ids=input_ids, attention_mask=mask, **kwargs)
        logits = output.logits.float().clone()
        target_ids = self.shared.target_ids.to(logits.device)
        for row in range(len(input_ids)):
            columns = mask[row].nonzero().flatten()
            tokens = input_ids[row, columns].tolist()
            text = self.target_tokenizer.decode(tokens, skip_special_tokens=True)
            if encode(self.target_tokenizer, text).input_ids != tokens:
                raise ValueError(
                    f"row {row}: decoding its {len(tokens)} tokens and encoding the text again "
                    "gives other ids, so its positions cannot be matched to the source; pass ids "
                    "that the target tokenizer produced from text, with its own special tokens"
                )
            positions, change = self._source_change(text)
            if not positions:
                continue
            place = columns[torch.tensor(positions, device=columns.device)]
            shifted = logits[row, place][:, target_ids] + self.scale * change.to(logits.device)
            logits[row, place.unsqueeze(1), target_ids.unsqueeze(0)] = shifted
        return CausalLMOutput(logits=logits)
