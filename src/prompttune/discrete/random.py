"""Random search: the baseline every discrete optimiser must beat.

Each step draws `per_step` prompts of `num_tokens` pieces, uniformly from the task model's vocabulary (`source:
vocab`; black-box backends offer the words of the training texts instead) or from the words of the training texts
(`source: words`). RLPrompt (Deng et al., 2022, arXiv 2205.12548) reports such random token prompts as a baseline;
with best-on-dev selection they are a surprisingly strong one on small models.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import PromptTuneError
from ..registry import register_optimizer
from .base import Candidate, DiscreteOptimizer, SearchContext


@dataclass
class RandomConfig:
    """Random prompts of a fixed length."""

    num_tokens: int = 5
    """Pieces per prompt (tokens of the task model, or words)."""
    per_step: int = 4
    """Prompts drawn per step."""
    source: str = "vocab"
    """`vocab`: the task model's token vocabulary; `words`: words of the training texts."""
    separator: str = "\n"
    """Appended after the sampled pieces, so the prompt does not run into the template text that follows."""

    def __post_init__(self) -> None:
        if self.num_tokens < 1 or self.per_step < 1:
            raise PromptTuneError("config fields 'num_tokens' and 'per_step': expected positive integers")
        if self.source not in ("vocab", "words"):
            raise PromptTuneError(f"config field 'source': expected vocab or words, got {self.source!r}")


@register_optimizer("random")
class RandomSearch(DiscreteOptimizer):
    config_cls = RandomConfig

    def __init__(self, config: RandomConfig, ctx: SearchContext):
        super().__init__(config, ctx)
        if config.source == "words":
            pool = {" " + w: None for ex in ctx.train for v in ex.fields.values() for w in v.split()}
            self.pool = list(pool)
        else:
            self.pool = list(ctx.vocabulary)
        if not self.pool:
            raise PromptTuneError("random search: nothing to sample (empty vocabulary and training texts)")

    def ask(self) -> list[Candidate]:
        k = self.config.num_tokens
        return [
            Candidate("".join(self.rng.choice(self.pool) for _ in range(k)) + self.config.separator)
            for _ in range(self.config.per_step)
        ]
