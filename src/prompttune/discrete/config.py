"""The search loop's settings (`SearchConfig`, the `search:` section of a search YAML) and its result."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import PromptTuneError
from .base import Candidate


@dataclass
class SearchConfig:
    """The search loop's settings (every discrete optimiser uses the same loop)."""

    optimizer: str = "random"
    """Registered discrete optimiser (see `prompttune search --help`)."""
    optimizer_config: dict[str, Any] = field(default_factory=dict)
    """Fields of the optimiser's own config dataclass."""
    budget: int = 1000
    """Most LLM calls in total (one prompt scored or one text generated = one call), dev selection included
    (0 = unlimited; then `max_steps` must stop the search)."""
    max_tokens: int = 0
    """Most tokens (prompt + generated) in total, 0 = unlimited."""
    max_steps: int = 0
    """Most optimiser steps, 0 = until the budget is spent or the optimiser is done."""
    seed: int = 13
    """Seed of every random choice; the same seed gives the same result with the local backends."""
    proposer_model: str | None = None
    """A second model, on the same backend, that writes proposals (OPRO); default: the task model."""
    max_idle_steps: int = 20
    """Stop a population optimiser (ask/tell) after this many steps in a row without an LLM call (it only
    re-proposed scored candidates)."""
    select_top: int = 4
    """How many of the best candidates (by training score) are re-scored on dev; the manual prompt always is."""
    p1: int = 0
    """p1 ("p1: Better Prompt Optimization with Fewer Prompts"): optimise on only this many training examples,
    those whose reward varies most across probe prompts (0 = off: use every training example)."""
    p1_probes: int = 8
    """p1: probe prompts used to measure each example's reward variance."""
    checkpoint: bool = True
    """Write a resumable checkpoint after every step."""

    def __post_init__(self) -> None:
        for name in ("budget", "max_tokens", "max_steps", "select_top", "p1"):
            if getattr(self, name) < 0:
                raise PromptTuneError(
                    f"config field {name!r}: expected a non-negative integer, got {getattr(self, name)!r}"
                )
        if self.max_idle_steps < 1:
            raise PromptTuneError(
                f"config field 'max_idle_steps': expected a positive integer, got {self.max_idle_steps}"
            )
        if self.p1_probes < 2:
            raise PromptTuneError(f"config field 'p1_probes': expected at least 2, got {self.p1_probes!r}")
        if not self.budget and not self.max_steps:
            raise PromptTuneError("config fields 'budget' and 'max_steps' are both 0: the search would never stop")


@dataclass
class SearchResult:
    best: Candidate
    dev: dict[str, Any] | None
    test: dict[str, Any] | None
    train: dict[str, Any]
    steps: int
    calls: int  # LLM calls during the search and dev selection (the budgeted ones)
    tokens: int
    seconds: float
    stopped: str  # "budget", "max_steps", "done" or "stalled"
    candidates: list[dict[str, Any]] = field(default_factory=list)  # dev-scored finalists, best first
    out: str | None = None

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out["best"] = self.best.to_dict()
        return out
