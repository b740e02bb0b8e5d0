"""What a resumed run must share with the run that wrote its checkpoint, beyond the optimiser's settings.

A checkpoint restores parameters and optimiser state; continuing them on another template, label set or training data
would silently train a different task from the middle. Both loops (soft `train.fit`, discrete `search`) record
`task_record(...)` in their checkpoint and call `check_task` on resume.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import PromptTuneError
from .types import Example


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
