"""Artifacts: a directory of plain files any later process loads without the training code and without executing
anything (safetensors + JSON + YAML, never pickle).

    artifact.json  method_config.json  prompt.safetensors  head.json  head.safetensors  template.json
    run.yaml  metrics.json
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import load_file, save_file

from .errors import PromptTuneError

FORMAT_VERSION = 1
# Every file either kind of artifact (soft, discrete) may hold. On a re-save they belong to the new artifact alone:
# an old head.safetensors (a calibration prior) must not outlive a re-save whose head has no state.
ARTIFACT_FILES = frozenset(
    {
        "artifact.json", "method_config.json", "template.json", "head.json", "head.safetensors", "run.yaml",
        "metrics.json", "prompt.safetensors", "prompt.json", "optimizer.safetensors",
    }
)  # fmt: skip


def _write(target: Path, content: Any, metadata: dict[str, str] | None = None) -> None:
    if isinstance(content, dict):
        tensors = {k: v.detach().contiguous().cpu() for k, v in content.items()}
        save_file(tensors, str(target), metadata=metadata)
    elif isinstance(content, bytes):
        target.write_bytes(content)
    else:
        target.write_text(content, encoding="utf-8")


def write_file_atomically(path: str | Path, content: Any, metadata: dict[str, str] | None = None) -> Path:
    """Write one file (`str`, `bytes`, or a dict of tensors as safetensors with optional string `metadata`) to a
    temp file beside it, then rename: a reader, or a run killed mid-write, sees the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        _write(tmp, content, metadata)
        tmp.chmod(0o644)  # mkstemp makes it owner-only; a shared cache or artifact must stay readable
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_dir_atomically(path: str | Path, files: dict[str, Any], owned: frozenset[str] = ARTIFACT_FILES) -> Path:
    """Write `{name: bytes | str | dict-of-tensors}` into `path` via a temp dir and renames; never half-written.

    `owned` names every file this kind of directory may hold: those not rewritten are dropped, other files (a training
    log, a checkpoint) are kept. Writing a name outside it is refused, so a writer cannot add a file that a later
    re-save without it would leave behind.
    """
    unowned = sorted(set(files) - owned)
    if unowned:
        raise ValueError(f"write_dir_atomically: {unowned} not among the directory's own files {sorted(owned)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; a server run by another user must be able to read the artifact
    try:
        for name, content in files.items():
            _write(tmp / name, content)
        old = None
        if path.exists():
            # Keep files that are not part of the artifact (training log, checkpoint) next to the new ones.
            for extra in path.iterdir():
                if extra.is_file() and extra.name not in owned and not (tmp / extra.name).exists():
                    shutil.copy2(extra, tmp / extra.name)
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def save(
    model: Any, run_config: dict[str, Any], path: str | Path, metrics: dict[str, Any] | None = None, version: str = "0"
) -> Path:
    """Save a PromptModel's trainable state and everything needed to rebuild it."""
    method, head, spec = model.method, model.head, model.backbone.spec
    from dataclasses import asdict

    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": "soft",
        "method": method.name,
        "head": head.name,
        "backbone": {"name": spec.name, **spec.sizes()},
        "prompttune_version": version,
        "num_trainable": method.num_trainable() + sum(p.numel() for p in head.parameters()),
    }
    files: dict[str, Any] = {
        "artifact.json": json.dumps(manifest, indent=2),
        "method_config.json": json.dumps(asdict(method.config), indent=2),
        "prompt.safetensors": dict(method.state_dict()),
        "head.json": json.dumps(head.config(), indent=2),
        "template.json": json.dumps(
            {"template": model.template.text, "max_length": model.max_length, "truncate": model.truncate}, indent=2
        ),
        "run.yaml": yaml.safe_dump(run_config, sort_keys=False),
        "metrics.json": json.dumps(metrics or {}, indent=2),
    }
    head_state = dict(head.state_dict())
    if head_state:
        files["head.safetensors"] = head_state
    return write_dir_atomically(path, files)


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise PromptTuneError(f"{path}: missing; is {path.parent} a prompttune artifact?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PromptTuneError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise PromptTuneError(f"{path}: no such artifact directory")
    manifest = read_json(path / "artifact.json")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise PromptTuneError(
            f"{path}/artifact.json: format_version {manifest.get('format_version')!r} is not "
            f"supported (expected {FORMAT_VERSION})"
        )
    return manifest


def check_backbone(manifest: dict[str, Any], spec: Any, where: str) -> None:
    """Fail with both sizes named when an artifact meets a backbone of other sizes."""
    saved = {k: v for k, v in manifest["backbone"].items() if k != "name"}
    have = spec.sizes()
    diff = {k: (saved[k], have.get(k)) for k in saved if saved[k] != have.get(k)}
    if diff:
        detail = ", ".join(f"{k} {a} vs {b}" for k, (a, b) in diff.items())
        raise PromptTuneError(
            f"{where}: prompt was trained on {manifest['backbone']['name']!r} but the backbone "
            f"{spec.name!r} differs ({detail})"
        )


def load_tensors(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise PromptTuneError(f"{path}: missing")
    return load_file(str(path))
