"""The one training loop for every soft-prompt method (accelerate underneath, so DDP works unchanged).

AdamW over the method's parameter groups and the head, warm-up then decay, gradient clipping, evaluation on dev every
N steps with best-on-dev selection (the initial prompt is a candidate too), early stopping, a JSONL log and an atomic
single-file checkpoint. The data order is a pure function of (seed, step), so `resume` reproduces an uninterrupted
run exactly.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor
from tqdm.auto import tqdm

from .artifacts import write_file_atomically
from .config import TrainConfig
from .errors import PromptTuneError
from .model import PromptModel
from .resume import CHECKPOINT, load_checkpoint, save_checkpoint, task_record
from .types import Example, Row

LOG = "metrics.jsonl"


@dataclass
class FitResult:
    best_step: int
    best_dev: dict[str, Any] | None
    steps: int
    seconds: float
    seconds_per_step: float
    tuned: dict[str, Any] = field(default_factory=dict)
    log: list[dict[str, Any]] = field(default_factory=list)


def schedule(cfg: TrainConfig):
    warmup = int(cfg.warmup_ratio * cfg.max_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, cfg.max_steps - warmup)
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - progress)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Examples of a step: a stream of per-epoch permutations seeded by (seed, epoch)."""
    out: list[int] = []
    pos = step * batch_size
    while len(out) < min(batch_size, n):
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        take = perm[offset : offset + batch_size - len(out)]
        out.extend(take)
        pos += len(take)
    return out


def fit(
    model: PromptModel,
    train: Sequence[Example],
    dev: Sequence[Example] | None,
    cfg: TrainConfig,
    out: str | Path | None = None,
    resume: bool = False,
    quiet: bool = False,
    calibrate: str = "auto",
) -> FitResult:
    """Train `model.method` and `model.head`; the backbone stays frozen.

    Raises:
        PromptTuneError: empty training data, labels the head does not cover, `resume` without a checkpoint.
    """
    if not train:
        raise PromptTuneError("training data is empty")
    accelerator = Accelerator(cpu=model.device.type == "cpu")
    out = Path(out) if out else None
    model.use_prefix_cache(cfg.cache_prefix)
    train_rows = model.encode(train, with_targets=True)
    targets = model.head.encode_labels(train)
    if dev:
        model.head.encode_labels(dev)  # fail now, not after training, on a label the head does not cover
    # Data-dependent head state (e.g. label-word priors) is fitted once; a resumed run restores it from the checkpoint.
    prepared = {} if resume else model.head.prepare(model, train)
    cfg, optimizer, scheduler = _optimizer(model, cfg)
    wrapped, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    task = task_record(model.template.text, model.head.labels, train)  # what a resumed run must share
    state = {"step": 0, "best_step": 0, "best": None, "best_dev": None, "bad_evals": 0, "log": [], "seconds": 0.0}
    best_state = _snapshot(model)

    def checkpoint() -> None:
        # Under DDP every process holds the same state after the all-reduce; one of them writes it.
        if out is not None and cfg.checkpoint and accelerator.is_main_process:
            save_checkpoint(out / CHECKPOINT, model, best_state, state, optimizer, scheduler, cfg, task)

    if resume:
        if out is None:
            raise PromptTuneError("resume needs the output directory of the run to continue")
        state, best_state = load_checkpoint(out / CHECKPOINT, model, optimizer, scheduler, cfg, task)
    elif dev:
        _evaluate(model, dev, cfg, state, best_state, out, quiet=True)  # the starting prompt is a candidate
    step_seconds: list[float] = []
    bar = tqdm(total=cfg.max_steps, initial=state["step"], disable=quiet, desc="train", dynamic_ncols=True)
    while state["step"] < cfg.max_steps:
        tic = time.perf_counter()
        idx = batch_indices(state["step"], len(train), cfg.batch_size, cfg.seed)
        idx = idx[accelerator.process_index :: accelerator.num_processes]  # this process's share (DDP)
        loss = _train_step(model, wrapped, accelerator, train_rows, targets, idx, cfg, optimizer)
        scheduler.step()
        state["step"] = step = state["step"] + 1
        step_seconds.append(time.perf_counter() - tic)
        state["log"].append({"step": step, "loss": round(loss.item(), 6), "lr": scheduler.get_last_lr()[0]})
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", best_dev=state["best"])
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            state["seconds"] += sum(step_seconds)
            step_seconds.clear()
            stop = _evaluate(model, dev, cfg, state, best_state, out if accelerator.is_main_process else None, quiet)
            checkpoint()
            if stop:
                break
    bar.close()
    state["seconds"] += sum(step_seconds)
    if dev:
        model.load_state_dict(best_state)
    tuned = {**prepared, **(_tune_on_dev(model, dev, cfg, calibrate) if dev else {})}
    model.use_prefix_cache(False)
    steps_run = max(1, sum(1 for r in state["log"] if "loss" in r))
    seconds = state["seconds"]
    return FitResult(
        state["best_step"], state["best_dev"], state["step"], seconds, seconds / steps_run, tuned, state["log"]
    )


