"""Pieces shared by the RL-style optimisers (RLPrompt, unsupervised prompt learning, directional stimulus).

Reward functions, pinned by hand-computed values in `tests/test_discrete_rl.py`:

- `gap_reward`: RLPrompt's piecewise "gap" reward (Deng et al., 2022, "RLPrompt: Optimizing Discrete Text Prompts
  with Reinforcement Learning", arXiv 2205.12548, section 3.2): how far the gold class is ahead of the best other class,
  scaled by `correct_coeff` when the prediction is right and by `incorrect_coeff` when it is wrong.
- `zscore`: the paper's reward stabilisation: rewards of the prompts sampled for one input, normalised by that input's
  mean and standard deviation across those prompts.
- `vr_policy_gradient_weights`: the variance-reduced REINFORCE weights of BDPL (Diao et al., 2022, arXiv 2201.08531),
  used by the unsupervised prompt learner (Zhang et al., 2024, arXiv 2410.03124).

and plumbing: `PolicyOptimizer` (stops a learning optimiser once its policy has converged), class-balanced
minibatches seeded by step (so a resumed search draws what the uninterrupted one would), the frozen LM a trainable
policy sits on, and Adam state as flat tensors for safetensors checkpoints.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import PromptTuneError
from .base import DiscreteOptimizer, Objective, Scored


def class_probabilities(class_scores: Tensor) -> Tensor:
    """Class scores `(..., C)` (log-probabilities of the label words) -> probabilities over the classes `(..., C)`.

    The label words' probabilities are renormalised over the classes, as the paper does (softmax over the
    verbalizer logits): mass on other words of the vocabulary is ignored.
    """
    return torch.softmax(class_scores.float(), dim=-1)


def gap(class_scores: Tensor, labels: Tensor, space: str = "prob") -> Tensor:
    """Gold class minus the best other class, per example.

    Args:
        class_scores: `(..., N, C)` label-word log-probabilities (any additive constant per row is fine).
        labels: `(N,)` gold class indices.
        space: `prob` (the paper: P(gold) - max P(other), probabilities renormalised over the classes) or `logprob`
            (log P(gold) - max log P(other), the same renormalisation).
    Returns:
        `(..., N)` gaps; positive exactly when the gold class is the argmax.
    """
    if class_scores.shape[-1] < 2:
        raise PromptTuneError(f"gap reward needs at least two classes, got {class_scores.shape[-1]}")
    if space == "prob":
        values = class_probabilities(class_scores)  # (..., N, C)
    elif space == "logprob":
        values = torch.log_softmax(class_scores.float(), dim=-1)  # (..., N, C)
    else:
        raise PromptTuneError(f"gap reward: space must be 'prob' or 'logprob', got {space!r}")
    index = labels.expand(values.shape[:-1])[..., None]  # (..., N, 1)
    gold = values.gather(-1, index)[..., 0]  # (..., N)
    others = values.scatter(-1, index, float("-inf")).amax(-1)  # (..., N)
    return gold - others


def gap_reward(
    class_scores: Tensor,
    labels: Tensor,
    correct_coeff: float = 200.0,
    incorrect_coeff: float = 180.0,
    space: str = "prob",
) -> Tensor:
    """RLPrompt's piecewise gap reward `R = lambda_2^[correct] * lambda_1^[wrong] * Gap` per example.

    Args:
        class_scores: `(..., N, C)` class log-probabilities.
        labels: `(N,)` gold class indices.
        correct_coeff: `lambda_2` of the paper (200): scale of the gap when the prediction is right.
        incorrect_coeff: `lambda_1` of the paper (180): scale of the (negative) gap when it is wrong.
        space: see `gap`.
    Returns:
        `(..., N)` rewards.
    """
    g = gap(class_scores, labels, space)  # (..., N)
    return torch.where(g > 0, correct_coeff * g, incorrect_coeff * g)


def zscore(rewards: Tensor, eps: float = 1e-4) -> Tensor:
    """Normalise rewards across the prompts sampled for the same input (dimension 0).

    Args:
        rewards: `(P,)` one reward per sampled prompt for a single input, or `(P, N)`: column n holds the rewards the
            P prompts earned on input n.
        eps: added to the standard deviation (population std, as the reference implementation's numpy default).
    Returns:
        Same shape: `(r - mean_P r) / (std_P r + eps)`, computed per input (per column).
    """
    mean = rewards.mean(0, keepdim=True)
    std = rewards.std(0, unbiased=False, keepdim=True)
    return (rewards - mean) / (std + eps)


def vr_policy_gradient_weights(losses: Tensor) -> Tensor:
    """Weights of BDPL's variance-reduced policy gradient: `(L_i - mean_j L_j) / (I - 1)` for I samples.

    The gradient estimate of E[L] is `sum_i weight_i * grad log p(z_i)` (minimise it). Subtracting the mean of the
    *other* samples' losses, rescaled, gives an unbiased estimator with far less variance than plain REINFORCE.

    Args:
        losses: `(I,)` losses of I >= 2 sampled prompts.
    Returns:
        `(I,)` weights.
    """
    n = losses.shape[0]
    if n < 2:
        raise PromptTuneError(f"the variance-reduced policy gradient needs at least 2 samples, got {n}")
    return (losses - losses.mean()) / (n - 1)


def balanced_minibatch(labels: list[int], size: int, seed: int) -> list[int]:
    """Indices of a class-balanced minibatch (size // classes per class, drawn without replacement); all if size 0."""
    if size <= 0 or size >= len(labels):
        return list(range(len(labels)))
    gen = torch.Generator().manual_seed(seed)
    classes = sorted(set(labels))
    per_class = max(1, size // len(classes))
    out: list[int] = []
    for c in classes:
        members = [i for i, y in enumerate(labels) if y == c]
        out += [members[j] for j in torch.randperm(len(members), generator=gen)[:per_class].tolist()]
    return sorted(out)


def policy_backbone(backend: Any, name: str | None) -> Any:
    """The frozen LM under a trainable policy: `name` if given, else the task model when it is a local one."""
    if name is None:
        backbone = getattr(backend, "backbone", None)
        if backbone is None:
            raise PromptTuneError(
                "config field 'policy_model': the task model is not a local transformers model, so the policy needs "
                "its own frozen LM; give an embedded name (see `prompttune models`), tiny-* or a local path"
            )
        return backbone
    from ..backbones.base import load_backbone

    return load_backbone(name)


def adam_tensors(adam: torch.optim.Optimizer, prefix: str = "adam") -> dict[str, Tensor]:
    """An optimizer's per-parameter state as flat named tensors (for safetensors; no pickle)."""
    out = {}
    for i, entry in adam.state_dict()["state"].items():
        for name, value in entry.items():
            out[f"{prefix}.{i}.{name}"] = torch.as_tensor(value).clone()
    return out


def load_adam_tensors(adam: torch.optim.Optimizer, tensors: dict[str, Tensor], prefix: str = "adam") -> None:
    """Inverse of `adam_tensors` (the param groups come from the config, which resume checks)."""
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = value
    adam.load_state_dict({"state": state, "param_groups": adam.state_dict()["param_groups"]})


class PolicyOptimizer(DiscreteOptimizer):
    """Base of the learning optimisers: subclasses implement `learn(objective)` (one training step).

    The objective caches every prompt text it has scored, so a policy that has converged (it only writes prompts
    already scored) trains on for free and would never exhaust the budget: after `idle_steps` steps in a row without
    a single new LLM call, the optimiser reports `done`.
    """

    idle_steps = 25

    def __init__(self, config: Any, ctx: Any):
        super().__init__(config, ctx)
        self.idle = 0

    def learn(self, objective: Objective) -> list[Scored]:
        raise NotImplementedError

    def step(self, objective: Objective) -> list[Scored]:
        before = objective.budget.calls
        out = self.learn(objective)
        self.idle = self.idle + 1 if objective.budget.calls == before else 0
        return out

    @property
    def done(self) -> bool:
        return self.idle >= self.idle_steps

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "idle": self.idle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.idle = int(state["idle"])
