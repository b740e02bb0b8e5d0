"""Checkpoints of the soft-prompt loop, and what any resumed run must share with the run that wrote its checkpoint.

`save_checkpoint` writes one safetensors file (parameters, the best-on-dev state, optimiser state, RNG; JSON metadata
with the loop state and settings) atomically; `load_checkpoint` restores it after checking that this run builds the
same model (method, method options, head: parameter shapes) with the same settings and the same task. A checkpoint
restores parameters and optimiser state; continuing them on another template, label set or training data would
silently train a different task from the middle, so both loops (soft `train.fit`, discrete `search`) record
`task_record(...)` in their checkpoint and call `check_task` on resume.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file

from .artifacts import write_file_atomically
from .errors import PromptTuneError
from .types import Example

if TYPE_CHECKING:
    from .config import TrainConfig
    from .model import PromptModel

CHECKPOINT = "checkpoint.safetensors"


def task_record(template: str, labels: Sequence[Any], examples: Sequence[Example]) -> dict[str, Any]:
    """The template text, the label set (labels, or labels with their words) and a fingerprint of the training
    examples (texts and labels, in order)."""
    rows = [[dict(e.fields), list(e.label) if isinstance(e.label, tuple) else e.label] for e in examples]
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]
    return {"template": template, "labels": list(labels), "train": {"examples": len(examples), "sha256": digest}}


def check_task(path: Path, saved: Mapping[str, Any] | None, now: Mapping[str, Any]) -> None:
    """Raise when the checkpoint's task differs (checkpoints written before the record was kept pass).

    Raises:
        PromptTuneError: another template, label set or training data, named.
    """
    if not saved:
        return
    for key, what in (("template", "template"), ("labels", "labels"), ("train", "training data")):
        if saved.get(key) != now[key]:
            if key == "train":
                old, new = saved[key], now[key]
                detail = (
                    f"{old['examples']} examples (sha256 {old['sha256']}), this run {new['examples']} ({new['sha256']})"
                )
            else:
                detail = f"{saved.get(key)!r}, this run {now[key]!r}"
            raise PromptTuneError(f"{path}: checkpoint was made with other {what}: {detail}; resume the same task")


def save_checkpoint(
    path: Path,
    model: PromptModel,
    best_state: dict[str, torch.Tensor],
    state: dict[str, Any],
    optimizer: Any,
    scheduler: Any,
    cfg: TrainConfig,
    task: dict[str, Any],
) -> None:
    """One safetensors file (tensors + JSON metadata), written to a temp file and renamed: never half-written."""
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"best.{k}": v.contiguous() for k, v in best_state.items()})
    opt = optimizer.state_dict()
    for i, entry in opt["state"].items():
        for name, value in entry.items():
            tensors[f"optim.{i}.{name}"] = torch.as_tensor(value).contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {
        "state": state,
        "method": model.method.name,
        "method_config": asdict(model.method.config),
        "head": model.head.name,
        "task": task,
        "train_config": asdict(cfg),
        "param_groups": opt["param_groups"],
        "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
    }
    write_file_atomically(path, tensors, metadata={"prompttune": json.dumps(meta)})


def _check_same_model(path: Path, meta: dict[str, Any], saved: dict[str, torch.Tensor], model: PromptModel) -> None:
    """A resumed run must build the model the checkpoint was written from (same method, options and head)."""
    ours = {"method": model.method.name, "head": model.head.name}
    for key, value in ours.items():
        if key in meta and meta[key] != value:
            raise PromptTuneError(f"{path}: checkpoint was made with {key} {meta[key]!r}, this run has {value!r}")
    for key, value in json.loads(json.dumps(asdict(model.method.config))).items():  # as JSON stores it (tuples)
        old = meta.get("method_config", {}).get(key, value)
        if old != value:
            raise PromptTuneError(
                f"{path}: checkpoint was made with {model.method.name} {key}={old!r}, this run has {value!r}"
            )
    own = model.state_dict()  # what the names above do not cover (e.g. the head's options) shows in the shapes
    for name in sorted(set(own) | set(saved)):
        if name not in own or name not in saved or own[name].shape != saved[name].shape:
            raise PromptTuneError(
                f"{path}: checkpoint's {name} is {tuple(saved[name].shape) if name in saved else 'missing'}, this "
                f"run's is {tuple(own[name].shape) if name in own else 'missing'}; resume with the same options"
            )


def load_checkpoint(
    path: Path, model: PromptModel, optimizer: Any, scheduler: Any, cfg: TrainConfig, task: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore everything `save_checkpoint` wrote; returns (state, best_state)."""
    if not path.is_file():
        raise PromptTuneError(f"{path}: no checkpoint to resume from")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["prompttune"])
    saved = meta["train_config"]
    for key in ("seed", "batch_size", "lr", "max_steps"):
        if saved[key] != getattr(cfg, key):
            raise PromptTuneError(
                f"{path}: checkpoint was made with {key}={saved[key]!r}, this run has "
                f"{getattr(cfg, key)!r}; resume with the same settings"
            )
    tensors = load_file(str(path))
    saved_model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    _check_same_model(path, meta, saved_model, model)
    check_task(path, meta.get("task"), task)
    model.load_state_dict(saved_model)
    best_state = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            opt_state.setdefault(int(i), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    # LambdaLR.load_state_dict requires "lr_lambdas" (None = a plain function, nothing to restore).
    scheduler.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    torch.set_rng_state(tensors["rng.torch"])
    return meta["state"], best_state
