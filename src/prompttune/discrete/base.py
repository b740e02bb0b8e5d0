"""The discrete-prompt contract: what an optimiser searches (`Candidate`), what it gets back (`Scored`), who scores
(`Objective`), and the optimiser interface (`DiscreteOptimizer`) that `loop.search` drives.

CONTRACT READY

An optimiser is one small file: a config dataclass (attribute docstrings: they become CLI/YAML/Python options) and a
`DiscreteOptimizer` subclass registered with `@register_optimizer("name")`. Two styles fit:

- population search (random, PromptQuine, OPRO): implement `ask()` (candidates to score next) and `tell(scored)`;
  the base `step()` scores `ask()` on the objective's examples and calls `tell`.
- learning search (RLPrompt, policy gradients, directional stimulus): override `step(objective)`; score whatever
  candidates on whatever examples (e.g. a sampled minibatch) and return the `Scored` results worth keeping as
  candidates for the final selection on dev.

Scoring a candidate twice is free (cached), so a population optimiser that only re-proposes known candidates is
stopped after `SearchConfig.max_idle_steps` call-free steps; a learning optimiser must end through the budget,
`max_steps` or `done`.

Per-example prompt parts (directional-stimulus hints, retrieved demonstrations) come from `specialize(candidate,
examples)`, which the objective calls before every scoring; `specializer` rebuilds it from a saved artifact.

The loop owns everything else: the budget (every LLM call is charged by the backend; `BudgetExhausted` ends the
search and keeps what was scored), the JSONL log, the JSON checkpoint after every step (`state_dict()` must be
JSON-able: lists, dicts, numbers, strings; large tensors go through `tensors()` into safetensors; never pickle),
resume, best-on-dev selection and the artifact.
Optimisers must draw randomness only from generators they seed from `ctx.seed` and save in `state_dict()`, so a
resumed search equals an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from ..data.templates import Template
from ..llm.base import Budget, LLMBackend
from ..types import Example


def example_key(example: Example) -> str:
    """A stable id of an example's content (independent of file, order and process)."""
    blob = json.dumps(example.fields, sort_keys=True, ensure_ascii=False)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Candidate:
    """A discrete prompt. What the LLM reads for an example is `context + template(example, prompt)` where

    - `text` fills the template's `{prompt}`;
    - `demos` (in-context demonstrations, shared by every example) is put before the whole rendered template;
    - `hints` are per-example texts keyed by `example_key` (instance-specific hints): a `{hint}` inside `text` is
      replaced by the example's hint, or the hint is appended to `text` when there is no `{hint}`;
    - `example_demos` are per-example demonstrations (retrieved for that input), used instead of `demos`.

    Per-example parts are filled by `DiscreteOptimizer.specialize` just before scoring; candidates kept in the
    search history and in `prompt.json` carry only the shared parts.
    """

    text: str
    demos: str = ""
    hints: tuple[tuple[str, str], ...] = ()  # sorted (example key, hint) pairs: hashable and order-free
    example_demos: tuple[tuple[str, str], ...] = ()  # sorted (example key, demonstrations)

    def specialized(self, hints: dict[str, str] | None = None, demos: dict[str, str] | None = None) -> Candidate:
        """A copy with per-example hints and/or demonstrations."""
        return replace(
            self,
            hints=tuple(sorted((hints or {}).items())) or self.hints,
            example_demos=tuple(sorted((demos or {}).items())) or self.example_demos,
        )

    def shared(self) -> Candidate:
        """The candidate without per-example parts."""
        return Candidate(self.text, self.demos)

    def render(self, key: str) -> str:
        """The text that fills `{prompt}` for the example with `example_key` == key."""
        hint = dict(self.hints).get(key, "") if self.hints else ""
        if "{hint}" in self.text:
            return self.text.replace("{hint}", hint)
        return self.text + hint

    def context(self, key: str) -> str:
        """What goes before the rendered template for that example (demonstrations)."""
        if self.example_demos:
            return dict(self.example_demos).get(key, self.demos)
        return self.demos

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"text": self.text}
        if self.demos:
            out["demos"] = self.demos
        if self.hints:
            out["hints"] = dict(self.hints)
        if self.example_demos:
            out["example_demos"] = dict(self.example_demos)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Candidate:
        base = cls(raw["text"], raw.get("demos", ""))
        return base.specialized(raw.get("hints"), raw.get("example_demos"))


@dataclass
class Scored:
    """A candidate with its scores on a set of examples.

    Attributes:
        score: the task's primary metric (accuracy for single-label classification) on those examples.
        loglik: mean over examples of log p(gold class) after normalising over the classes; a smooth tie-breaker
            (accuracy on 16-32 examples ties often) and the natural reward.
        logprobs: (N, C) class log-probabilities as the verbalizer defines them (log of the mean probability of the
            class's label words under the full vocabulary), rows in `keys` order; RL rewards are computed from it.
        gold: (N,) gold class indices.
        keys: `example_key` of each row.
        metrics: every metric the evaluator returns (`primary_metric` included).
    """

    candidate: Candidate
    score: float
    loglik: float
    logprobs: Tensor
    gold: Tensor
    keys: tuple[str, ...]
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> tuple[float, float]:
        """Sort key: higher is better."""
        return (self.score, self.loglik)

    def to_dict(self, with_logprobs: bool = False) -> dict[str, Any]:
        out = {
            "candidate": self.candidate.to_dict(),
            "score": self.score,
            "loglik": self.loglik,
            "metrics": self.metrics,
            "n": len(self.keys),
        }
        if with_logprobs:
            out.update(logprobs=self.logprobs.tolist(), gold=self.gold.tolist(), keys=list(self.keys))
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Scored:
        logprobs = torch.tensor(raw.get("logprobs", []), dtype=torch.float32)
        gold = torch.tensor(raw.get("gold", []), dtype=torch.long)
        keys = tuple(raw.get("keys", ()))
        return cls(
            Candidate.from_dict(raw["candidate"]),
            raw["score"],
            raw["loglik"],
            logprobs,
            gold,
            keys,
            raw.get("metrics", {}),
        )


