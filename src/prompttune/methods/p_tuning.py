"""P-tuning: Liu et al., 2021, "GPT Understands, Too" (arXiv 2103.10385).

Virtual-token embeddings pass through a prompt encoder (bidirectional LSTM + MLP, or an MLP) before they are
written into the soft slots. The encoder is part of the artifact, so training resumes exactly (PEFT saves only its
outputs, peft#1607). A residual connection with a zero-initialised last layer makes the starting prompt equal to
its (text) initialisation instead of the output of a random network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..registry import register_method
from ..types import BackboneSpec, PromptInputs
from .base import InitContext, SoftPromptMethod, check_config, write_soft
from .init import STRATEGIES, init_vectors


@dataclass
class PTuningConfig:
    num_virtual_tokens: int = 16
    """Number of soft tokens."""
    encoder: str = "mlp"
    """Prompt encoder: `mlp` or `lstm` (bidirectional LSTM followed by the MLP)."""
    encoder_hidden: int = 256
    """Hidden width of the prompt encoder."""
    residual: bool = True
    """Add the encoder's output to the embeddings (starts at the initialisation)."""
    init: str = "text"
    """Initialisation of the input embeddings: `random`, `sample_vocab` or `text`."""
    init_text: str | None = None
    """Text for `init=text` (default: blank space, the start closest to the zero-shot template; `.` where the
    tokenizer drops spaces)."""

    def __post_init__(self) -> None:
        check_config(
            self.num_virtual_tokens > 0, "p_tuning", "num_virtual_tokens", "a positive integer", self.num_virtual_tokens
        )
        check_config(self.encoder in ("mlp", "lstm"), "p_tuning", "encoder", "mlp or lstm", self.encoder)
        check_config(self.encoder_hidden > 0, "p_tuning", "encoder_hidden", "a positive integer", self.encoder_hidden)
        check_config(self.init in STRATEGIES, "p_tuning", "init", f"one of {STRATEGIES}", self.init)


@register_method("p_tuning")
class PTuning(SoftPromptMethod):
    config_cls = PTuningConfig
    edits_only_soft_slots = True

    def __init__(self, config: PTuningConfig, spec: BackboneSpec):
        super().__init__(config, spec)
        D, H = spec.input_size, config.encoder_hidden
        self.embedding = nn.Parameter(torch.zeros(config.num_virtual_tokens, D))  # (N, D)
        self.lstm = (
            nn.LSTM(D, H // 2, num_layers=2, bidirectional=True, batch_first=True) if config.encoder == "lstm" else None
        )
        self.mlp = nn.Sequential(nn.Linear(H if self.lstm else D, H), nn.ReLU(), nn.Linear(H, D))
        if config.residual:
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    @property
    def num_soft_slots(self) -> int:
        return self.config.num_virtual_tokens

    def initialize(self, ctx: InitContext) -> None:
        vectors = init_vectors(self.config.init, self.num_soft_slots, self.spec, ctx, self.config.init_text)
        with torch.no_grad():
            self.embedding.copy_(vectors)

    def prompt(self) -> Tensor:
        x = self.embedding  # (N, D)
        h = self.lstm(x[None])[0][0] if self.lstm is not None else x  # (N, H) or (N, D)
        out = self.mlp(h)  # (N, D)
        return x + out if self.config.residual else out

    def apply(self, inputs: PromptInputs) -> PromptInputs:
        return inputs.replace(inputs_embeds=write_soft(inputs, self.prompt()))

    def peft_export(self) -> tuple[str, Tensor]:
        # PEFT's own P-tuning adapters store only the encoder's output, so a prompt-tuning adapter is the same thing.
        return "PROMPT_TUNING", self.prompt().detach()  # (N, D)
