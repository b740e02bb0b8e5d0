"""Unsupervised prompt learning for black-box LLMs (Zhang et al., 2024, "On Unsupervised Prompt Learning for
Classification with Black-box Language Models", arXiv 2410.03124).

No gold label is read: the optimiser works on label-free copies of the training examples.

1. Reliable pseudo-labels. The task LLM labels every unlabelled example under the manual prompt and under
   `consistency_views` random prompts; an example is reliable when all views agree, ranked by its mean confidence
   (probability of the predicted class; by default after dividing out the pool's mean prediction, `calibrate`).
   The `reliable_per_class` most confident per predicted class are kept (so a model biased towards one class still
   yields examples of every class), and the `demos_per_class` most confident of those become the in-context
   demonstrations.
2. Prompt learning. Every prompt token has its own categorical distribution over a candidate vocabulary (the most
   frequent words of the unlabelled texts, a stand-in for BDPL's task n-grams). Each step samples prompts, scores them
   *with the demonstrations in context* (the paper's point: demonstrations are present at training as at
   prediction), and minimises the loss of each prompt: cross-entropy to the pseudo-label on reliable examples plus
   `unlabelled_weight` x cross-entropy to the label the prompt itself assigns (its argmax) on the other examples.
   The gradient is BDPL's variance-reduced policy-gradient estimator (`rl.vr_policy_gradient_weights`), applied to
   the logits of the per-position distributions with Adam.
3. Prediction uses the same demonstrations and the most likely token per position.

Every `eval_every` steps the most likely prompt is offered to the loop, scored on the reliable examples against
their pseudo-labels (its `score` is agreement with the pseudo-labels). Gold labels enter only through the loop's
best-on-dev selection when the user gives a labelled dev set; give unlabelled training data to keep the manual
prompt's training score free of gold labels too.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import PromptTuneError
from ..registry import register_optimizer
from ..types import Example
from .base import Candidate, Objective, Scored, SearchContext, example_key
from .rl import PolicyOptimizer, adam_tensors, load_adam_tensors, vr_policy_gradient_weights


@dataclass
class UnsupervisedConfig:
    """Unsupervised prompt learning: per-token categorical distributions, pseudo-labelled demonstrations."""

    prompt_length: int = 5
    """Tokens (words of the candidate vocabulary) per prompt."""
    vocab_size: int = 100
    """Candidate words per position: the most frequent words (3+ letters) of the unlabelled texts."""
    samples_per_step: int = 8
    """Prompts sampled per step (at least 2: the variance-reduced estimator compares them)."""
    examples_per_step: int = 8
    """Unlabelled examples each sampled prompt is scored on per step (0 = all)."""
    lr: float = 0.1
    """Adam learning rate of the per-position logits."""
    reliable_per_class: int = 4
    """Reliable pseudo-labelled examples kept per predicted class (most confident first)."""
    demos_per_class: int = 1
    """Of those, in-context demonstrations per class (0 = no demonstrations)."""
    consistency_views: int = 2
    """Random prompts whose predictions must agree with the manual prompt's for an example to be reliable."""
    min_confidence: float = 0.0
    """Least mean probability of the predicted class for a reliable example."""
    calibrate: bool = True
    """Before picking, divide each view's class probabilities by their mean over the unlabelled examples (and
    renormalise): a small model that leans to one class still yields confident examples of every class. No labels."""
    unlabelled_weight: float = 0.5
    """Weight of the loss on the non-reliable examples (labelled by the prompt's own prediction)."""
    eval_every: int = 5
    """Every N steps, offer the most likely prompt for selection."""
    separator: str = "\n"
    """Between demonstrations, and after the learned tokens."""

    def __post_init__(self) -> None:
        for name in ("prompt_length", "vocab_size", "reliable_per_class", "eval_every"):
            value = getattr(self, name)
            if value < 1:
                raise PromptTuneError(f"config field {name!r}: expected a positive integer, got {value!r}")
        if self.samples_per_step < 2:
            raise PromptTuneError(f"config field 'samples_per_step': expected at least 2, got {self.samples_per_step}")
        if not 0 <= self.demos_per_class <= self.reliable_per_class:
            raise PromptTuneError(
                f"config field 'demos_per_class': expected 0..reliable_per_class ({self.reliable_per_class}), "
                f"got {self.demos_per_class!r}"
            )
        if self.lr <= 0 or self.examples_per_step < 0 or self.consistency_views < 0 or self.unlabelled_weight < 0:
            raise PromptTuneError(
                "config fields 'lr' (> 0), 'examples_per_step', 'consistency_views' and "
                "'unlabelled_weight' (>= 0) out of range"
            )