class Objective(Protocol):
    """Scores candidates on examples through an LLM backend (batched; each (prompt text) is scored once).

    `examples` is the default set (the training examples, or the `p1` subset); `budget` is shared with the backend
    and with any proposer LLM, and counts every call.
    """

    examples: list[Example]
    labels: list[str]
    budget: Budget

    def score(self, candidates: Sequence[Candidate], examples: Sequence[Example] | None = None) -> list[Scored]:
        """Score each candidate on `examples` (default: `self.examples`).

        Raises:
            BudgetExhausted: with `partial` holding the candidates fully scored before the budget ran out.
        """
        ...


@dataclass
class SearchContext:
    """Everything an optimiser may read. It must not score through `backend` directly (use the objective, which
    caches and keeps the metric consistent); it may `generate` with `proposer` (OPRO) and `backend`.

    Attributes:
        train: training examples (labelled); optimisers may also use them as demonstrations.
        dev: dev examples, used by the loop only for the final selection (optimisers should not peek).
        labels: ordered class labels; `Scored.logprobs` columns follow this order.
        words: label -> verbalizer words.
        template: the task template (with `{prompt}`); `template.render_text(example, prompt)` is what the LLM reads.
        backend: the task LLM.
        proposer: the LLM that writes new prompts (OPRO); the task LLM unless another was configured.
        seed: the search seed.
        vocabulary: strings token-level optimisers sample from (tokenizer pieces, or words of the training texts).
    """

    train: list[Example]
    dev: list[Example]
    labels: list[str]
    words: dict[str, list[str]]
    template: Template
    backend: LLMBackend
    proposer: LLMBackend
    seed: int
    vocabulary: list[str]

    def pieces(self, text: str) -> list[str]:
        """`text` as the task model's tokens (or words for black-box backends); "".join gives `text` back."""
        return self.backend.pieces(text)

    def label_of(self, example: Example) -> int:
        return self.labels.index(str(example.label))

    def demonstration(self, example: Example, label: str | None = None) -> str:
        """`example` rendered with the template and its label word: one in-context demonstration."""
        label = str(example.label) if label is None else label
        return self.template.render_text(example, "") + self.words[label][0]


class DiscreteOptimizer:
    """Base class of every discrete optimiser (see the module docstring)."""

    name: ClassVar[str]
    config_cls: ClassVar[type]

    def __init__(self, config: Any, ctx: SearchContext):
        self.config = config
        self.ctx = ctx
        self.rng = random.Random(ctx.seed)

    def ask(self) -> list[Candidate]:
        """Candidates to score next on the objective's examples."""
        raise NotImplementedError

    def tell(self, scored: list[Scored]) -> None:
        """Receive the scores of the last `ask()` (same order)."""

    def step(self, objective: Objective) -> list[Scored]:
        """One step; returns the scored candidates the loop should consider for the final selection."""
        scored = objective.score(self.ask())
        self.tell(scored)
        return scored

    @property
    def calls_per_example(self) -> int:
        """LLM calls needed to score one candidate on one example (2 when a reasoning is generated first); the loop
        holds back `select_top + 1` candidates x dev examples x this for the final selection."""
        return 1

    @property
    def done(self) -> bool:
        """True when the optimiser has nothing left to try (the loop also stops at the budget or `max_steps`)."""
        return False

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state; the base saves the `random.Random` state. Subclasses extend the dict."""
        return {"rng": rng_state(self.rng)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(self.rng, state["rng"])

    def tensors(self) -> dict[str, Tensor]:
        """Large state (policy weights, Adam moments) that the checkpoint keeps in a safetensors file next to the
        JSON (same step); `load_tensors` receives it back on resume."""
        return {}

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Restore what `tensors()` returned."""

    def export(self, best: Candidate) -> dict[str, Any]:
        """Extra JSON-able data the artifact's `prompt.json` keeps under `extra` (e.g. pseudo-labelled demos)."""
        return {}

    def export_tensors(self, best: Candidate) -> dict[str, Tensor]:
        """Tensors the artifact keeps as `optimizer.safetensors` (e.g. a hint policy needed at prediction time)."""
        return {}

    def specialize(self, candidate: Candidate, examples: Sequence[Example]) -> Candidate:
        """Fill per-example parts of `candidate` (hints, retrieved demonstrations) for these examples, just before
        they are scored (training, dev selection, test). Default: the candidate has none."""
        return candidate

    @classmethod
    def specializer(
        cls, extra: dict[str, Any], backend: LLMBackend, artifact_dir: str
    ) -> Callable[[Candidate, Sequence[Example]], Candidate] | None:
        """`specialize` for a saved artifact (prediction on new inputs), built from what `export` and
        `export_tensors` saved; None when the prompt has no per-example parts."""
        return None


def rng_state(rng: random.Random) -> list[Any]:
    """`random.Random` state as JSON (a nested tuple of ints)."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_rng_state(rng: random.Random, state: list[Any]) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))


def torch_rng_state(gen: torch.Generator) -> list[int]:
    """A torch.Generator's state as a JSON list of byte values."""
    return gen.get_state().tolist()


def set_torch_rng_state(gen: torch.Generator, state: list[int]) -> None:
    gen.set_state(torch.tensor(state, dtype=torch.uint8))
