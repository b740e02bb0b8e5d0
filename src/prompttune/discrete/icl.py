"""In-context demonstrations as the prompt: choose k labelled training examples to show before the input.

The baseline of GPT-3 (Brown et al., 2020, "Language Models are Few-Shot Learners", arXiv 2005.14165) that RLPrompt
reports as "in-context demos". Three ways to choose:

- `random`: each step tries `per_step` random k-subsets (random order); the loop keeps the best on dev.
- `per_class`: the same, with k // C demonstrations of every class (balanced sets).
- `similarity`: per input, the k training examples most similar to it, most similar last (nearest to the input), as in
  KATE (Liu et al., 2022, "What Makes Good In-Context Examples for GPT-3?", arXiv 2101.06804). KATE ranks by a
  sentence encoder; here TF-IDF cosine similarity stands in, so black-box backends need no second model. One
  candidate, no search; prediction retrieves from the training pool saved in the artifact.

A demonstration is the template rendered for the example with `{prompt}` empty, followed by its first label word.
Candidates are scored on the training set, which contains the demonstrations themselves; the bias is the same for
every candidate of a given k, and the final choice is made on dev.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import PromptTuneError
from ..llm.base import LLMBackend
from ..registry import register_optimizer
from ..types import Example
from .base import Candidate, DiscreteOptimizer, SearchContext, example_key

RETRIEVED = "{retrieved demonstrations}"  # the `demos` of the similarity candidate, filled per input


@dataclass
class ICLConfig:
    """How many demonstrations and how they are chosen."""

    k: int = 4
    """Demonstrations per prompt."""
    selection: str = "per_class"
    """`random`, `per_class` (balanced) or `similarity` (per input, TF-IDF nearest neighbours)."""
    per_step: int = 4
    """random / per_class: demonstration sets tried per step."""
    separator: str = "\n\n"
    """Between demonstrations, and between the last one and the input."""

    def __post_init__(self) -> None:
        if self.k < 1 or self.per_step < 1:
            raise PromptTuneError("config fields 'k' and 'per_step': expected positive integers")
        if self.selection not in ("random", "per_class", "similarity"):
            raise PromptTuneError(
                f"config field 'selection': expected random, per_class or similarity, got {self.selection!r}"
            )


@register_optimizer("icl")
class ICL(DiscreteOptimizer):
    config_cls = ICLConfig

    def __init__(self, config: ICLConfig, ctx: SearchContext):
        super().__init__(config, ctx)
        self.pool = [ex for ex in ctx.train if ex.label is not None]
        if len(self.pool) < config.k:
            raise PromptTuneError(f"icl: k={config.k} demonstrations but only {len(self.pool)} labelled examples")
        self.steps = 0
        self._retriever = None
        if config.selection == "similarity":
            self._retriever = Retriever(
                [_text(ex) for ex in self.pool], [ctx.demonstration(ex) for ex in self.pool], config.k, config.separator
            )

    def ask(self) -> list[Candidate]:
        self.steps += 1
        if self.config.selection == "similarity":
            return [Candidate("", RETRIEVED)]
        return [self._sample() for _ in range(self.config.per_step)]

    def _sample(self) -> Candidate:
        k = self.config.k
        if self.config.selection == "random":
            chosen = self.rng.sample(self.pool, k)
        else:
            by_class: dict[str, list[Example]] = {}
            for ex in self.pool:
                by_class.setdefault(str(ex.label), []).append(ex)
            share = max(1, k // len(by_class))
            chosen = [
                ex
                for label in sorted(by_class)
                for ex in self.rng.sample(by_class[label], min(share, len(by_class[label])))
            ]
            self.rng.shuffle(chosen)
        sep = self.config.separator
        return Candidate("", sep.join(self.ctx.demonstration(ex) for ex in chosen) + sep)

    @property
    def done(self) -> bool:
        return self.config.selection == "similarity" and self.steps >= 1

    def specialize(self, candidate: Candidate, examples: Sequence[Example]) -> Candidate:
        if self._retriever is None or candidate.demos != RETRIEVED:  # e.g. the manual prompt
            return candidate
        return self._retriever(candidate, examples)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.steps = state["steps"]

    def export(self, best: Candidate) -> dict[str, Any]:
        if self._retriever is None:
            return {}
        r = self._retriever
        return {"texts": r.texts, "demos": r.demos, "k": r.k, "separator": r.separator}

    @classmethod
    def specializer(
        cls, extra: dict[str, Any], backend: LLMBackend, artifact_dir: str
    ) -> Callable[[Candidate, Sequence[Example]], Candidate] | None:
        if not extra.get("texts"):
            return None
        return Retriever(extra["texts"], extra["demos"], int(extra["k"]), extra["separator"])


class Retriever:
    """Per-input demonstrations: the k pool examples with the highest TF-IDF cosine similarity to the input."""

    def __init__(self, texts: list[str], demos: list[str], k: int, separator: str):
        self.texts, self.demos, self.k, self.separator = list(texts), list(demos), k, separator
        docs = [Counter(_words(t)) for t in self.texts]
        df = Counter(w for d in docs for w in d)
        n = len(docs)
        self.idf = {w: math.log((1 + n) / (1 + c)) + 1 for w, c in df.items()}
        self.vectors = [self._vector(d) for d in docs]

    def _vector(self, counts: Counter) -> dict[str, float]:
        vec = {w: c * self.idf.get(w, 0.0) for w, c in counts.items()}
        norm = math.sqrt(sum(v * v for v in vec.values())) or 1.0
        return {w: v / norm for w, v in vec.items()}

    def nearest(self, text: str) -> list[int]:
        """Pool indices, most similar last; the input itself (an identical text) is never its own demonstration."""
        q = self._vector(Counter(_words(text)))
        sims = [(sum(q.get(w, 0.0) * v for w, v in vec.items()), i) for i, vec in enumerate(self.vectors)]
        ranked = sorted((s for s in sims if self.texts[s[1]] != text), key=lambda s: (-s[0], s[1]))[: self.k]
        return [i for _, i in reversed(ranked)]

    def __call__(self, candidate: Candidate, examples: Sequence[Example]) -> Candidate:
        if candidate.demos != RETRIEVED:
            return candidate
        demos = {}
        for ex in examples:
            chosen = self.nearest(_text(ex))
            demos[example_key(ex)] = self.separator.join(self.demos[i] for i in chosen) + self.separator
        return candidate.specialized(demos=demos)


def _text(example: Example) -> str:
    return " ".join(example.fields[k] for k in sorted(example.fields))


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())
