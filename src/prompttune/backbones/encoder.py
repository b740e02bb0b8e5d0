"""Bidirectional encoders (BERT, MiniLM, RoBERTa, ...) for classifier-head use."""

from __future__ import annotations

from torch import Tensor

from ..errors import PromptTuneError
from ..registry import register_backbone
from ..types import PromptInputs
from .base import Backbone


@register_backbone("encoder")
class Encoder(Backbone):
    kind = "encoder"
    supports_prefix_cache = False  # bidirectional: a prefix's states depend on the whole input

    def forward(self, inputs: PromptInputs) -> Tensor:
        if inputs.past_key_values is not None:
            raise PromptTuneError(f"backbone {self.spec.name!r} is an encoder; key/value prefixes need a causal LM")
        # token_type_ids default to zeros; explicit positions keep left padding harmless.
        with self.hooked(inputs):
            out = self.model(
                inputs_embeds=inputs.inputs_embeds,
                attention_mask=inputs.attention_mask,
                position_ids=inputs.position_ids,
            )
        return out.last_hidden_state  # (B, T, D)
