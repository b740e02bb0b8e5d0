"""`search()`: the one loop for every discrete optimiser.

    score the manual prompt (empty `{prompt}`) -> [p1: keep the training examples whose reward varies most]
    -> repeat optimizer.step(objective) until the budget, max_steps or the optimiser is done
       (JSONL log and atomic JSON checkpoint after every step)
    -> re-score the best candidates (by training score) and the manual prompt on dev, keep the best on dev
    -> score the test set once -> write the artifact

The budget counts LLM calls (one prompt scored or one text generated) and, optionally, tokens, for the task model and
the proposer alike; dev selection is paid from it too (its calls are held back from the search phase). Running out
ends the search cleanly: everything scored so far stays a candidate.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..config import TaskConfig, build_section
from ..data.templates import Template
from ..errors import PromptTuneError
from ..llm.base import Budget, BudgetExhausted, LLMBackend
from ..registry import OPTIMIZERS, lookup
from ..resume import task_record
from ..types import Example
from . import checkpoint as ckpt
from . import p1 as p1_subset
from .base import Candidate, DiscreteOptimizer, Scored, SearchContext
from .checkpoint import CHECKPOINT
from .config import SearchConfig, SearchResult
from .objective import LLMObjective

__all__ = ["CHECKPOINT", "SearchConfig", "SearchResult", "build_optimizer", "make_context", "search"]


def build_optimizer(config: SearchConfig, ctx: SearchContext) -> DiscreteOptimizer:
    cls = lookup(OPTIMIZERS, config.optimizer, "optimizer")
    opt_cfg = build_section(cls.config_cls, config.optimizer_config, f"optimizer {config.optimizer}")
    return cls(opt_cfg, ctx)


def make_context(
    task: TaskConfig,
    backend: LLMBackend,
    train: Sequence[Example],
    dev: Sequence[Example],
    seed: int,
    proposer: LLMBackend | None = None,
) -> tuple[SearchContext, LLMObjective]:
    """The optimiser's view of the task and the objective scoring on the training examples."""
    if task.head != "verbalizer" or not task.verbalizer:
        raise PromptTuneError("discrete search scores label words: give a verbalizer, e.g. '0= negative,1= positive'")
    words = task.verbalizer
    labels = list(words)
    template = Template(task.template)
    objective = LLMObjective(backend, template, labels, words, train)
    vocabulary = backend.vocabulary() or _words_of(train)
    ctx = SearchContext(list(train), list(dev), labels, words, template, backend, proposer or backend, seed, vocabulary)
    return ctx, objective


def search(
    config: SearchConfig,
    task: TaskConfig,
    backend: LLMBackend,
    train: Sequence[Example],
    dev: Sequence[Example] | None = None,
    test: Sequence[Example] | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    quiet: bool = True,
    proposer: LLMBackend | None = None,
    run_config: dict[str, Any] | None = None,
) -> SearchResult:
    """Search a discrete prompt; see the module docstring.

    Raises:
        PromptTuneError: empty training data, a template without `{prompt}`, a budget too small for dev selection,
            `resume` without a checkpoint or with other settings.
    """
    if not train:
        raise PromptTuneError("training data is empty")
    dev = list(dev or [])
    out = Path(out) if out else None
    tic = time.perf_counter()
    ctx, objective = make_context(task, backend, train, dev, config.seed, proposer)
    optimizer = build_optimizer(config, ctx)
    objective.specialize = optimizer.specialize
    budget = _set_budget(config, backend, proposer, optimizer, len(dev))
    words = [[label, objective.words[label]] for label in objective.labels]
    task_now = task_record(objective.template.text, words, train)  # what a resumed search must share
    state: dict[str, Any] = {"step": 0, "history": {}, "stopped": None, "seconds": 0.0, "p1": None, "task": task_now}
    if resume:
        state = ckpt.load(out, config, optimizer, objective, task_now)
        if state["p1"] is not None:
            objective.examples = p1_subset.restrict(train, state["p1"])
    else:
        _begin(state, config, optimizer, objective, ctx)
        ckpt.save(out, config, optimizer, objective, state, tic)
    bar = tqdm(total=config.max_steps or None, initial=state["step"], disable=quiet, desc="search", dynamic_ncols=True)
    while state["stopped"] is None:
        if _step(state, config, optimizer, objective, budget, out):
            ckpt.save(out, config, optimizer, objective, state, tic)
            bar.update(1)
            bar.set_postfix(calls=budget.calls, best_train=f"{_best(state)['score']:.3f}")
    bar.close()
    ckpt.save(out, config, optimizer, objective, state, tic)
    return _finish(config, task, backend, optimizer, objective, state, dev, test, out, tic, run_config)