def _optimizer(model: PromptModel, cfg: TrainConfig) -> tuple[TrainConfig, torch.optim.Optimizer, Any]:
    """AdamW over the method's and head's parameter groups, and the LR schedule; with nothing to train (the manual
    prompt) a run of zero steps that only evaluates and tunes on dev."""
    groups = model.method.param_groups(cfg.lr) + model.head.param_groups(cfg.lr)
    groups = [g for g in groups if g["params"]]
    if not groups:
        cfg = replace(cfg, max_steps=0, checkpoint=False)
        groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": cfg.lr}]  # AdamW refuses an empty list
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    return cfg, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(cfg))


def _train_step(
    model: PromptModel,
    wrapped: Any,
    accelerator: Accelerator,
    train_rows: list[list[Row]],
    targets: Tensor | None,
    idx: list[int],
    cfg: TrainConfig,
    optimizer: torch.optim.Optimizer,
) -> Tensor:
    """One optimiser step on the training examples `idx` (`train_rows`: each example's encoded rows); returns the
    loss."""
    rows = [Row(r.ids, r.soft, r.read, r.targets, j, r.option) for j, i in enumerate(idx) for r in train_rows[i]]
    batch = model.make_batch(rows)
    scores = wrapped(batch, len(idx))
    loss = model.head.loss(scores, None if targets is None else targets[idx].to(scores.device), batch)
    accelerator.backward(loss)
    if cfg.grad_clip > 0:
        accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def _tune_on_dev(model: PromptModel, dev: Sequence[Example], cfg: TrainConfig, calibrate: str) -> dict[str, Any]:
    """The head's dev-chosen settings (calibration, thresholds) for the selected prompt."""
    scores = model.scores(dev, cfg.eval_batch_size) if model.head.is_classifier else None
    return model.head.tune_on_dev(model, scores, dev, calibrate)


def _evaluate(
    model: PromptModel,
    dev: Sequence[Example] | None,
    cfg: TrainConfig,
    state: dict[str, Any],
    best_state: dict[str, torch.Tensor],
    out: Path | None,
    quiet: bool,
) -> bool:
    """Evaluate on dev, keep the best state, checkpoint; True when early stopping triggers."""
    stop = False
    if dev:
        metrics = model.head.dev_metrics(model, dev, cfg.eval_batch_size)
        value = metrics[metrics["primary_metric"]]
        state["log"].append({"step": state["step"], "dev": metrics})
        if state["best"] is None or value > state["best"]:
            state.update(best=value, best_step=state["step"], best_dev=metrics, bad_evals=0)
            best_state.update(_snapshot(model))
        else:
            state["bad_evals"] += 1
            stop = cfg.patience > 0 and state["bad_evals"] >= cfg.patience
        if not quiet:
            tqdm.write(
                f"step {state['step']}: dev {metrics['primary_metric']} {value:.4f} (best {state['best']:.4f}"
                f" at step {state['best_step']})"
            )
    else:
        best_state.update(_snapshot(model))
        state["best_step"] = state["step"]
    if out is not None:
        _write_log(out / LOG, state["log"])
    return stop


def _snapshot(model: PromptModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _write_log(path: Path, log: list[dict[str, Any]]) -> None:
    write_file_atomically(path, "".join(json.dumps(r) + "\n" for r in log))
