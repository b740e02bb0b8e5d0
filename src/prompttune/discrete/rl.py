"""Reward functions shared by the RL-style optimisers (RLPrompt, unsupervised prompt learning, directional stimulus).

Pure tensor functions, pinned by hand-computed values in `tests/test_discrete_rl.py`:

- `gap_reward`: RLPrompt's piecewise "gap" reward (Deng et al., 2022, "RLPrompt: Optimizing Discrete Text Prompts
  with Reinforcement Learning", arXiv 2205.12548, section 3.2): how far the gold class is ahead of the best other class,
  scaled by `correct_coeff` when the prediction is right and by `incorrect_coeff` when it is wrong.
- `zscore`: the paper's reward stabilisation: rewards of the prompts sampled for one input, normalised by that input's
  mean and standard deviation across those prompts.
- `vr_policy_gradient_weights`: the variance-reduced REINFORCE weights of BDPL (Diao et al., 2022, arXiv 2201.08531),
  used by the unsupervised prompt learner (Zhang et al., 2024, arXiv 2410.03124).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import PromptTuneError


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
