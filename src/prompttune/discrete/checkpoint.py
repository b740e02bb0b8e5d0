"""A search's checkpoint and log: what `search(resume=True)` needs to continue a killed search exactly.

    checkpoint.json         config, loop state (step, every scored candidate), optimiser, objective cache, budget
    checkpoint.safetensors  the optimiser's tensors (policy networks), when it has any
    search.jsonl            one line per step

Each file is written to a temporary name and renamed, so a kill leaves the previous checkpoint whole; resuming
truncates the log to the checkpointed step, so a killed run's extra lines are not duplicated.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file

from ..artifacts import write_file_atomically
from ..errors import PromptTuneError
from ..resume import check_task
from .base import DiscreteOptimizer
from .config import SearchConfig
from .objective import LLMObjective

CHECKPOINT = "checkpoint.json"
TENSORS = "checkpoint.safetensors"
LOG = "search.jsonl"
# Settings a resumed search must share with the one that wrote the checkpoint (others, e.g. threads, may change).
MUST_MATCH = ("optimizer", "optimizer_config", "budget", "max_tokens", "seed", "select_top", "p1", "p1_probes")


def append_log(out: Path | None, entry: dict[str, Any]) -> None:
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOG, "a") as f:
        f.write(json.dumps(entry) + "\n")


def save(
    out: Path | None,
    config: SearchConfig,
    optimizer: DiscreteOptimizer,
    objective: LLMObjective,
    state: dict[str, Any],
    tic: float,
) -> None:
    """checkpoint.json (+ checkpoint.safetensors for optimiser tensors), each written to a temp file and renamed."""
    if out is None or not config.checkpoint:
        return
    tensors = optimizer.tensors()
    if tensors:
        write_file_atomically(out / TENSORS, tensors, metadata={"step": str(state["step"])})
    payload = {
        "config": asdict(config),
        "state": {**state, "seconds": state["seconds"] + (time.perf_counter() - tic)},
        "optimizer": optimizer.state_dict(),
        "objective": objective.state_dict(),
        "budget": objective.budget.state_dict(),
        "has_tensors": bool(tensors),
    }
    write_file_atomically(out / CHECKPOINT, json.dumps(payload))


def load(
    out: Path | None,
    config: SearchConfig,
    optimizer: DiscreteOptimizer,
    objective: LLMObjective,
    task: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Restore optimiser, objective and budget from `out`; returns the loop state (whose `task` must equal `task`,
    see `resume.task_record`)."""
    if out is None or not (out / CHECKPOINT).is_file():
        raise PromptTuneError(f"{out}/{CHECKPOINT}: no checkpoint to resume from")
    path = out / CHECKPOINT
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PromptTuneError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    saved, now = payload["config"], asdict(config)
    for key in MUST_MATCH:
        if saved.get(key) != now[key]:
            raise PromptTuneError(
                f"{path}: checkpoint was made with {key}={saved.get(key)!r}, this run has {now[key]!r}; "
                "resume with the same settings"
            )
    state = payload["state"]
    if task is not None:
        check_task(path, state.get("task"), task)
    if payload.get("has_tensors"):
        with safe_open(str(out / TENSORS), "pt") as f:
            step = int(f.metadata().get("step", -1))
        if step != state["step"]:
            raise PromptTuneError(f"{out / TENSORS}: holds step {step}, {path} step {state['step']}; cannot resume")
        optimizer.load_tensors(load_file(str(out / TENSORS)))
    optimizer.load_state_dict(payload["optimizer"])
    objective.load_state_dict(payload["objective"])
    objective.budget.load_state_dict(payload["budget"])
    log = out / LOG
    if log.is_file():
        lines = [ln for ln in log.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= state["step"]]
        log.write_text("".join(ln + "\n" for ln in lines))
    return state