def _set_budget(
    config: SearchConfig, backend: LLMBackend, proposer: LLMBackend | None, optimizer: DiscreteOptimizer, n_dev: int
) -> Budget:
    """One budget for every LLM the search calls, reset for this search, with dev selection's calls held back."""
    budget = backend.budget
    if proposer is not None and proposer.budget is not budget:
        proposer.budget = budget
    budget.reset()  # the budget is per search (a resumed one restores its counters from the checkpoint)
    budget.max_calls, budget.max_tokens = config.budget, config.max_tokens
    per = optimizer.calls_per_example
    reserve = (config.select_top + 1) * n_dev * per
    if config.budget and reserve >= config.budget:
        raise PromptTuneError(
            f"config field 'budget': {config.budget} LLM calls cannot pay for dev selection ({config.select_top + 1} "
            f"candidates x {n_dev} dev examples x {per} = {reserve} calls) and leave any for the search; raise it"
        )
    budget.held_back = reserve
    return budget


def _step(
    state: dict[str, Any],
    config: SearchConfig,
    optimizer: DiscreteOptimizer,
    objective: LLMObjective,
    budget: Budget,
    out: Path | None,
) -> bool:
    """One optimiser step, remembered and logged; sets `state["stopped"]` when the search should end. Returns whether
    a step completed (then the caller checkpoints)."""
    if optimizer.done:
        state["stopped"] = "done"
        return False
    if config.max_steps and state["step"] >= config.max_steps:
        state["stopped"] = "max_steps"
        return False
    calls_before = budget.calls
    try:
        scored = optimizer.step(objective)
    except BudgetExhausted as err:
        _remember(state, err.partial, state["step"] + 1)
        state["stopped"] = "budget"
        ckpt.append_log(out, {"step": state["step"] + 1, "stopped": str(err), **budget.state_dict()})
        return False
    state["step"] += 1
    _remember(state, scored, state["step"])
    # Re-proposing scored candidates is free (cached), so a population optimiser that has run out of new ideas
    # would never exhaust the budget: stop after `max_idle_steps` steps without a single LLM call. (Learning
    # optimisers override `step` and may train for steps without calls; they end by budget, steps or `done`.)
    state["idle"] = 0 if budget.calls > calls_before else state.get("idle", 0) + 1
    if state["idle"] >= config.max_idle_steps and type(optimizer).step is DiscreteOptimizer.step:
        state["stopped"] = "stalled"
    best = _best(state)
    entry = {"step": state["step"], "scored": len(scored), "best_train": best["score"], **budget.state_dict()}
    entry["best_candidate"] = best["candidate"]["text"][:200]
    ckpt.append_log(out, entry)
    return True


def _begin(
    state: dict[str, Any], config: SearchConfig, optimizer: DiscreteOptimizer, objective: LLMObjective, ctx: Any
) -> None:
    """Score the manual prompt (a candidate from the start) and, with p1, choose the training subset."""
    try:
        _remember(state, objective.score([Candidate("")]), 0)
        if config.p1:
            state["p1"] = p1_subset.select(objective, optimizer, ctx, config.p1, config.p1_probes, config.seed)
            objective.examples = p1_subset.restrict(ctx.train, state["p1"])
    except BudgetExhausted as err:
        what = "the manual prompt and the p1 probes" if config.p1 else "the manual prompt"
        raise PromptTuneError(f"the budget does not cover scoring {what} on the training data: {err}") from None


