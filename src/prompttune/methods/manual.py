"""The manual (zero-shot) prompt: the template alone, no trainable parameters. The baseline every learned prompt
must beat (e.g. Schick & Schütze, 2021, arXiv 2001.07676, use such hand-written patterns)."""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import register_method
from ..types import PromptInputs
from .base import SoftPromptMethod


@dataclass
class ManualConfig:
    """No options: `{soft}` markers in the template receive zero tokens."""


@register_method("manual")
class Manual(SoftPromptMethod):
    config_cls = ManualConfig
    edits_only_soft_slots = True

    def apply(self, inputs: PromptInputs) -> PromptInputs:
        return inputs
