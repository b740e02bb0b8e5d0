"""DePT: Shi & Lipani, 2023, "DePT: Decomposed Prompt Tuning for Parameter-Efficient Fine-tuning"
(arXiv 2309.05173).

A shorter soft prompt plus a low-rank update `A @ B` of the input embeddings, trained with two learning rates.
The official code indexes the update by absolute column, so every batch must be padded to one fixed length. Here
row `i` of the update is applied to the i-th token of each example's *own* text (`PromptInputs.token_index`), so it
is the same under dynamic left padding, in any batch, and during decoding. Tokens past `max_positions` get no
update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..registry import register_method
from ..types import BackboneSpec, PromptInputs
from .base import InitContext, SoftPromptMethod, check_config, write_soft
from .init import STRATEGIES, init_vectors


@dataclass
class DePTConfig:
    num_virtual_tokens: int = 8
    """Soft tokens (shorter than plain prompt tuning's; the rest of the budget goes to the low-rank pair)."""
    rank: int = 4
    """Rank r of the update A (max_positions x r) @ B (r x D)."""
    max_positions: int = 576
    """Rows of A: text tokens that receive an update."""
    lowrank_lr: float = 1e-3
    """Learning rate of A and B (the prompt uses the run's `lr`)."""
    init: str = "text"
    """Initialisation of the soft prompt: `random`, `sample_vocab` or `text`."""
    init_text: str | None = None
    """Text for `init=text` (default: blank space, the start closest to the zero-shot template; `.` where the
    tokenizer drops spaces)."""

    def __post_init__(self) -> None:
        check_config(
            self.num_virtual_tokens > 0, "dept", "num_virtual_tokens", "a positive integer", self.num_virtual_tokens
        )
        check_config(self.rank > 0, "dept", "rank", "a positive integer", self.rank)
        check_config(self.max_positions > 0, "dept", "max_positions", "a positive integer", self.max_positions)
        check_config(self.lowrank_lr > 0, "dept", "lowrank_lr", "a positive number", self.lowrank_lr)
        check_config(self.init in STRATEGIES, "dept", "init", f"one of {STRATEGIES}", self.init)


@register_method("dept")
class DePT(SoftPromptMethod):
    config_cls = DePTConfig

    def __init__(self, config: DePTConfig, spec: BackboneSpec):
        super().__init__(config, spec)
        self.prompt = nn.Parameter(torch.zeros(config.num_virtual_tokens, spec.input_size))  # (m, D)
        self.lora_a = nn.Parameter(torch.zeros(config.max_positions, config.rank))  # (s, r)
        self.lora_b = nn.Parameter(torch.zeros(config.rank, spec.input_size))  # (r, D); zero: no update at start

    @property
    def num_soft_slots(self) -> int:
        return self.config.num_virtual_tokens

    def initialize(self, ctx: InitContext) -> None:
        vectors = init_vectors(self.config.init, self.num_soft_slots, self.spec, ctx, self.config.init_text)
        with torch.no_grad():
            self.prompt.copy_(vectors)
            # drawn on the CPU generator, then copied: the same values on every device
            self.lora_a.copy_(torch.randn(self.lora_a.shape, generator=ctx.generator) / math.sqrt(self.config.rank))
            self.lora_b.zero_()

    def apply(self, inputs: PromptInputs) -> PromptInputs:
        index = inputs.token_index  # (B, T), -1 on pads and soft slots
        valid = (index >= 0) & (index < self.config.max_positions)  # (B, T)
        rows = self.lora_a[index.clamp(0, self.config.max_positions - 1)]  # (B, T, r)
        update = (rows @ self.lora_b) * valid[..., None]  # (B, T, D)
        embeds = inputs.inputs_embeds + update.to(inputs.inputs_embeds.dtype)
        return inputs.replace(inputs_embeds=write_soft(inputs.replace(inputs_embeds=embeds), self.prompt))

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return [
            {"params": [self.prompt], "lr": lr},
            {"params": [self.lora_a, self.lora_b], "lr": self.config.lowrank_lr},
        ]
