"""EPT: Lan et al., 2024, "Efficient Prompt Tuning by Multi-Space Projection and Prompt Fusion" (arXiv 2405.11464).

A short soft prompt `P` (m x D) plus a low-rank pair `A` (m x r), `B` (r x D) whose product is a second knowledge
source for the prompt (prompt fusion), then a projection of the fused prompt into several subspaces whose outputs a
gating network mixes per token (multi-space projection):

    L  = A @ B                                   (m, D)  low-rank knowledge
    F  = P + L + softmax(P @ L^T / sqrt(D)) @ L  (m, D)  fusion: token i takes row i of L, and reads all rows of L
                                                         by attention with itself as the query
    H_k = (F @ U_k) @ V_k, k = 1..K              (m, D)  subspace k: a rank-s projection D -> s -> D
    g  = softmax(F @ W_g)                        (m, K)  gating network: per-token weights of the K subspaces
    prompt = F + sum_k g[:, k] * H_k             (m, D)  written into the template's soft slots

The paper names the modules (fusion by attention of the short prompt with the low-rank matrices; K projections mixed
by a softmax gate) but leaves choices open; ours, to keep the parameter count small and training stable: the
subspace projections are rank-s factor pairs rather than full D x D maps, the gate is a single linear map of each
fused token, and both modules are residual with `B`, every `V_k` and `W_g` zero at the start, so training starts
exactly from the initialised short prompt (best-on-dev selection keeps that prompt as a candidate). The prompt does
not depend on the input, so EPT edits only the soft slots (the frozen text before them may be cached) and exports to
PEFT as the (m, D) prompt it computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..registry import register_method
from ..types import BackboneSpec, PromptInputs
from .base import InitContext, SoftPromptMethod, check_config, write_soft
from .init import STRATEGIES, init_vectors


@dataclass
class EPTConfig:
    num_virtual_tokens: int = 8
    """Soft tokens m of the short prompt."""
    rank: int = 2
    """Rank r of the low-rank knowledge A (m x r) @ B (r x D)."""
    num_spaces: int = 2
    """Subspaces K the fused prompt is projected into (mixed by the gating network)."""
    space_rank: int = 1
    """Rank s of each subspace projection D -> s -> D (the defaults total m*D + m*r + r*D + 2*K*s*D + K*D parameters:
    9,232 on a 576-wide model, the budget of 16 prompt-tuning tokens)."""
    lowrank_lr: float | None = None
    """Learning rate of everything but the short prompt (A, B, projections, gate); default: the run's `lr`."""
    init: str = "text"
    """Initialisation of the short prompt: `random`, `sample_vocab` or `text`."""
    init_text: str | None = None
    """Text for `init=text` (default: blank space, the start closest to the zero-shot template; `.` where the
    tokenizer drops spaces)."""

    def __post_init__(self) -> None:
        for name in ("num_virtual_tokens", "rank", "num_spaces", "space_rank"):
            value = getattr(self, name)
            check_config(isinstance(value, int) and value > 0, "ept", name, "a positive integer", value)
        ok_lr = self.lowrank_lr is None or self.lowrank_lr > 0
        check_config(ok_lr, "ept", "lowrank_lr", "a positive number or null", self.lowrank_lr)
        check_config(self.init in STRATEGIES, "ept", "init", f"one of {STRATEGIES}", self.init)


@register_method("ept")
class EPT(SoftPromptMethod):
    config_cls = EPTConfig
    edits_only_soft_slots = True

    def __init__(self, config: EPTConfig, spec: BackboneSpec):
        super().__init__(config, spec)
        m, r, K, s, D = config.num_virtual_tokens, config.rank, config.num_spaces, config.space_rank, spec.input_size
        self.prompt = nn.Parameter(torch.zeros(m, D))  # (m, D) short prompt
        self.lora_a = nn.Parameter(torch.zeros(m, r))  # (m, r)
        self.lora_b = nn.Parameter(torch.zeros(r, D))  # (r, D); zero: no low-rank knowledge at start
        self.space_down = nn.Parameter(torch.zeros(K, D, s))  # (K, D, s) U_k
        self.space_up = nn.Parameter(torch.zeros(K, s, D))  # (K, s, D) V_k; zero: subspaces add nothing at start
        self.gate = nn.Parameter(torch.zeros(D, K))  # (D, K) W_g; zero: equal weights at start

    @property
    def num_soft_slots(self) -> int:
        return self.config.num_virtual_tokens

    def initialize(self, ctx: InitContext) -> None:
        vectors = init_vectors(self.config.init, self.num_soft_slots, self.spec, ctx, self.config.init_text)
        D = self.spec.input_size
        with torch.no_grad():
            self.prompt.copy_(vectors)
            # Drawn on the CPU generator, then copied: the same values on every device.
            self.lora_a.copy_(torch.randn(self.lora_a.shape, generator=ctx.generator) / math.sqrt(self.config.rank))
            self.lora_b.zero_()
            self.space_down.copy_(torch.randn(self.space_down.shape, generator=ctx.generator) / math.sqrt(D))
            self.space_up.zero_()
            self.gate.zero_()

    def fused(self) -> Tensor:
        """Prompt fusion: the short prompt enriched by the low-rank knowledge, (m, D)."""
        low = self.lora_a @ self.lora_b  # (m, D)
        attn = torch.softmax(self.prompt @ low.T / math.sqrt(self.spec.input_size), dim=-1)  # (m, m)
        return self.prompt + low + attn @ low  # (m, D)

    def gates(self, fused: Tensor) -> Tensor:
        """Per-token weights of the subspaces, (m, K); each row sums to 1."""
        return torch.softmax(fused @ self.gate, dim=-1)  # (m, K)

    def vectors(self) -> Tensor:
        """The prompt written into the soft slots, (m, D)."""
        fused = self.fused()  # (m, D)
        spaces = torch.einsum("md,kds,kse->kme", fused, self.space_down, self.space_up)  # (K, m, D)
        return fused + torch.einsum("mk,kme->me", self.gates(fused), spaces)  # (m, D)

    def apply(self, inputs: PromptInputs) -> PromptInputs:
        return inputs.replace(inputs_embeds=write_soft(inputs, self.vectors()))

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        rest = [self.lora_a, self.lora_b, self.space_down, self.space_up, self.gate]
        return [{"params": [self.prompt], "lr": lr}, {"params": rest, "lr": self.config.lowrank_lr or lr}]

    def peft_export(self) -> tuple[str, Tensor]:
        return "PROMPT_TUNING", self.vectors().detach()  # (m, D)