def _finish(
    config: SearchConfig,
    task: TaskConfig,
    backend: LLMBackend,
    optimizer: DiscreteOptimizer,
    objective: LLMObjective,
    state: dict[str, Any],
    dev: list[Example],
    test: Sequence[Example] | None,
    out: Path | None,
    tic: float,
    run_config: dict[str, Any] | None,
) -> SearchResult:
    """Best-on-dev selection, one test evaluation, the artifact."""
    budget = backend.budget
    budget.held_back = 0
    ranked = sorted(state["history"].values(), key=lambda h: (-h["score"], -h["loglik"], h["step"]))
    finalists = [Candidate.from_dict(h["candidate"]) for h in ranked[: config.select_top]]
    if Candidate("") not in finalists:
        finalists.append(Candidate(""))
    train_of = {json.dumps(h["candidate"], sort_keys=True): h for h in ranked}
    if dev:
        scored = objective.score(finalists, dev)
        # Ties on dev go to the better training score (finalists are in that order).
        order = sorted(range(len(scored)), key=lambda i: (-scored[i].score, -scored[i].loglik, i))
        finals = [scored[i] for i in order]
    else:
        finals = [_as_scored(train_of[json.dumps(c.to_dict(), sort_keys=True)]) for c in finalists]
    best = finals[0]
    calls, tokens = budget.calls, budget.tokens
    budget.max_calls = budget.max_tokens = 0  # the test set is scored once, outside the search budget
    test_metrics = objective.score([best.candidate], test)[0].metrics if test else None
    train_entry = train_of.get(json.dumps(best.candidate.to_dict(), sort_keys=True), {})
    seconds = state["seconds"] + (time.perf_counter() - tic)
    result = SearchResult(
        best=best.candidate,
        dev=best.metrics if dev else None,
        test=test_metrics,
        train=train_entry.get("metrics", {}),
        steps=state["step"],
        calls=calls,
        tokens=tokens,
        seconds=round(seconds, 3),
        stopped=state["stopped"] or "done",
        candidates=[
            {
                **f.candidate.to_dict(),
                "dev": f.metrics if dev else None,
                "train": train_of.get(json.dumps(f.candidate.to_dict(), sort_keys=True), {}).get("score"),
            }
            for f in finals
        ],
        out=str(out) if out else None,
    )
    if out is not None:
        from .artifact import write_artifact

        write_artifact(out, result, config, task, backend, optimizer, objective.labels, run_config)
    return result


# ---- state -----------------------------------------------------------------------------------------------------------
def _remember(state: dict[str, Any], scored: Sequence[Scored], step: int) -> None:
    """Keep every scored candidate (the one scored on most examples, then the latest, per distinct candidate)."""
    for s in scored:
        key = json.dumps(s.candidate.to_dict(), sort_keys=True)
        old = state["history"].get(key)
        if old is None or len(s.keys) >= old["n"]:
            state["history"][key] = {**s.to_dict(), "step": step}


def _best(state: dict[str, Any]) -> dict[str, Any]:
    return max(state["history"].values(), key=lambda h: (h["score"], h["loglik"], -h["step"]))


def _as_scored(entry: dict[str, Any]) -> Scored:
    return Scored.from_dict(entry)


def _words_of(examples: Sequence[Example]) -> list[str]:
    """Black-box backends have no tokenizer to offer: sample from the words of the training texts instead."""
    seen: dict[str, None] = {}
    for ex in examples:
        for value in ex.fields.values():
            for word in value.split():
                seen.setdefault(" " + word, None)
    return list(seen)
