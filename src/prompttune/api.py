"""`PromptTuner`: the Python front end (the CLI and the server use the same pieces)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from . import __version__, artifacts
from .backbones.base import Backbone, load_backbone
from .config import DataConfig, RunConfig, TaskConfig, TrainConfig, build_section
from .data.examples import detect_label_columns, find_split, load_examples
from .data.templates import Template
from .errors import PromptTuneError
from .evaluation import evaluate
from .methods.base import InitContext
from .model import PromptModel
from .registry import HEADS, METHODS, lookup
from .train import FitResult, fit
from .types import Example

_SECTIONS = {"task": TaskConfig, "train": TrainConfig, "data": DataConfig}


def split_kwargs(method: str, kwargs: dict[str, Any], head: str | None = None) -> dict[str, dict[str, Any]]:
    """Route flat keyword arguments to the config section that declares them (method and head fields included)."""
    method_cls = lookup(METHODS, method, "method")
    owners = {f.name: sec for sec, cls in _SECTIONS.items() for f in dataclasses.fields(cls)}
    method_fields = {f.name for f in dataclasses.fields(method_cls.config_cls)}
    head_cls = lookup(HEADS, head, "head").config_cls if head else None
    head_fields = {f.name for f in dataclasses.fields(head_cls)} if head_cls else set()
    routed: dict[str, dict[str, Any]] = {"task": {}, "train": {}, "data": {}, "method": {}, "head": {}}
    for key, value in kwargs.items():
        if key in method_fields:
            routed["method"][key] = value
        elif key in head_fields:
            routed["head"][key] = value
        elif key in owners:
            routed[owners[key]][key] = value
        else:
            raise PromptTuneError(f"unknown option {key!r} for method {method!r}; see `prompttune train --help`")
    return routed


def make_config(
    model: str = "smollm2-135m", method: str = "prompt_tuning", base: RunConfig | None = None, **kwargs: Any
) -> RunConfig:
    """A RunConfig from flat keyword arguments layered over `base`."""
    raw = base.to_dict() if base else RunConfig(model=model, method=method).to_dict()
    raw["model"], raw["method"] = model, method
    if base and base.method != method:
        raw["method_config"] = {}
    head = kwargs.get("head", raw["task"]["head"])
    if head != raw["task"]["head"]:
        raw["task"]["head_config"] = {}
    routed = split_kwargs(method, kwargs, head)
    for sec in _SECTIONS:
        raw[sec].update(routed[sec])
    raw["method_config"].update(routed["method"])
    raw["task"]["head_config"] = {**raw["task"]["head_config"], **routed["head"]}
    if raw["task"].get("verbalizer") is None:
        raw["task"].pop("verbalizer")
    return RunConfig.from_dict(raw)


def resolve_labels(task: TaskConfig, train: Sequence[Example] | None) -> list[str]:
    if task.labels:
        return [str(label) for label in task.labels]
    if task.verbalizer:
        return list(task.verbalizer)
    if task.label_columns and task.label_columns != ["all"]:
        return list(task.label_columns)
    if train:
        seen = {v for ex in train for v in (ex.label if isinstance(ex.label, tuple) else (ex.label,))}
        return sorted(seen, key=lambda v: (len(v), v))
    return []


def build_model(
    cfg: RunConfig, backbone: Backbone, labels: Sequence[str], saved_head: dict[str, Any] | None = None
) -> PromptModel:
    """Instantiate method, head and template for a backbone (random state; call `initialize` for a new run).

    `saved_head` is an artifact's head.json: heads whose structure was derived from data rebuild from it.
    """
    method_cls = lookup(METHODS, cfg.method, "method")
    method_cfg = build_section(method_cls.config_cls, cfg.method_config, f"method {cfg.method}")
    head_cls = lookup(HEADS, cfg.task.head, "head")
    method = method_cls(method_cfg, backbone.spec)
    if saved_head is None:
        head = head_cls.from_task(cfg.task, backbone, labels)
    else:
        head = head_cls.from_saved(saved_head, cfg.task, backbone, labels)
    template = Template(cfg.task.template, require_answer=backbone.kind == "causal_lm")
    model = PromptModel(backbone, method, head, template, cfg.task.max_length, cfg.task.truncate)
    return model.to(backbone.device)


def init_context(model: PromptModel, seed: int, hint: str, train: Sequence[Example] = ()) -> InitContext:
    """What `method.initialize` sees: the tokenizer, a generator seeded by the run, frozen prefixes (causal LMs), and
    the training examples with `model.represent` for data-dependent methods (BayesPrompt)."""
    backbone = model.backbone
    prefix_kv = None
    if backbone.supports_prefix_cache:

        def prefix_kv(ids: list[int]) -> torch.Tensor:
            return backbone.encode_prefixes([ids])[0]

    generator = torch.Generator().manual_seed(seed)
    return InitContext(backbone.tokenizer, generator, hint, prefix_kv, tuple(train), model.represent)


def hint_text(cfg: RunConfig) -> str:
    """Default text for `init=text`: blank (space) tokens.

    The initial prompt should keep the template's zero-shot behaviour, because best-on-dev selection starts from it.
    Measured on SST-2 with SmolLM2-135M, 16 soft tokens after the review, no training (200 test sentences): spaces
    79%, newlines 76%, an instruction naming the label words cycled to 16 tokens 54%, sampled vocabulary 57%, versus
    82% for the template without soft tokens.
    """
    return " "


class PromptTuner:
    """Learn a prompt for a frozen model.

    Example:
        >>> tuner = PromptTuner(model="smollm2-135m", method="prompt_tuning", num_virtual_tokens=16,
        ...                     template="Review: {text}\\n{soft}Sentiment:{answer}",
        ...                     verbalizer={0: " negative", 1: " positive"})
        >>> tuner.fit("train.tsv", "dev.tsv"); tuner.evaluate("test.tsv")
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        method: str = "prompt_tuning",
        *,
        config: RunConfig | None = None,
        backbone: Backbone | None = None,
        device: str = "cpu",
        **kwargs: Any,
    ):
        self.config = make_config(model, method, base=config, **kwargs) if (kwargs or not config) else config
        self._backbone = backbone
        self.device = device
        self.model: PromptModel | None = None
        self.result: FitResult | None = None

    @property
    def backbone(self) -> Backbone:
        if self._backbone is None:
            self._backbone = load_backbone(self.config.model, self.device)
        return self._backbone

    @property
    def template(self) -> Template:
        return self._require_model().template

    def load_data(self, data: Any, require_label: bool = True) -> list[Example]:
        """Examples read as this prompt reads them (label field, label columns; a plain string fills the template's
        only field)."""
        if data is None:
            return []
        fields = list(dict.fromkeys(self.model.template.fields)) if self.model else []
        if isinstance(data, (list, tuple)) and len(fields) == 1:  # a plain string fills the template's only field
            data = [{fields[0]: d} if isinstance(d, str) else d for d in data]
        task = self.config.task
        return load_examples(data, task.label_field, require_label, task.label_columns)

    def fit(
        self,
        train: Any = None,
        dev: Any = None,
        *,
        out: str | Path | None = None,
        resume: bool = False,
        quiet: bool = False,
    ) -> FitResult:
        """Train on `train`, select on `dev` (files, directories, lists of dicts or Datasets)."""
        cfg = self.config
        train = train if train is not None else cfg.data.train
        if train is None:
            raise PromptTuneError("no training data: pass train= or set data.train")
        if dev is None and cfg.data.dev:
            dev = cfg.data.dev
        if dev is None and isinstance(train, (str, Path)) and Path(train).is_dir():
            dev = find_split(train, "dev")
        if cfg.task.label_columns == ["all"]:
            # Fix the columns on the training data: every split, and the saved run.yaml, then use the same label set.
            cfg.task.label_columns = detect_label_columns(train)
        train_ex, dev_ex = self.load_data(train), self.load_data(dev)
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg, self.backbone, resolve_labels(cfg.task, train_ex))
        self.model.method.initialize(init_context(self.model, cfg.train.seed, hint_text(cfg), train_ex))
        out = out or cfg.out
        tic = time.perf_counter()
        self.result = fit(self.model, train_ex, dev_ex, cfg.train, out, resume, quiet, cfg.task.calibrate)
        self.result.seconds_total = time.perf_counter() - tic  # type: ignore[attr-defined]
        return self.result

    def _require_model(self) -> PromptModel:
        if self.model is None:
            raise PromptTuneError("no prompt yet: call fit() or PromptTuner.load() first")
        return self.model

    def evaluate(self, data: Any, batch_size: int | None = None) -> dict[str, Any]:
        """Metrics on labelled data, e.g. `{"accuracy": .., "macro_f1": .., "primary_metric": "accuracy"}`."""
        return evaluate(self._require_model(), self.load_data(data), batch_size or self.config.train.eval_batch_size)

    def predict(self, texts: Sequence[str | dict[str, str]], batch_size: int | None = None) -> list[Any]:
        """Labels for raw texts (or dicts of fields)."""
        model = self._require_model()
        examples = self.load_data(list(texts), require_label=False)
        if not model.head.is_classifier:  # text heads: the generation, or the labels it names
            return [model.head.parse(text) for text in model.generate(examples, batch_size or 16)]
        return model.head.decide(model.scores(examples, batch_size or self.config.train.eval_batch_size))

    def predict_scores(self, texts: Sequence[str | dict[str, str]]) -> torch.Tensor:
        """Class scores (N, C) (log-probabilities for the verbalizer, logits for the classifier head)."""
        model = self._require_model()
        return model.scores(self.load_data(list(texts), require_label=False), self.config.train.eval_batch_size)

    def predict_with_scores(self, data: Any) -> tuple[list[Any], torch.Tensor | None, list[str]]:
        """Labels, class scores (N, C) with their label names (no scores for text heads), for texts, dicts of fields,
        `Example`s or a data file (a label column is allowed and ignored)."""
        model = self._require_model()
        examples = self.load_data(data if isinstance(data, (str, Path)) else list(data), require_label=False)
        if not model.head.is_classifier:
            return self.predict(examples), None, []
        scores = model.scores(examples, self.config.train.eval_batch_size)
        return model.head.decide(scores), scores, list(model.head.labels)

    def generate(self, texts: Sequence[str | dict[str, str]], max_new_tokens: int | None = None) -> list[str]:
        """Greedy generations for raw texts.

        Raises:
            PromptTuneError: the backbone is an encoder (it does not generate).
        """
        model = self._require_model()
        if self.backbone.kind != "causal_lm":
            raise PromptTuneError(f"generation needs a causal LM; {self.config.model} is an encoder")
        return model.generate(self.load_data(list(texts), require_label=False), max_new_tokens=max_new_tokens)

    def save(self, path: str | Path, metrics: dict[str, Any] | None = None) -> Path:
        """Write the artifact directory (atomically)."""
        return artifacts.save(self._require_model(), self.config.to_dict(), path, metrics, __version__)

    @classmethod
    def load(cls, path: str | Path, backbone: Backbone | None = None, device: str = "cpu") -> PromptTuner:
        """Load an artifact; the backbone is rebuilt from its recorded name unless given."""
        path = Path(path)
        manifest = artifacts.read_manifest(path)
        if manifest.get("kind") == "discrete":  # a text prompt found by `prompttune search`
            from .discrete.artifact import DiscretePrompt

            return DiscretePrompt.load(path, backbone, device)  # type: ignore[return-value]
        raw = yaml.safe_load((path / "run.yaml").read_text()) if (path / "run.yaml").is_file() else {}
        cfg = RunConfig.from_dict(raw, where=str(path / "run.yaml"))
        cfg.method_config = artifacts.read_json(path / "method_config.json")
        head_cfg = artifacts.read_json(path / "head.json")
        tuner = cls(config=cfg, backbone=backbone, device=device)
        artifacts.check_backbone(manifest, tuner.backbone.spec, str(path))
        tuner.model = build_model(cfg, tuner.backbone, head_cfg.get("labels", []), head_cfg)
        state = artifacts.load_tensors(path / "prompt.safetensors")
        try:
            tuner.model.method.load_state_dict(state)
            if (path / "head.safetensors").is_file():
                tuner.model.head.load_state_dict(artifacts.load_tensors(path / "head.safetensors"))
        except RuntimeError as err:
            raise PromptTuneError(
                f"{path}: saved tensors do not fit method {cfg.method!r}: {str(err).splitlines()[0]}"
            ) from None
        tuner.model.to(tuner.backbone.device)
        return tuner
