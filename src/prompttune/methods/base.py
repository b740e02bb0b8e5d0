"""The soft-prompt contract: trainable parameters plus the one rule for injecting them.

A method never imports transformers and never names an architecture: it reads sizes from `BackboneSpec` and edits
`PromptInputs`. Everything in `parameters()` is trainable and is exactly what an artifact stores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import PromptTuneError
from ..types import BackboneSpec, PromptInputs


@dataclass
class InitContext:
    """What data-free initialisation may use."""

    tokenizer: Any
    generator: torch.Generator
    hint_text: str  # text to initialise from when the user gave none (e.g. the label words)
    prefix_kv: Callable[[list[int]], Tensor] | None = None  # ids -> frozen (layers, 2, kvh, L, hd); causal LMs only


class SoftPromptMethod(nn.Module):
    """Base class of every soft-prompt method."""

    name: ClassVar[str]
    config_cls: ClassVar[type]
    supports: ClassVar[frozenset[str]] = frozenset({"causal_lm", "encoder"})
    edits_only_soft_slots: ClassVar[bool] = False
    """True when `apply` changes nothing but the soft slots (and what follows them is computed from them), so the
    frozen text before the first soft slot may be encoded once and cached."""

    def __init__(self, config: Any, spec: BackboneSpec):
        super().__init__()
        if spec.kind not in self.supports:
            raise PromptTuneError(
                f"method {self.name!r} does not support {spec.kind} backbones "
                f"(supported: {', '.join(sorted(self.supports))})"
            )
        self.config = config
        self.spec = spec

    @property
    def num_soft_slots(self) -> int:
        """How many placeholder slots the template reserves for this method (0 for key/value prefixes)."""
        return 0

    def initialize(self, ctx: InitContext) -> None:
        """Data-free initialisation; called once before training (never on load)."""

    def apply(self, inputs: PromptInputs) -> PromptInputs:
        """Inject the prompt. Returns a new PromptInputs; never mutates `inputs`."""
        raise NotImplementedError

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer groups; methods with several learning rates (DePT) override this."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]

    def peft_export(self) -> tuple[str, Tensor] | None:
        """The prompt as a PEFT adapter tensor: (peft_type, `prompt_embeddings`), or None when PEFT has no equivalent.

        `PROMPT_TUNING` takes (N, D) input vectors; `PREFIX_TUNING` takes (P, layers * 2 * kvh * hd).
        """
        return None

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def write_soft(inputs: PromptInputs, prompt: Tensor) -> Tensor:
    """Place prompt vectors into the template's soft slots.

    Args:
        inputs: `inputs_embeds` (B, T, D) and `soft_positions` (B, P).
        prompt: (P, D) shared by all rows, or (B, P, D) per row.
    Returns:
        new `inputs_embeds` (B, T, D).
    """
    embeds, pos = inputs.inputs_embeds, inputs.soft_positions  # (B, T, D), (B, P)
    B, P = pos.shape
    if P == 0:
        return embeds
    prompt = prompt.to(embeds.dtype).expand(B, P, embeds.shape[-1])  # (B, P, D)
    return embeds.scatter(1, pos[:, :, None].expand(B, P, embeds.shape[-1]), prompt)


def check_config(ok: bool, method: str, field: str, expected: str, got: Any) -> None:
    if not ok:
        raise PromptTuneError(f"{method} config field {field!r}: expected {expected}, got {got!r}")
