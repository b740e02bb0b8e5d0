"""p1 ("p1: Better Prompt Optimization with Fewer Prompts"): optimise on the few inputs whose reward varies most
across candidate prompts.

The paper's observation: an optimiser can only tell prompts apart on inputs where the prompt matters; inputs that
every prompt gets right (or wrong) add cost and noise. So score a handful of probe prompts on every training input,
measure each input's reward variance across the probes, and let the search score candidates only on the K inputs
with the highest variance. Here the reward is the class-normalised log-probability of the gold label, and the probes
are the manual prompt, the optimiser's own first proposals (its state is restored afterwards, so the search itself is
unchanged) and random vocabulary strings. One adaptation for classification: the K inputs are taken per class in
proportion to the class sizes, so the subset never lets a "always say X" prompt win the search phase.

This is a flag of the search loop (`SearchConfig.p1 = K`, CLI `--p1 K`), so it wraps every optimiser.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence

import torch

from ..errors import PromptTuneError
from ..types import Example
from .base import Candidate, DiscreteOptimizer, SearchContext, example_key
from .objective import LLMObjective

_PROBE_TOKENS = 5  # length of a random probe prompt, in vocabulary pieces


def probe_candidates(optimizer: DiscreteOptimizer, ctx: SearchContext, n: int, seed: int) -> list[Candidate]:
    """The manual prompt, up to n // 2 of the optimiser's first proposals, random vocabulary strings for the rest."""
    probes = [Candidate("")]
    saved = json.loads(json.dumps(optimizer.state_dict()))
    try:
        probes += [c for c in optimizer.ask() if c not in probes][: n // 2]
    except NotImplementedError:  # a learning optimiser (it overrides step, not ask)
        pass
    finally:
        optimizer.load_state_dict(saved)
    rng = random.Random(seed * 7_919 + 1)
    while len(probes) < n and ctx.vocabulary:
        probes.append(Candidate("".join(rng.choice(ctx.vocabulary) for _ in range(_PROBE_TOKENS))))
    return probes


def select(
    objective: LLMObjective, optimizer: DiscreteOptimizer, ctx: SearchContext, k: int, probes: int, seed: int
) -> list[str]:
    """`example_key`s of the k training examples with the highest reward variance (class-stratified)."""
    examples = objective.examples
    if k >= len(examples):
        return [example_key(ex) for ex in examples]
    scored = objective.score(probe_candidates(optimizer, ctx, probes, seed))
    gold = scored[0].gold  # (N,)
    if (gold < 0).any():
        raise PromptTuneError("p1 needs labelled training examples (reward = log-probability of the gold label)")
    reward = torch.stack([torch.log_softmax(s.logprobs, -1).gather(1, gold[:, None])[:, 0] for s in scored])  # (P, N)
    variance = reward.var(0)  # (N,)
    chosen: list[int] = []
    classes = sorted(set(gold.tolist()))
    quota = {c: max(1, round(k * int((gold == c).sum()) / len(gold))) for c in classes}
    for c in classes:
        idx = [i for i in range(len(gold)) if gold[i] == c]
        idx.sort(key=lambda i: (-float(variance[i]), i))
        chosen += idx[: quota[c]]
    chosen.sort(key=lambda i: (-float(variance[i]), i))
    return [example_key(examples[i]) for i in sorted(chosen[:k])]


def restrict(examples: Sequence[Example], keys: Sequence[str]) -> list[Example]:
    """The examples whose key is in `keys`, in their original order."""
    wanted = set(keys)
    return [ex for ex in examples if example_key(ex) in wanted]
