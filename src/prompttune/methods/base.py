"""The soft-prompt contract: trainable parameters plus the one rule for injecting them.

A method never imports transformers and never names an architecture: it reads sizes from `BackboneSpec` and edits
`PromptInputs`. Everything in `parameters()` is trainable and is exactly what an artifact stores.

Methods that act inside the network (deep prompts, IAPT) use the per-layer seam: `apply` returns inputs carrying
`layer_hook=self.layer_hook`, and the backbone calls it at the input of every transformer layer, for that one call
only. Layer 0's input is the embeddings plus whatever the model adds to them (learned positions, a norm), so methods
usually write their layer-0 vectors into `inputs_embeds` in `apply`, like prompt tuning, and use the hook for layers
1 and up. A hook that changes only the soft slots keeps `edits_only_soft_slots` true: in a causal LM nothing before
the first slot can see them, so the frozen prefix cache stays exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..data.templates import Template
from ..errors import PromptTuneError
from ..types import BackboneSpec, Example, PromptInputs


@dataclass
class InitContext:
    """What initialisation may use: the tokenizer, a generator seeded by the run and, for data-dependent methods
    (BayesPrompt), the training examples and their frozen representations."""

    tokenizer: Any
    generator: torch.Generator
    hint_text: str  # text to initialise from when the user gave none (e.g. the label words)
    prefix_kv: Callable[[list[int]], Tensor] | None = None  # ids -> frozen (layers, 2, kvh, L, hd); causal LMs only
    train_examples: Sequence[Example] = ()  # the training split, labels included; empty where none was given
    represent: Callable[[Sequence[Example], str], Tensor] | None = None
    """`represent(examples, layer)` -> (N, D) float32 CPU features of the examples as the template frames them, through
    the frozen backbone: the mean over their non-special tokens of the input embeddings (`layer="embedding"`) or of
    the final hidden states (`layer="final"`)."""


class SoftPromptMethod(nn.Module):
    """Base class of every soft-prompt method."""

    name: ClassVar[str]
    config_cls: ClassVar[type]
    supports: ClassVar[frozenset[str]] = frozenset({"causal_lm", "encoder"})
    edits_only_soft_slots: ClassVar[bool] = False
    """True when `apply` changes nothing but the soft slots (and what follows them is computed from them), so the
    frozen text before the first soft slot may be encoded once and cached."""
    uses_layer_hook: ClassVar[bool] = False
    """True when `apply` attaches `layer_hook` (the per-layer seam) to the inputs it returns."""

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
        """Initialisation from `ctx`; called once before training (never on load)."""

    def apply(self, inputs: PromptInputs) -> PromptInputs:
        """Inject the prompt. Returns a new PromptInputs; never mutates `inputs`."""
        raise NotImplementedError

    def layer_hook(self, layer: int, hidden: Tensor, inputs: PromptInputs) -> Tensor:
        """Rewrite the hidden states at the input of transformer layer `layer` (the per-layer seam).

        Called by the backbone once per layer per forward, only for inputs whose `layer_hook` `apply` set.

        Args:
            layer: 0 .. num_layers - 1.
            hidden: (B, T, D), the same columns as `inputs.inputs_embeds` (a cached prefix is not included).
            inputs: the PromptInputs `apply` returned (soft_positions, token_index, masks, `decoding`).
        Returns:
            (B, T, D): new hidden states, or `hidden` itself; never edit it in place.
        """
        return hidden

    def check_template(self, template: Template) -> None:
        """Refuse, with a PromptTuneError naming the template, a layout this method cannot serve (default: any)."""

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
    return write_slots(inputs.inputs_embeds, inputs.soft_positions, prompt)


def write_slots(hidden: Tensor, positions: Tensor, prompt: Tensor) -> Tensor:
    """Replace the vectors at the soft slots of any (B, T, D) states (embeddings or a layer's input).

    Args:
        hidden: (B, T, D).
        positions: (B, P) column of each slot.
        prompt: (P, D) shared by all rows, or (B, P, D) per row.
    Returns:
        new states (B, T, D); `hidden` is not modified.
    """
    B, P = positions.shape
    if P == 0:
        return hidden
    prompt = prompt.to(hidden.dtype).expand(B, P, hidden.shape[-1])  # (B, P, D)
    return hidden.scatter(1, positions[:, :, None].expand(B, P, hidden.shape[-1]), prompt)


def check_config(ok: bool, method: str, field: str, expected: str, got: Any) -> None:
    if not ok:
        raise PromptTuneError(f"{method} config field {field!r}: expected {expected}, got {got!r}")
