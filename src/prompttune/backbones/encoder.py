"""Bidirectional encoders (BERT, MiniLM, RoBERTa, ...) for classifier-head use."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..errors import PromptTuneError
from ..registry import register_backbone
from ..types import PromptInputs
from .base import Backbone


@register_backbone("encoder")
class Encoder(Backbone):
    kind = "encoder"
    supports_prefix_cache = False  # bidirectional: a prefix's states depend on the whole input

    def __init__(self, model, tokenizer, name: str):
        super().__init__(model, tokenizer, name)
        self.position_offset, width = self._measure()
        # Positions below the offset are never a token's, so the context is that much shorter.
        max_positions = self.spec.max_positions - self.position_offset
        self.spec = dataclasses.replace(self.spec, max_positions=max_positions, output_size=width)

    @torch.no_grad()
    def _measure(self) -> tuple[int, int]:
        """(position id the model gives a sequence's first token, width of the final hidden states), from its own
        forward. The first is 0 (BERT), or the padding index + 1 (RoBERTa, XLM-R and MPNet number positions after the
        padding's; MPNet's index is 1 whatever the pad id). Explicit positions keep left padding harmless, so they
        must start where the model's own do; found by matching the model's own forward on a short unpadded input."""
        pad = getattr(self.model.config, "pad_token_id", None)
        candidates = list(dict.fromkeys([0] + ([int(pad) + 1] if pad is not None else []) + [1, 2, 3]))
        # Ordinary tokens from the middle of the vocabulary: a special id (MPNet's padding index is 1) would be
        # numbered as padding by the model's own positions.
        special = set(getattr(self.tokenizer, "all_special_ids", []) or []) | {pad}
        middle = self.spec.vocab_size // 2
        ids = torch.tensor([[i for i in range(middle, middle + 8) if i not in special][:4]], device=self.device)
        mask = torch.ones_like(ids)
        own = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (1, 4, D)
        for offset in candidates:
            pos = torch.arange(ids.shape[1], device=self.device)[None] + offset
            ours = self.model(inputs_embeds=self.embed(ids), attention_mask=mask, position_ids=pos).last_hidden_state
            if torch.allclose(own, ours, atol=1e-4):
                return offset, own.shape[-1]
        return 0, own.shape[-1]  # none matches (the model adds more to its embeddings): keep the plain numbering

    def forward(self, inputs: PromptInputs) -> Tensor:
        if inputs.past_key_values is not None:
            raise PromptTuneError(f"backbone {self.spec.name!r} is an encoder; key/value prefixes need a causal LM")
        # token_type_ids default to zeros; explicit positions keep left padding harmless.
        with self.hooked(inputs):
            out = self.model(
                inputs_embeds=inputs.inputs_embeds,
                attention_mask=inputs.attention_mask,
                position_ids=inputs.position_ids + self.position_offset,
            )
        return out.last_hidden_state  # (B, T, D)
