"""The prompts a server holds: every artifact over the one shared backbone, addressed as `"<backbone>:<name>"`.

Soft artifacts load through `PromptTuner.load(path, backbone=shared)`; discrete artifacts (`artifact.json` kind
`"discrete"`, the searched text in `prompt.json`) become the manual method plus their template with `{prompt}` filled.
The bare backbone is a prompt too: the manual method, template `{text}{answer}`, no head.

Loading reads only JSON, YAML and safetensors (never pickle), and a hot load (POST /v1/prompts) only from the
configured directories: the path is resolved (symlinks and `..` included) and must lie inside one of them.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import artifacts
from ..backbones.base import Backbone
from ..config import TaskConfig
from ..data.templates import Prompt, Template
from ..errors import PromptTuneError
from ..heads.base import Head
from ..methods.manual import Manual, ManualConfig
from ..model import PromptModel
from ..registry import HEADS, lookup
from ..types import Example
from .protocol import APIError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(eq=False)
class LoadedPrompt:
    """One servable prompt. Identity (not name) keys batches, so a prompt unloaded mid-request finishes cleanly."""

    name: str  # "" for the bare backbone
    model: PromptModel
    kind: str  # "soft" | "discrete" | "none"
    path: str | None = None
    text: str = ""  # a discrete prompt's searched text (fills `{prompt}`)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def method(self):
        return self.model.method

    @property
    def head(self) -> Head:
        return self.model.head

    @property
    def classifies(self) -> bool:
        return bool(self.model.head.is_classifier and self.model.head.labels)

    def model_id(self, backbone: str) -> str:
        return f"{backbone}:{self.name}" if self.name else backbone

    def encode(self, value: str | dict[str, str], max_tokens: int, where: str) -> Prompt:
        """A request's text (fills the template's first field) or fields -> token ids and soft slots.

        Raises:
            APIError: 400 when a template field is missing or the prompt is longer than `max_tokens`.
        """
        model = self.model
        fields = value if isinstance(value, dict) else {model.template.fields[0]: value}
        example = Example(fields=dict(fields), source=where)
        limit = min(max_tokens, model.max_length)
        tok, pad = model.backbone.tokenizer, model.backbone.pad_id
        try:
            return model.template.encode(
                example, tok, model.method.num_soft_slots, limit, model.truncate, pad, model.backbone.kind == "encoder"
            )
        except PromptTuneError as err:
            code = "context_length_exceeded" if "longer than" in str(err) else "invalid_value"
            raise APIError(400, str(err), param="prompt", code=code) from None


class PromptRegistry:
    """Name -> LoadedPrompt over one backbone; thread-safe (the event loop loads, the engine reads)."""

    def __init__(self, backbone: Backbone, allowed_dirs: list[str | Path] = ()):
        self.backbone = backbone
        self.backbone_name = backbone.spec.name
        self.allowed = [Path(d).resolve() for d in allowed_dirs]
        self.bare = LoadedPrompt("", _bare_model(backbone), "none")
        self._prompts: dict[str, LoadedPrompt] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._prompts)

    def all(self) -> list[LoadedPrompt]:
        with self._lock:
            return sorted(self._prompts.values(), key=lambda p: p.name)

    def get(self, model: str) -> LoadedPrompt:
        """`"<backbone>"` -> the bare backbone, `"<backbone>:<name>"` -> that prompt.

        Raises:
            APIError: 404 naming the models that exist.
        """
        if model == self.backbone_name:
            return self.bare
        name = model[len(self.backbone_name) + 1 :] if model.startswith(self.backbone_name + ":") else None
        with self._lock:
            found = self._prompts.get(name) if name is not None else None
            known = [self.backbone_name] + [p.model_id(self.backbone_name) for p in self._prompts.values()]
        if found is None:
            shown = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
            raise APIError(
                404,
                f"model {model!r} does not exist; this server has: {shown} (GET /v1/models lists them)",
                type="not_found_error",
                param="model",
                code="model_not_found",
            )
        return found

    def check_name(self, name: str) -> str:
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise APIError(
                400,
                f"prompt name {name!r} is invalid: use 1-64 letters, digits, '.', '_' or '-', starting with a "
                "letter or digit",
                param="name",
                code="invalid_value",
            )
        return name

    def resolve(self, raw: str) -> Path:
        """An artifact directory inside an allowed directory (relative paths are tried against each of them).

        Raises:
            APIError: 403 outside every allowed directory (or none is configured), 404 when there is no artifact.
        """
        if not self.allowed:
            raise APIError(403, "hot loading is off: start the server with --prompt-dirs", type="permission_error")
        given = Path(raw)
        candidates = [given] if given.is_absolute() else [d / given for d in self.allowed]
        for candidate in candidates:
            try:
                real = candidate.resolve()  # symlinks and `..` resolved, whether or not the target exists
            except (OSError, RuntimeError):
                continue
            if not any(real == d or real.is_relative_to(d) for d in self.allowed):
                raise APIError(
                    403,
                    f"path {raw!r} is outside the allowed prompt directories",
                    type="permission_error",
                    param="path",
                    code="path_not_allowed",
                )
            if (real / "artifact.json").is_file():
                return real
        raise APIError(404, f"no prompttune artifact at {raw!r}", type="not_found_error", param="path")

    def load(self, path: str | Path, name: str | None = None, *, check_dir: bool = True) -> LoadedPrompt:
        """Load an artifact under `name` (default: its directory's name). `check_dir=False` for startup prompts,
        which the operator named on the command line.

        Raises:
            APIError: bad name (400), path not allowed (403), missing (404), name taken (409), bad artifact (422).
        """
        real = self.resolve(str(path)) if check_dir else Path(path).resolve()
        name = self.check_name(name if name is not None else real.name)
        with self._lock:
            if name in self._prompts:
                raise APIError(409, f"a prompt named {name!r} is already loaded", param="name", code="name_taken")
        try:
            prompt = load_prompt(real, name, self.backbone)
        except Exception as err:  # noqa: BLE001 - an artifact is user data: any failure to read it is the user's
            detail = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise APIError(422, f"cannot load {real.name!r}: {detail}", param="path", code="invalid_artifact") from None
        with self._lock:
            if name in self._prompts:
                raise APIError(409, f"a prompt named {name!r} is already loaded", param="name", code="name_taken")
            self._prompts[name] = prompt
        return prompt

    def unload(self, name: str) -> LoadedPrompt:
        with self._lock:
            prompt = self._prompts.pop(name, None)
        if prompt is None:
            raise APIError(404, f"no prompt named {name!r} is loaded", type="not_found_error", param="name")
        return prompt


def load_prompt(path: Path, name: str, backbone: Backbone) -> LoadedPrompt:
    """Read one artifact directory (soft or discrete) onto the shared backbone."""
    manifest = artifacts.read_manifest(path)
    kind = manifest.get("kind", "soft")
    if kind == "discrete":
        return _load_discrete(path, name, backbone, manifest)
    if kind != "soft":
        raise PromptTuneError(f"{path}/artifact.json: unknown kind {kind!r} (expected soft or discrete)")
    from ..api import PromptTuner

    tuner = PromptTuner.load(path, backbone=backbone)
    assert tuner.model is not None
    tuner.model.eval()
    return LoadedPrompt(name, tuner.model, "soft", str(path))


def _load_discrete(path: Path, name: str, backbone: Backbone, manifest: dict[str, Any]) -> LoadedPrompt:
    """A text prompt: the manual method, the template with `{prompt}` replaced by the searched text."""
    saved = manifest.get("backbone")
    if isinstance(saved, dict) and {"hidden_size", "vocab_size"} <= saved.keys():
        artifacts.check_backbone(manifest, backbone.spec, str(path))  # text prompts are tokenised for one vocabulary
    prompt = artifacts.read_json(path / "prompt.json")
    text = prompt.get("text")
    if not isinstance(text, str):
        raise PromptTuneError(f"{path}/prompt.json: field 'text' must be a string")
    spec = artifacts.read_json(path / "template.json")
    head_cfg = artifacts.read_json(path / "head.json")
    template = spec.get("template")
    if not isinstance(template, str):
        raise PromptTuneError(f"{path}/template.json: field 'template' must be a string")
    filled = prompt.get("template")  # the whole prompt (demonstrations included), already escaped by the search
    if not isinstance(filled, str):
        if prompt.get("demos") or prompt.get("extra") or "{hint}" in text:
            # Per-example parts (retrieved demonstrations, hints written by a policy) need the search's optimiser at
            # prediction time; serving only the text would silently answer a different prompt.
            raise PromptTuneError(
                f"{path}/prompt.json: this prompt has per-example parts (demos/hints) and no filled 'template'; "
                "score it with `prompttune eval` instead of serving it"
            )
        literal = text.replace("{", "{{").replace("}", "}}")  # the text is data, not template syntax
        filled = template.replace("{prompt}", literal)
    labels = [str(label) for label in head_cfg.get("labels", [])]
    task = TaskConfig(
        template=filled,
        head=head_cfg.get("head", "verbalizer"),
        verbalizer=head_cfg.get("words"),
        labels=labels or None,
        multi_label=bool(head_cfg.get("multi_label", False)),
        max_length=spec.get("max_length"),
        truncate=bool(spec.get("truncate", False)),
    )
    head = lookup(HEADS, task.head, "head").from_task(task, backbone, labels)
    if (path / "head.safetensors").is_file():  # calibration prior, thresholds
        head.load_state_dict(artifacts.load_tensors(path / "head.safetensors"), strict=False)
    method = Manual(ManualConfig(), backbone.spec)
    tmpl = Template(filled, require_answer=backbone.kind == "causal_lm")
    model = PromptModel(backbone, method, head, tmpl, task.max_length, task.truncate).to(backbone.device).eval()
    return LoadedPrompt(name, model, "discrete", str(path), text=text)


def _bare_model(backbone: Backbone) -> PromptModel:
    """The backbone without a prompt: raw text in, continuation out."""
    method = Manual(ManualConfig(), backbone.spec)
    template = Template("{text}{answer}", require_answer=backbone.kind == "causal_lm")
    return PromptModel(backbone, method, Head([], backbone.kind), template).eval()
