"""PromptQuine ("Evolving Prompts In-Context: An Open-ended, Self-replicating Perspective", Wang et al., ICML 2025):
evolve in-context demonstrations into compact, often ungrammatical prompts by deleting tokens.

The paper's finding: pruning tokens of a few-shot prompt ("partial context hypothesis") can beat the full prompt and
instruction-optimised prompts, and a simple evolutionary search finds such prunings. Its search, as done here:

- genome: a keep/delete mask over the tokens of a seed prompt (k demonstrations per class, or an instruction given
  as `seed_text`); the phenotype is the kept tokens joined back into text;
- mutation: delete 1..`max_deletions` randomly chosen kept tokens (self-replication with variation; no crossover);
- selection: tournaments pick the parents of each generation's `offspring`; the population is the best
  `population` genomes of parents and children together (elitist), ranked by training accuracy with the
  class-normalised gold log-likelihood as tie-breaker; the loop re-ranks the best on dev at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import PromptTuneError
from ..registry import register_optimizer
from .base import Candidate, DiscreteOptimizer, Scored, SearchContext


@dataclass
class PromptQuineConfig:
    """Genetic search over token deletions of a seed prompt."""

    shots_per_class: int = 1
    """Demonstrations per class in the seed prompt (ignored when `seed_text` is given)."""
    seed_text: str = ""
    """Prune this instruction (it fills `{prompt}`) instead of in-context demonstrations."""
    population: int = 8
    """Genomes kept after each generation."""
    offspring: int = 4
    """Children scored per generation (one step)."""
    tournament: int = 3
    """Tournament size for choosing each parent."""
    max_deletions: int = 3
    """A mutation deletes 1..max_deletions kept tokens."""
    min_tokens: int = 1
    """Never prune below this many tokens."""
    separator: str = "\n\n"
    """Between demonstrations and before the input (kept out of the pruned tokens)."""

    def __post_init__(self) -> None:
        for name in ("shots_per_class", "population", "offspring", "tournament", "max_deletions", "min_tokens"):
            if getattr(self, name) < 1:
                raise PromptTuneError(
                    f"config field {name!r}: expected a positive integer, got {getattr(self, name)!r}"
                )


@register_optimizer("promptquine")
class PromptQuine(DiscreteOptimizer):
    config_cls = PromptQuineConfig

    def __init__(self, config: PromptQuineConfig, ctx: SearchContext):
        super().__init__(config, ctx)
        self.pieces = ctx.pieces(config.seed_text) if config.seed_text else ctx.pieces(self._seed_demos())
        if len(self.pieces) <= config.min_tokens:
            raise PromptTuneError(f"promptquine: the seed prompt has {len(self.pieces)} tokens; nothing to prune")
        self.members: list[dict[str, Any]] = []  # {"mask": "1101..", "score": float, "loglik": float}
        self.pending: list[str] = []  # masks of the last ask()

    def _seed_demos(self) -> str:
        # A fixed random pick of `shots_per_class` demonstrations per class (the loop's seed decides it).
        chosen = []
        for label in self.ctx.labels:
            of_class = [ex for ex in self.ctx.train if str(ex.label) == label]
            chosen += self.rng.sample(of_class, min(self.config.shots_per_class, len(of_class)))
        self.rng.shuffle(chosen)
        return self.config.separator.join(self.ctx.demonstration(ex) for ex in chosen)

    # ---- genome <-> candidate ---------------------------------------------------------------------------------------
    def candidate(self, mask: str) -> Candidate:
        text = "".join(p for p, keep in zip(self.pieces, mask, strict=True) if keep == "1")
        if self.config.seed_text:
            return Candidate(text)
        return Candidate("", text + self.config.separator)

    def mutate(self, mask: str) -> str:
        kept = [i for i, keep in enumerate(mask) if keep == "1"]
        room = len(kept) - self.config.min_tokens
        if room <= 0:
            return mask
        n = self.rng.randint(1, min(self.config.max_deletions, room))
        out = list(mask)
        for i in self.rng.sample(kept, n):
            out[i] = "0"
        return "".join(out)

    def _parent(self) -> str:
        picks = [self.rng.randrange(len(self.members)) for _ in range(self.config.tournament)]
        best = min(picks)  # members are sorted best first
        return self.members[best]["mask"]

    # ---- search -----------------------------------------------------------------------------------------------------
    def ask(self) -> list[Candidate]:
        full = "1" * len(self.pieces)
        if not self.members:  # generation 0: the seed prompt and mutants of it
            masks = [full] + [self.mutate(full) for _ in range(self.config.population - 1)]
        else:
            masks = [self.mutate(self._parent()) for _ in range(self.config.offspring)]
        known = {m["mask"] for m in self.members}
        self.pending = list(dict.fromkeys(m for m in masks if m not in known))  # unique, unseen genomes
        if not self.pending:  # every child was already in the population: mutate harder next time
            self.pending = [self.mutate(self.mutate(self._parent() if self.members else full))]
        return [self.candidate(m) for m in self.pending]

    def tell(self, scored: list[Scored]) -> None:
        for mask, s in zip(self.pending, scored, strict=False):
            self.members.append({"mask": mask, "score": s.score, "loglik": s.loglik})
        # Elitist survival; ties prefer shorter prompts (the paper's pressure towards compact prompts), then age.
        order = sorted(
            range(len(self.members)),
            key=lambda i: (
                -self.members[i]["score"],
                -self.members[i]["loglik"],
                self.members[i]["mask"].count("1"),
                i,
            ),
        )
        self.members = [self.members[i] for i in order[: self.config.population]]
        self.pending = []

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "members": self.members, "pending": self.pending, "pieces": self.pieces}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.members, self.pending, self.pieces = state["members"], state["pending"], state["pieces"]