def candidate_words(examples: list[Example], size: int) -> list[str]:
    """The `size` most frequent alphabetic words (3+ letters) of the texts, each with a leading space."""
    counts = Counter(
        w for ex in examples for value in ex.fields.values() for w in value.split() if w.isalpha() and len(w) >= 3
    )
    ranked = sorted(counts.items(), key=lambda wc: (-wc[1], wc[0]))
    return [" " + w for w, _ in ranked[:size]]


def reliable_pseudo_labels(
    probs: Tensor, per_class: int, min_confidence: float, calibrate: bool = False
) -> tuple[list[int], list[int], list[float]]:
    """Pick reliable examples from the class probabilities of several views.

    Args:
        probs: (views, N, C) class probabilities (view 0 is the manual prompt).
        per_class: most examples kept per predicted class.
        min_confidence: least mean probability of the predicted class.
        calibrate: first divide each view's probabilities by their mean over the N examples and renormalise.
    Returns:
        (indices, pseudo-labels, confidences), most confident first within each class, classes in order.
    """
    if calibrate:
        probs = probs / probs.mean(1, keepdim=True)  # (views, N, C): the pool's average prediction becomes uniform
        probs = probs / probs.sum(-1, keepdim=True)
    mean = probs.mean(0)  # (N, C)
    label = mean.argmax(-1)  # (N,)
    agree = (probs.argmax(-1) == label).all(0)  # (N,)
    confidence = mean.gather(1, label[:, None])[:, 0]  # (N,)
    out: tuple[list[int], list[int], list[float]] = ([], [], [])
    for c in range(probs.shape[-1]):
        pool = [i for i in range(len(label)) if label[i] == c and agree[i] and confidence[i] >= min_confidence]
        pool.sort(key=lambda i: (-float(confidence[i]), i))
        for i in pool[:per_class]:
            out[0].append(i)
            out[1].append(c)
            out[2].append(round(float(confidence[i]), 6))
    return out


def pseudo_label_loss(logprobs: Tensor, targets: Tensor, unlabelled_weight: float) -> Tensor:
    """Per-prompt loss: cross-entropy to pseudo-labels where given (target >= 0), to the own argmax elsewhere.

    Args:
        logprobs: (P, N, C) class log-probabilities. targets: (N,) pseudo-labels, -1 = not reliable.
    Returns:
        (P,) losses.
    """
    norm = torch.log_softmax(logprobs.float(), -1)  # (P, N, C)
    reliable = targets >= 0  # (N,)
    own = norm.amax(-1)  # (P, N): log-prob of the prompt's own prediction
    fitted = norm.gather(-1, targets.clamp(min=0).expand(norm.shape[:-1])[..., None])[..., 0]  # (P, N)
    per_example = torch.where(reliable, -fitted, -unlabelled_weight * own)  # (P, N)
    return per_example.mean(-1)


