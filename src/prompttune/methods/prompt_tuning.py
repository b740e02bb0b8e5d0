"""Prompt tuning: Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning" (arXiv 2104.08691).

N trainable vectors written into the template's soft slots (anywhere in the prompt, not only in front).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..registry import register_method
from ..types import BackboneSpec, PromptInputs
from .base import InitContext, SoftPromptMethod, check_config, write_soft
from .init import STRATEGIES, init_vectors


@dataclass
class PromptTuningConfig:
    num_virtual_tokens: int = 16
    """Number of soft tokens."""
    init: str = "text"
    """Initialisation: `random` (vocabulary-scaled Gaussian), `sample_vocab` or `text`."""
    init_text: str | None = None
    """Text for `init=text` (default: blank space, the start closest to the zero-shot template; `.` where the
    tokenizer drops spaces)."""

    def __post_init__(self) -> None:
        check_config(
            self.num_virtual_tokens > 0,
            "prompt_tuning",
            "num_virtual_tokens",
            "a positive integer",
            self.num_virtual_tokens,
        )
        check_config(self.init in STRATEGIES, "prompt_tuning", "init", f"one of {STRATEGIES}", self.init)


@register_method("prompt_tuning")
class PromptTuning(SoftPromptMethod):
    config_cls = PromptTuningConfig
    edits_only_soft_slots = True

    def __init__(self, config: PromptTuningConfig, spec: BackboneSpec):
        super().__init__(config, spec)
        self.prompt = nn.Parameter(torch.zeros(config.num_virtual_tokens, spec.input_size))  # (N, D)

    @property
    def num_soft_slots(self) -> int:
        return self.config.num_virtual_tokens

    def initialize(self, ctx: InitContext) -> None:
        vectors = init_vectors(self.config.init, self.num_soft_slots, self.spec, ctx, self.config.init_text)
        with torch.no_grad():
            self.prompt.copy_(vectors)

    def apply(self, inputs: PromptInputs) -> PromptInputs:
        return inputs.replace(inputs_embeds=write_soft(inputs, self.prompt))

    def peft_export(self) -> tuple[str, torch.Tensor]:
        return "PROMPT_TUNING", self.prompt.detach()  # (N, D)
