"""Deep prompts: Liu et al., 2022, "P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning Universally Across
Scales and Tasks" (arXiv 2110.07602) — prompts at every layer, not only at the input.

Each of the template's soft slots gets its own learned vector at the input of every transformer layer: layer 0's
vectors are written into the embeddings (exactly as prompt tuning does, so learned position embeddings are still
added), and at each deeper layer the per-layer seam (`layer_hook`) replaces the slots' hidden states with that
layer's vectors. Whatever the layers below computed at a slot is discarded; the slot's keys and values at layer l
are computed from the layer-l vector, which is how P-tuning v2 makes every layer's prompt a free parameter.

This is not the core's `prefix_tuning`: that one learns keys and values prepended outside the sequence (no
positions, no residual stream); here the prompts are hidden states at the template's slots, anywhere in the
prompt, passing through each layer's own norms and projections. Because only the slots change, the frozen text
before the first slot is unaffected in a causal LM and may be cached (`edits_only_soft_slots`).

Initialisation (`methods/init.py::layer_init_vectors`): layer 0 starts from text embeddings, as prompt tuning; each
deeper layer from the frozen model's own hidden states of that text at that layer (one short forward pass at init).
Small random vectors would sit far below the residual-stream scale of deeper layers, and the same embedding
vector at every depth would be off that layer's manifold; the model's own states of the init text make the
starting prompt behave like that text read in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..registry import register_method
from ..types import BackboneSpec, PromptInputs
from .base import InitContext, SoftPromptMethod, check_config, write_slots, write_soft
from .init import STRATEGIES, layer_init_vectors


@dataclass
class DeepPromptConfig:
    num_virtual_tokens: int = 16
    """Soft slots; each holds its own vector at every layer (num_layers x num_virtual_tokens x hidden parameters)."""
    init: str = "text"
    """Initialisation: `text` or `sample_vocab` (layer 0: those token embeddings; deeper layers: the frozen model's
    hidden states of the same tokens) or `random` (vocabulary-scaled Gaussian at every layer)."""
    init_text: str | None = None
    """Text for `init=text` (default: blank space, the start closest to the zero-shot template; `.` where the
    tokenizer drops spaces)."""

    def __post_init__(self) -> None:
        check_config(
            self.num_virtual_tokens > 0,
            "deep_prompt",
            "num_virtual_tokens",
            "a positive integer",
            self.num_virtual_tokens,
        )
        check_config(self.init in STRATEGIES, "deep_prompt", "init", f"one of {STRATEGIES}", self.init)


@register_method("deep_prompt")
class DeepPrompt(SoftPromptMethod):
    config_cls = DeepPromptConfig
    edits_only_soft_slots = True  # the hook writes only the slots: text before them never sees it (causal LMs)
    uses_layer_hook = True

    def __init__(self, config: DeepPromptConfig, spec: BackboneSpec):
        super().__init__(config, spec)
        self.prompt = nn.Parameter(torch.zeros(spec.num_layers, config.num_virtual_tokens, spec.hidden_size))
        # prompt: (layers, N, D); row 0 goes into the embeddings, row l replaces the slots at layer l's input. A model
        # that projects its embeddings to another width (OPT-350m, ALBERT) gets row 0 at layer 0's input instead.

    @property
    def num_soft_slots(self) -> int:
        return self.config.num_virtual_tokens

    def initialize(self, ctx: InitContext) -> None:
        vectors = layer_init_vectors(self.config.init, self.num_soft_slots, self.spec, ctx, self.config.init_text)
        with torch.no_grad():
            self.prompt.copy_(vectors)

    def apply(self, inputs: PromptInputs) -> PromptInputs:
        if inputs.decoding:  # no slots in a decoding step: their keys/values at every layer are already cached
            return inputs
        if not self.spec.embeddings_at_layer_width:
            return inputs.replace(layer_hook=self.layer_hook)
        embeds = write_soft(inputs, self.prompt[0])  # (B, T, D)
        return inputs.replace(inputs_embeds=embeds, layer_hook=self.layer_hook)

    def layer_hook(self, layer: int, hidden: Tensor, inputs: PromptInputs) -> Tensor:
        if layer == 0 and self.spec.embeddings_at_layer_width:  # written into the embeddings by `apply`
            return hidden
        return write_slots(hidden, inputs.soft_positions, self.prompt[layer])  # (B, T, D)
