"""Discrete-prompt artifacts: the same directory of plain files as soft prompts, with `kind: "discrete"`.

    artifact.json    {"format_version": 1, "kind": "discrete", "method": <optimizer>, "backend": {...}, ...}
    prompt.json      {"text": ..., "demos": ...?, "token_ids": [...]?, "extra": {...}, "template": ...?}
                     (`template`: demonstrations + the task template with `{prompt}` filled, when the prompt has no
                     per-example parts)
    method_config.json  template.json  head.json  run.yaml  metrics.json  [optimizer.safetensors]

`DiscretePrompt.load(dir)` rebuilds the backend from `run.yaml` and scores with the search's own objective, so
`prompttune eval DIR` reproduces the search's test metric.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml
from torch import Tensor

from .. import __version__, artifacts
from ..data.examples import load_examples
from ..data.templates import Template
from ..errors import PromptTuneError
from ..llm.base import BackendConfig, LLMBackend, load_backend
from ..registry import OPTIMIZERS, lookup
from ..types import Example
from .base import Candidate, DiscreteOptimizer
from .objective import LLMObjective


def write_artifact(
    out: Path,
    result: Any,
    config: Any,
    task: Any,
    backend: LLMBackend,
    optimizer: Any,
    labels: list[str],
    run_config: dict[str, Any] | None = None,
) -> Path:
    """Write the artifact of a finished search (atomically; the checkpoint and log next to it are kept)."""
    best: Candidate = result.best
    prompt: dict[str, Any] = best.to_dict()
    tokenizer = getattr(backend, "tokenizer", None)
    if tokenizer is not None:
        prompt["token_ids"] = tokenizer(best.text, add_special_tokens=False)["input_ids"]
    prompt["extra"] = optimizer.export(best)
    per_example = type(optimizer).specializer.__func__ is not DiscreteOptimizer.specializer.__func__
    if not (per_example and prompt["extra"]) and "{hint}" not in best.text:
        # No per-example parts: the whole prompt is one template, which any soft-prompt front end (the server) can
        # run as the manual method. Braces of the searched text are escaped: it is data, not template syntax.
        esc = lambda text: text.replace("{", "{{").replace("}", "}}")  # noqa: E731
        prompt["template"] = esc(best.demos) + task.template.replace("{prompt}", esc(best.text))
    manifest = {
        "format_version": artifacts.FORMAT_VERSION,
        "kind": "discrete",
        "method": optimizer.name,
        "head": "verbalizer",
        "backend": backend.describe(),
        "backbone": {"name": backend.config.model},
        "prompttune_version": __version__,
    }
    run = run_config or {"search": asdict(config), "task": asdict(task), "backend": asdict(backend.config)}
    metrics = {k: getattr(result, k) for k in ("dev", "test", "train", "steps", "calls", "tokens", "seconds")}
    metrics.update(stopped=result.stopped, candidates=result.candidates)
    files: dict[str, Any] = {
        "artifact.json": json.dumps(manifest, indent=2),
        "prompt.json": json.dumps(prompt, indent=2, ensure_ascii=False),
        "method_config.json": json.dumps(asdict(optimizer.config), indent=2),
        "template.json": json.dumps({"template": task.template}, indent=2),
        "head.json": json.dumps(
            {"head": "verbalizer", "labels": labels, "multi_label": False, "words": task.verbalizer}, indent=2
        ),
        "run.yaml": yaml.safe_dump(run, sort_keys=False, allow_unicode=True),
        "metrics.json": json.dumps(metrics, indent=2),
    }
    tensors = optimizer.export_tensors(best)
    if tensors:
        files["optimizer.safetensors"] = tensors
    return artifacts.write_dir_atomically(out, files)


class DiscretePrompt:
    """A loaded discrete prompt: `evaluate`, `predict`, `predict_scores` like `PromptTuner` (through any backend)."""

    def __init__(
        self,
        candidate: Candidate,
        template: Template,
        labels: list[str],
        words: dict[str, list[str]],
        backend: LLMBackend,
        method: str,
        extra: dict[str, Any] | None = None,
        path: str = "",
        label_field: str | None = None,
    ):
        self.candidate = candidate
        self.template = template
        self.labels = labels
        self.words = words
        self.backend = backend
        self.method = method
        self.extra = extra or {}
        self.path = path
        self.label_field = label_field
        self.objective = LLMObjective(backend, template, labels, words, [])
        # Per-example parts (hints, retrieved demonstrations) for new inputs, rebuilt by the optimiser's class.
        specialize = lookup(OPTIMIZERS, method, "optimizer").specializer(self.extra, backend, path)
        if specialize is not None:
            self.objective.specialize = specialize

    @classmethod
    def load(cls, path: str | Path, backbone: Any = None, device: str = "cpu", backend: LLMBackend | None = None):
        """Load an artifact written by `search`; the backend is rebuilt from `run.yaml` unless given.

        Args:
            backbone: an already loaded `Backbone` the hf backend may reuse.
        """
        path = Path(path)
        manifest = artifacts.read_manifest(path)
        if manifest.get("kind") != "discrete":
            raise PromptTuneError(f"{path}/artifact.json: kind {manifest.get('kind')!r}, expected 'discrete'")
        run = yaml.safe_load((path / "run.yaml").read_text()) if (path / "run.yaml").is_file() else {}
        prompt = artifacts.read_json(path / "prompt.json")
        if "text" not in prompt:
            raise PromptTuneError(f"{path}/prompt.json: missing field 'text'")
        head = artifacts.read_json(path / "head.json")
        template = artifacts.read_json(path / "template.json")
        if backend is None:
            cfg = BackendConfig(**(run.get("backend") or {"model": manifest["backbone"]["name"]}))
            extra_kwargs = {"backbone": backbone, "device": device} if cfg.backend == "hf" else {}
            backend = load_backend(cfg, **extra_kwargs)
        label_field = (run.get("task") or {}).get("label_field")
        return cls(
            Candidate.from_dict(prompt),
            Template(template["template"]),
            list(head["labels"]),
            {k: list(v) for k, v in head["words"].items()},
            backend,
            str(manifest.get("method")),
            prompt.get("extra", {}),
            str(path),
            label_field,
        )

    def load_data(self, data: Any, require_label: bool = True) -> list[Example]:
        """Examples read as this prompt reads them (as `PromptTuner.load_data`)."""
        if isinstance(data, (list, tuple)) and len(self.template.fields) == 1:
            data = [{self.template.fields[0]: d} if isinstance(d, str) else d for d in data]
        return load_examples(data, self.label_field, require_label)

    def evaluate(self, data: Any, batch_size: int | None = None) -> dict[str, Any]:
        """Metrics on labelled data (what `prompttune eval` prints)."""
        examples = self.load_data(data)
        return self.objective.score([self.candidate], examples)[0].metrics

    def predict_scores(self, texts: Any) -> Tensor:
        """Class log-probabilities (N, C)."""
        return self.predict_with_scores(texts)[1]

    def predict(self, texts: Any) -> list[str]:
        return self.predict_with_scores(texts)[0]

    def predict_with_scores(self, data: Any) -> tuple[list[str], Tensor, list[str]]:
        """Labels, class log-probabilities (N, C) and their label names, as `PromptTuner.predict_with_scores`."""
        examples = self.load_data(data if isinstance(data, (str, Path)) else list(data), require_label=False)
        scores = self.objective.score([self.candidate], examples)[0].logprobs
        return [self.labels[i] for i in scores.argmax(-1).tolist()], scores, list(self.labels)

    def generate(self, texts: Any, max_new_tokens: int | None = None) -> list[str]:
        """Not offered: a searched prompt is chosen by how it scores label words, not for free text."""
        raise PromptTuneError(
            f"{self.path}: a text prompt found by `search` scores label words; generation needs a soft prompt trained "
            "with --head generation"
        )

    def prompt_texts(self, texts: Any) -> list[str]:
        """The full prompts the LLM reads for these inputs."""
        examples = self.load_data(list(texts), require_label=False)
        return self.objective.prompt_texts(self.candidate, examples)


def read_template(path: str | Path) -> Template:
    """The task template saved with a discrete artifact."""
    spec = artifacts.read_json(Path(path) / "template.json")
    if not isinstance(spec.get("template"), str):
        raise PromptTuneError(f"{path}/template.json: field 'template' must be a string")
    return Template(spec["template"])
