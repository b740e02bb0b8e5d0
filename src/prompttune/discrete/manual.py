"""Hand-written prompts, no search: score the given texts (and the empty prompt) and keep the best on dev.

The baseline row "manual prompt" (the template alone) and fixed prompt families such as the "positive thinking"
phrases of "The Unreasonable Effectiveness of Eccentric Automatic Prompts" (arXiv 2402.10949, see `opro.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..registry import register_optimizer
from .base import Candidate, DiscreteOptimizer, SearchContext


@dataclass
class ManualConfig:
    """Fixed prompts."""

    prompts: list[str] = field(default_factory=list)
    """Texts for `{prompt}` (the empty prompt is always scored too)."""
    separator: str = "\n"
    """Appended to each non-empty prompt, so it does not run into the template text that follows."""


@register_optimizer("manual")
class Manual(DiscreteOptimizer):
    config_cls = ManualConfig

    def __init__(self, config: ManualConfig, ctx: SearchContext):
        super().__init__(config, ctx)
        self.asked = False

    def ask(self) -> list[Candidate]:
        self.asked = True
        return [Candidate(p + self.config.separator) for p in dict.fromkeys(self.config.prompts) if p]

    @property
    def done(self) -> bool:
        return self.asked

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "asked": self.asked}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.asked = state["asked"]
