"""OPRO-style instruction search: an LLM proposes new instructions from the scored history.

OPRO (Yang et al., 2023, "Large Language Models as Optimizers", arXiv 2309.03409): a meta-prompt lists the best
instructions so far with their scores (ascending, so the best sits nearest to the request) and a few task examples,
and asks for a new, better instruction; each step samples `per_step` proposals at temperature `temperature`.
"The Unreasonable Effectiveness of Eccentric Automatic Prompts" (Battle & Gollapudi, 2024, arXiv 2402.10949)
compares such optimised prompts with hand-written "positive thinking" phrases, with and without chain-of-thought;
`POSITIVE_THINKING` holds phrases in that style, used as the initial history (and as fixed baselines by the
benchmark through the `manual` optimiser).

Chain-of-thought (`cot: true`): the instruction is followed by `cot_trigger`; for every input the task model first
writes a short reasoning (a generation call, cached per prompt text), which is placed after the instruction, and the
label words are then scored after that reasoning. Without it, the instruction is followed directly by the answer cue.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import PromptTuneError
from ..llm.base import LLMBackend
from ..registry import register_optimizer
from ..types import Example
from .base import Candidate, DiscreteOptimizer, Scored, SearchContext, example_key

POSITIVE_THINKING = (
    "You are highly intelligent.",
    "You are as smart as ChatGPT.",
    "This will be fun!",
    "Take a deep breath and think carefully.",
    "I really need your help!",
    "I know you can do it!",
)


@dataclass
class OPROConfig:
    """Meta-prompt search for an instruction."""

    per_step: int = 4
    """Instructions proposed (and scored) per step."""
    history: int = 8
    """Best scored instructions shown in the meta-prompt."""
    examples: int = 3
    """Task examples (input and answer) shown in the meta-prompt."""
    temperature: float = 1.0
    """Sampling temperature of the proposer."""
    max_new_tokens: int = 48
    """Longest proposal, in tokens."""
    chat: bool = True
    """Send the meta-prompt as a chat message (instruct models) rather than as raw text."""
    init: list[str] = field(default_factory=lambda: list(POSITIVE_THINKING))
    """Instructions scored first, seeding the history."""
    cot: bool = False
    """Chain-of-thought: the task model writes a reasoning before the label is scored."""
    cot_trigger: str = "Let's think step by step."
    """Appended to the instruction when `cot` is on."""
    cot_tokens: int = 32
    """Longest reasoning, in tokens."""

    def __post_init__(self) -> None:
        for name in ("per_step", "history", "max_new_tokens", "cot_tokens"):
            if getattr(self, name) < 1:
                raise PromptTuneError(
                    f"config field {name!r}: expected a positive integer, got {getattr(self, name)!r}"
                )
        if self.temperature < 0:
            raise PromptTuneError(f"config field 'temperature': expected >= 0, got {self.temperature!r}")


_MARK = "\x00"  # stands for `{prompt}` while cutting a rendered template
_BRACKETS = re.compile(r"\[([^\[\]]{3,400})\]")


@register_optimizer("opro")
class OPRO(DiscreteOptimizer):
    config_cls = OPROConfig

    def __init__(self, config: OPROConfig, ctx: SearchContext):
        super().__init__(config, ctx)
        self.scored: list[dict[str, Any]] = []  # {"instruction", "score"} in the order scored
        self.pending: list[str] = []
        self.calls = 0  # proposer calls so far: each gets its own seed
        self.reasoning: dict[str, str] = {}  # cot: sha1(reasoning prompt) -> reasoning (part of the state)

    # ---- instruction <-> candidate ----------------------------------------------------------------------------------
    def candidate(self, instruction: str) -> Candidate:
        if not instruction:
            return Candidate("")
        if self.config.cot:
            return Candidate(f"{instruction} {self.config.cot_trigger}\n{{hint}}\n")
        return Candidate(instruction + "\n")

    def instruction(self, candidate: Candidate) -> str:
        return candidate.text.split(f" {self.config.cot_trigger}")[0].rstrip("\n") if candidate.text else ""

    # ---- search -----------------------------------------------------------------------------------------------------
    def ask(self) -> list[Candidate]:
        if not self.scored:
            self.pending = list(dict.fromkeys(self.config.init)) or [""]
        else:
            meta = self.meta_prompt()
            seed = self.ctx.seed * 7_919 + self.calls
            self.calls += 1
            outs = self.ctx.proposer.generate(
                [meta] * self.config.per_step,
                self.config.max_new_tokens,
                self.config.temperature,
                seed,
                chat=self.config.chat,
            )
            known = {s["instruction"] for s in self.scored}
            self.pending = [p for p in dict.fromkeys(map(parse_instruction, outs)) if p and p not in known]
        return [self.candidate(p) for p in self.pending]

    def tell(self, scored: list[Scored]) -> None:
        for instruction, s in zip(self.pending, scored, strict=False):
            self.scored.append({"instruction": instruction, "score": s.score, "loglik": s.loglik})
        self.pending = []

    def meta_prompt(self) -> str:
        best = sorted(self.scored, key=lambda s: (s["score"], s["loglik"]))[-self.config.history :]  # best last
        lines = [
            "Your task is to write an instruction for a classification task. Here are earlier instructions with "
            "their accuracy (higher is better):",
            "",
        ]
        for s in best:
            lines += [f"text: {s['instruction'] or '(empty)'}", f"accuracy: {round(100 * s['score'])}", ""]
        lines += ["Here are examples of the task. <INS> marks where the instruction goes:", ""]
        for ex in self.ctx.train[: self.config.examples]:
            lines += [
                self.ctx.template.render_text(ex, "<INS>\n").rstrip(),
                f"answer:{self.ctx.words[str(ex.label)][0]}",
                "",
            ]
        lines.append(
            "Write a new instruction that is different from the earlier ones and reaches a higher accuracy. "
            "Write only the instruction, in square brackets."
        )
        return "\n".join(lines)

    # ---- chain of thought -------------------------------------------------------------------------------------------
    @property
    def calls_per_example(self) -> int:
        return 2 if self.config.cot else 1  # a reasoning is generated, then the answer scored

    def specialize(self, candidate: Candidate, examples: Sequence[Example]) -> Candidate:
        if not self.config.cot or "{hint}" not in candidate.text:
            return candidate
        return cot_hints(
            self.ctx.backend, self.ctx.template, candidate, examples, self.config.cot_tokens, self.reasoning
        )

    def export(self, best: Candidate) -> dict[str, Any]:
        return {"cot_tokens": self.config.cot_tokens} if self.config.cot else {}

    @classmethod
    def specializer(
        cls, extra: dict[str, Any], backend: LLMBackend, artifact_dir: str
    ) -> Callable[[Candidate, Sequence[Example]], Candidate] | None:
        if "cot_tokens" not in extra:
            return None
        from ..data.templates import Template
        from .artifact import read_template

        template: Template = read_template(artifact_dir)
        cache: dict[str, str] = {}
        return lambda c, exs: cot_hints(backend, template, c, exs, int(extra["cot_tokens"]), cache)

    def state_dict(self) -> dict[str, Any]:
        state = {"scored": self.scored, "pending": self.pending, "calls": self.calls, "reasoning": self.reasoning}
        return {**super().state_dict(), **state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.scored, self.pending, self.calls = state["scored"], state["pending"], state["calls"]
        self.reasoning = dict(state["reasoning"])


def parse_instruction(text: str) -> str:
    """The proposal in square brackets, else its first non-empty line; quotes and labels stripped."""
    m = _BRACKETS.search(text)
    line = m.group(1) if m else next((ln for ln in text.splitlines() if ln.strip()), "")
    line = re.sub(r"^\s*(text|instruction)\s*:\s*", "", line.strip(), flags=re.I)
    return line.strip().strip("\"'`").strip()[:400]


def cot_hints(
    backend: LLMBackend,
    template: Any,
    candidate: Candidate,
    examples: Sequence[Example],
    max_tokens: int,
    cache: dict[str, str],
) -> Candidate:
    """Generate (or reuse) each input's reasoning: the template up to the hint, continued greedily."""
    head = candidate.text.split("{hint}")[0]
    prompts = {}
    for ex in examples:
        key = example_key(ex)
        before = template.render_text(ex, _MARK).split(_MARK)[0]  # the template text up to `{prompt}`
        prompts[key] = candidate.context(key) + before + head
    todo = {_hash(p): p for p in prompts.values() if _hash(p) not in cache}
    if todo:
        outs = backend.generate(list(todo.values()), max_tokens, 0.0, 0)
        for h, out in zip(todo, outs, strict=True):
            cache[h] = out.split("\n\n")[0].strip()  # one paragraph of reasoning
    return candidate.specialized(hints={k: cache[_hash(p)] for k, p in prompts.items()})


def _hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:20]