@register_optimizer("unsupervised")
class Unsupervised(PolicyOptimizer):
    config_cls = UnsupervisedConfig

    def __init__(self, config: UnsupervisedConfig, ctx: SearchContext):
        super().__init__(config, ctx)
        self.pool = [Example(dict(ex.fields), None, ex.source) for ex in ctx.train]  # never the gold labels
        self.words = candidate_words(self.pool, config.vocab_size)
        if len(self.words) < 2:
            raise PromptTuneError("unsupervised: the training texts hold fewer than 2 candidate words")
        self.logits = torch.zeros(config.prompt_length, len(self.words), requires_grad=True)  # (m, K)
        self.adam = torch.optim.Adam([self.logits], lr=config.lr)
        self.steps = 0
        self.ready = False  # stage 1 done
        self.labelled: dict[str, int] = {}  # example key -> pseudo-label of the reliable examples
        self.demos: list[tuple[str, int]] = []  # (example key, pseudo-label), in context order
        self.losses: list[float] = []  # mean loss of each step's sampled prompts (diagnostics)

    # ---- prompts ---------------------------------------------------------------------------------------------------
    def candidate(self, tokens: list[int]) -> Candidate:
        """The learned tokens in `{prompt}`, the pseudo-labelled demonstrations before the whole input."""
        by_key = {example_key(ex): ex for ex in self.pool}
        sep = self.config.separator
        demos = "".join(self.ctx.demonstration(by_key[k], self.ctx.labels[y]) + sep * 2 for k, y in self.demos)
        return Candidate("".join(self.words[t] for t in tokens) + sep, demos)

    def greedy(self) -> list[int]:
        return self.logits.argmax(-1).tolist()

    # ---- the step --------------------------------------------------------------------------------------------------
    def learn(self, objective: Objective) -> list[Scored]:
        if not self.ready:
            self.pseudo_label(objective)
        cfg, step = self.config, self.steps
        keys = {example_key(ex) for ex in objective.examples}
        demo_keys = {k for k, _ in self.demos}
        pool = [ex for ex in self.pool if example_key(ex) in keys and example_key(ex) not in demo_keys]
        if not pool:
            raise PromptTuneError("unsupervised: no training example is left once the demonstrations are taken")
        gen = torch.Generator().manual_seed(self.ctx.seed * 1_000_003 + step)
        if cfg.examples_per_step and cfg.examples_per_step < len(pool):
            pool = [pool[i] for i in sorted(torch.randperm(len(pool), generator=gen)[: cfg.examples_per_step].tolist())]
        probs = torch.softmax(self.logits.detach(), -1)  # (m, K)
        tokens = torch.multinomial(probs, cfg.samples_per_step, replacement=True, generator=gen).T  # (I, m)
        scored = objective.score([self.candidate(t.tolist()) for t in tokens], pool)
        targets = torch.tensor([self.labelled.get(example_key(ex), -1) for ex in pool])  # (N,)
        losses = pseudo_label_loss(torch.stack([s.logprobs for s in scored]), targets, cfg.unlabelled_weight)  # (I,)
        weights = vr_policy_gradient_weights(losses)  # (I,)
        logp = torch.log_softmax(self.logits, -1)  # (m, K)
        chosen = logp.gather(1, tokens.T).sum(0)  # (I,): log p(prompt_i)
        self.adam.zero_grad(set_to_none=True)
        (weights * chosen).sum().backward()  # minimises E[loss]
        self.adam.step()
        self.steps += 1
        self.losses.append(round(float(losses.mean()), 5))
        if self.steps % cfg.eval_every:
            return []
        return self.score_pseudo(objective, self.candidate(self.greedy()))

    def pseudo_label(self, objective: Objective) -> None:
        """Stage 1: reliable pseudo-labels and demonstrations from the manual prompt and random views."""
        cfg = self.config
        gen = torch.Generator().manual_seed(self.ctx.seed * 7_919 + 17)
        views = [Candidate("")]
        for _ in range(cfg.consistency_views):
            picks = torch.randint(len(self.words), (cfg.prompt_length,), generator=gen).tolist()
            views.append(Candidate("".join(self.words[t] for t in picks) + cfg.separator))
        scored = objective.score(views, self.pool)
        probs = torch.stack([torch.softmax(s.logprobs.float(), -1) for s in scored])  # (views, N, C)
        index, labels, _ = reliable_pseudo_labels(probs, cfg.reliable_per_class, cfg.min_confidence, cfg.calibrate)
        self.labelled = {example_key(self.pool[i]): y for i, y in zip(index, labels, strict=True)}
        rank: Counter[int] = Counter()
        demos = []
        for i, y in zip(index, labels, strict=True):  # most confident first within each class
            if rank[y] < cfg.demos_per_class:
                demos.append((rank[y], y, example_key(self.pool[i])))
            rank[y] += 1
        # Interleave the classes (c0, c1, c0, c1, ...): a block of one class last would bias the answer.
        self.demos = [(k, y) for _, y, k in sorted(demos)]
        self.ready = True

    def score_pseudo(self, objective: Objective, candidate: Candidate) -> list[Scored]:
        """Score on the reliable non-demonstration examples, against their pseudo-labels."""
        demo_keys = {k for k, _ in self.demos}
        rows = [
            Example(ex.fields, self.ctx.labels[self.labelled[example_key(ex)]], ex.source)
            for ex in self.pool
            if example_key(ex) in self.labelled and example_key(ex) not in demo_keys
        ]
        return objective.score([candidate], rows) if rows else []

    # ---- checkpoint ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "steps": self.steps,
            "ready": self.ready,
            "labelled": self.labelled,
            "demos": [list(d) for d in self.demos],
            "losses": list(self.losses),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.steps, self.ready, self.losses = int(state["steps"]), bool(state["ready"]), list(state["losses"])
        self.labelled = {k: int(v) for k, v in state["labelled"].items()}
        self.demos = [(k, int(y)) for k, y in state["demos"]]

    def tensors(self) -> dict[str, Tensor]:
        return {"logits": self.logits.detach().clone(), **adam_tensors(self.adam)}

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        with torch.no_grad():
            self.logits.copy_(tensors["logits"])
        load_adam_tensors(self.adam, tensors)

    def export(self, best: Candidate) -> dict[str, Any]:
        probs = torch.softmax(self.logits.detach(), -1)
        return {
            "words": self.words,
            "distribution_top": [
                [[self.words[i], round(float(p), 4)] for p, i in zip(*row.topk(min(5, len(self.words))), strict=True)]
                for row in probs
            ],
            "pseudo_labelled": {k: self.ctx.labels[y] for k, y in self.labelled.items()},
            "demonstrations": [[k, self.ctx.labels[y]] for k, y in self.demos],
        }
