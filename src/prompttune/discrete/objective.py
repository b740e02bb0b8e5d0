"""`LLMObjective`: scores discrete prompts on examples through any LLM backend, with the soft methods' template,
verbalizer semantics and evaluator.

Prompt text = `template.render_text(example, candidate.render(key))` (everything before `{answer}`); class score =
log of the mean probability of the class's label words (exactly what `VerbalizerHead` computes); metrics =
`evaluation.score_metrics`. Each distinct prompt text is sent to the LLM once: results are cached by the text's hash,
so a candidate re-proposed later, or the same demonstration set in two candidates, costs nothing. The cache is part
of the loop's checkpoint, so a resumed search spends its budget exactly as the uninterrupted one.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..data.templates import Template
from ..errors import PromptTuneError
from ..evaluation import score_metrics
from ..llm.base import BudgetExhausted, LLMBackend
from ..types import Example
from .base import Candidate, Scored, example_key


class _LabelSpace:
    """What `score_metrics` needs from a head: the labels and the decision rule (argmax)."""

    multi_label = False

    def __init__(self, labels: Sequence[str]):
        self.labels = list(labels)

    def decide(self, scores: Tensor) -> list[str]:
        return [self.labels[i] for i in scores.argmax(-1).tolist()]


class LLMObjective:
    """Args:
    backend: the task LLM (its `budget` is the search budget).
    template: a template with `{prompt}` (without one the searched text has nowhere to go).
    labels: ordered classes; words: label -> label words (the verbalizer).
    examples: the default examples to score on (training data, or a p1 subset).
    """

    def __init__(
        self,
        backend: LLMBackend,
        template: Template,
        labels: Sequence[str],
        words: dict[str, list[str]],
        examples: Sequence[Example],
    ):
        if not template.has_prompt:
            raise PromptTuneError(
                f"template {template.text!r}: no {{prompt}} marker; put it where the searched text goes, e.g. "
                "'Review: {text}\\n{prompt}Sentiment:{answer}'"
            )
        missing = [label for label in labels if label not in words]
        if missing:
            raise PromptTuneError(f"verbalizer: no label word for label(s) {missing}; labels are {list(labels)}")
        self.backend = backend
        self.budget = backend.budget
        self.template = template
        self.labels = list(labels)
        self.words = {label: list(words[label]) for label in self.labels}
        self.flat_words = [w for label in self.labels for w in self.words[label]]
        self.word_class = torch.tensor([c for c, label in enumerate(self.labels) for _ in self.words[label]])
        self.examples = list(examples)
        self.cache: dict[str, list[float]] = {}  # sha1(prompt text) -> (W,) word log-probs
        self._prefixes: dict[str, str] = {}  # prompt text -> its candidate-independent beginning
        self.space = _LabelSpace(self.labels)
        # Fills per-example parts (hints, retrieved demonstrations) before rendering; the loop installs the
        # optimiser's `specialize`.
        self.specialize: Callable[[Candidate, Sequence[Example]], Candidate] = lambda c, _: c

    # ---- scoring ----------------------------------------------------------------------------------------------------
    def prompt_texts(self, candidate: Candidate, examples: Sequence[Example]) -> list[str]:
        """What the LLM reads for each example: demonstrations, then the template with `{prompt}` filled."""
        candidate = self.specialize(candidate, examples)
        out = []
        for ex in examples:
            k = example_key(ex)
            text = candidate.context(k) + self.template.render_text(ex, candidate.render(k))
            # The part before `{prompt}` does not depend on the searched text: a local backend reuses its keys/values.
            self._prefixes[text] = candidate.context(k) + self.template.render_text(ex, _MARK).split(_MARK)[0]
            out.append(text)
        return out

    def score(self, candidates: Sequence[Candidate], examples: Sequence[Example] | None = None) -> list[Scored]:
        """Score candidates on `examples` (default `self.examples`); see `Objective.score`."""
        examples = list(self.examples if examples is None else examples)
        if not examples:
            raise PromptTuneError("nothing to score: the example set is empty")
        gold = self._gold(examples)
        texts = [self.prompt_texts(c, examples) for c in candidates]
        fits = len(candidates)
        left = self.budget.remaining_calls()
        if left is not None:  # score the longest run of candidates that fits; the rest is lost to the budget
            seen: set[str] = set()
            for i, group in enumerate(texts):
                seen.update(h for h in map(_hash, group) if h not in self.cache)
                if len(seen) > left:
                    fits = i
                    break
        self._fill_cache([t for group in texts[:fits] for t in group])
        out = [self._scored(c, group, examples, gold) for c, group in zip(candidates[:fits], texts[:fits], strict=True)]
        if fits < len(candidates):
            need = len({_hash(t) for t in texts[fits]} - self.cache.keys())
            raise BudgetExhausted(
                f"budget exhausted: {self.budget.calls} of {self.budget.max_calls} LLM calls used "
                f"({self.budget.held_back} held back for dev selection); the next candidate needs {need}",
                partial=out,
            )
        return out

    def _fill_cache(self, texts: list[str]) -> None:
        todo: dict[str, str] = {}
        for text in texts:
            h = _hash(text)
            if h not in self.cache and h not in todo:
                todo[h] = text
        if todo:
            texts = list(todo.values())
            prefixes = [self._prefixes.get(t, "") for t in texts]
            logprobs = self.backend.label_logprobs(texts, self.flat_words, prefixes)  # (M, W)
            for h, row in zip(todo, logprobs.tolist(), strict=True):
                self.cache[h] = row

    def _scored(self, candidate: Candidate, texts: list[str], examples: list[Example], gold: Tensor) -> Scored:
        word_lp = torch.tensor([self.cache[_hash(t)] for t in texts], dtype=torch.float32)  # (N, W)
        logprobs = self.class_scores(word_lp)  # (N, C)
        labelled = gold >= 0
        if labelled.any():
            rows = [ex for ex, ok in zip(examples, labelled.tolist(), strict=True) if ok]
            metrics = score_metrics(self.space, rows, logprobs[labelled])
            norm = torch.log_softmax(logprobs[labelled], -1)  # (n, C): normalised over the classes
            loglik = float(norm.gather(1, gold[labelled][:, None]).mean())
            score = float(metrics[metrics["primary_metric"]])
        else:  # unlabelled data (unsupervised optimisers read `logprobs` themselves)
            metrics, score, loglik = {}, 0.0, 0.0
        keys = tuple(example_key(ex) for ex in examples)
        return Scored(candidate, score, loglik, logprobs, gold, keys, metrics)

    def class_scores(self, word_lp: Tensor) -> Tensor:
        """(N, W) word log-probs -> (N, C): log of the mean probability of each class's words."""
        out = word_lp.new_full((word_lp.shape[0], len(self.labels)), -math.inf)
        for c in range(len(self.labels)):
            cols = word_lp[:, self.word_class == c]  # (N, W_c)
            out[:, c] = torch.logsumexp(cols, -1) - math.log(cols.shape[1])
        return out

    def _gold(self, examples: list[Example]) -> Tensor:
        gold = []
        for ex in examples:
            if ex.label is None:
                gold.append(-1)
            elif str(ex.label) not in self.labels:
                raise PromptTuneError(f"{ex.source}: label {ex.label!r} is not covered; expected one of {self.labels}")
            else:
                gold.append(self.labels.index(str(ex.label)))
        return torch.tensor(gold, dtype=torch.long)

    # ---- checkpointing ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"cache": self.cache}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cache = {k: list(v) for k, v in state["cache"].items()}


_MARK = "\x00"  # stands for `{prompt}` while cutting a rendered template


def _hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:20]
