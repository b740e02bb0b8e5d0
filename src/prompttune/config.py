"""Typed configs shared by Python, YAML and the CLI.

Every field carries an attribute docstring; `field_docs` turns those into CLI help, so the three front ends can
never disagree. Each class validates itself in `__post_init__` with a message naming the field.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap
import warnings
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from .errors import PromptTuneError


def _check(ok: bool, field_name: str, expected: str, got: Any) -> None:
    if not ok:
        raise PromptTuneError(f"config field {field_name!r}: expected {expected}, got {got!r}")


@dataclass
class TaskConfig:
    """What the prompt is for: how examples become tokens and how answers are scored."""

    template: str = "{text}{soft}{answer}"
    """Template with `{field}` placeholders for data columns (any column name, e.g. `{Review Text}`), `{soft}` (or
    `{soft:K}`) for soft tokens and `{answer}` where the label is read (causal LMs: the end of the prompt); `{{`/`}}`
    are literal braces. On the command line `\\n` and `\\t` in text flags are a newline and a tab."""
    verbalizer: dict[str, list[str]] | None = None
    """Label -> label word(s), e.g. `{"0": [" negative"], "1": [" positive"]}`; CLI form `'0= negative,1= positive'`
    (`|` separates several words for one label). Multi-token words are scored exactly. Unset: each label's own name
    after a space (`pos` -> `" pos"`), with a warning."""
    head: str = "verbalizer"
    """How answers are scored: `verbalizer` (label words), `classifier` (linear head, PTEC), `generation`, or any
    other registered head (`kpt`: knowledgeable verbalizer, `soft_verbalizer`: learned label embeddings,
    `label_generation`: label names generated under a trie constraint, only known labels come out)."""
    head_config: dict[str, Any] = field(default_factory=dict)
    """Fields of the head's own config dataclass (CLI: the head's own flags, or a JSON object here)."""
    labels: list[str] | None = None
    """Label set for the classifier head (default: the verbalizer's keys, else the labels seen in training data)."""
    multi_label: bool = False
    """Several labels per example: the classifier head uses sigmoid + BCE with a threshold chosen on dev, the
    label_generation head generates a list of labels."""
    pooling: str = "answer"
    """Classifier head: read the hidden state at the answer position (`answer`) or average the tokens (`mean`)."""
    label_field: str | None = None
    """Data column holding the label (default: label/labels/target/answer, whichever exists); a list value (JSON
    list) gives several labels."""
    label_columns: list[str] | None = None
    """Multi-label data as one 0/1 column per label: the column names (they become the label set, in this order),
    or `all` for every column whose values are all 0/1 in the training data; the other columns are text fields."""
    max_length: int | None = None
    """Longest prompt in tokens (default: the backbone's context)."""
    truncate: bool = False
    """Shorten the longest text field instead of failing when a prompt exceeds `max_length`."""
    calibrate: str = "auto"
    """Verbalizer only: `none`, `content_free` (divide by the label-word prior on an empty input), or `auto`
    (use calibration only when it scores better on dev)."""
    max_new_tokens: int = 32
    """Generation head: most tokens to generate."""

    def __post_init__(self) -> None:
        _check(
            "{answer}" in self.template or self.head == "classifier",
            "template",
            "a template containing {answer}",
            self.template,
        )
        heads = _head_names()
        _check(self.head in heads, "head", f"one of {', '.join(heads)}", self.head)
        if isinstance(self.head_config, str):  # the CLI form
            try:
                self.head_config = json.loads(self.head_config)
            except json.JSONDecodeError:
                self.head_config = None  # type: ignore[assignment]  # reported just below
        _check(isinstance(self.head_config, dict), "head_config", "a mapping (JSON object)", self.head_config)
        _check_head_config(self.head, self.head_config)
        _check(self.pooling in ("answer", "mean"), "pooling", "answer or mean", self.pooling)
        _check(
            self.calibrate in ("none", "content_free", "auto"),
            "calibrate",
            "none, content_free or auto",
            self.calibrate,
        )
        if isinstance(self.label_columns, str):  # YAML `label_columns: all` or `a,b`
            self.label_columns = [c.strip() for c in self.label_columns.split(",") if c.strip()]
        _check(
            self.label_columns is None or (len(self.label_columns) > 0 and not self.label_field),
            "label_columns",
            "a non-empty list of 0/1 columns (or `all`), and no label_field next to it",
            self.label_columns,
        )
        if self.verbalizer is not None:
            self.verbalizer = parse_verbalizer(self.verbalizer)
        _check(self.max_length is None or self.max_length > 0, "max_length", "a positive integer", self.max_length)


def _head_names() -> list[str]:
    from . import heads  # noqa: F401  (importing the package registers every head; it does not import config)
    from .registry import HEADS

    return sorted(HEADS)


def _check_head_config(head: str, values: dict[str, Any]) -> None:
    """Validate the head's own options now (the head is built later), naming the head and the field."""
    from .registry import HEADS

    cls = getattr(HEADS[head], "config_cls", None)
    if cls is None:
        _check(not values, "head_config", f"nothing (head {head!r} has no options)", values)
    else:
        build_section(cls, values, f"head {head}")


@dataclass
class TrainConfig:
    """The one training loop's settings (every soft method uses the same loop)."""

    lr: float = 1e-2
    """Peak learning rate for the method's main parameters (methods may declare extra groups, e.g. DePT)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    batch_size: int = 8
    """Examples per training step."""
    eval_batch_size: int = 32
    """Examples per evaluation batch."""
    max_steps: int = 120
    """Optimizer steps in total."""
    warmup_ratio: float = 0.1
    """Fraction of steps with linear warm-up."""
    schedule: str = "linear"
    """Decay after warm-up: `linear`, `cosine` or `constant`."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    eval_every: int = 20
    """Evaluate on dev (and checkpoint) every N steps; the best dev state is kept."""
    patience: int = 0
    """Stop after N evaluations without improvement on dev (0 = never stop early)."""
    seed: int = 13
    """Seed for initialisation and data order."""
    cache_prefix: bool = True
    """Compute the frozen backbone's keys/values for the text before the first soft token once and reuse them
    (only for methods that change nothing before their soft slots)."""
    checkpoint: bool = True
    """Write a resumable checkpoint at every evaluation."""

    def __post_init__(self) -> None:
        _check(self.lr > 0, "lr", "a positive number", self.lr)
        _check(self.batch_size > 0, "batch_size", "a positive integer", self.batch_size)
        _check(self.eval_batch_size > 0, "eval_batch_size", "a positive integer", self.eval_batch_size)
        _check(self.max_steps >= 0, "max_steps", "a non-negative integer", self.max_steps)
        _check(0 <= self.warmup_ratio < 1, "warmup_ratio", "a number in [0, 1)", self.warmup_ratio)
        _check(
            self.schedule in ("linear", "cosine", "constant"), "schedule", "linear, cosine or constant", self.schedule
        )
        _check(self.eval_every > 0, "eval_every", "a positive integer", self.eval_every)
        _check(self.patience >= 0, "patience", "a non-negative integer", self.patience)


@dataclass
class DataConfig:
    """Where the data comes from: a file (TSV/CSV/JSONL) or a directory holding train/dev/test files."""

    train: str | None = None
    """Training file, or a directory with train.* (and dev.*, test.*)."""
    dev: str | None = None
    """Dev file for model selection (default: dev.* next to train, if any)."""
    test: str | None = None
    """Test file scored once at the end (never used for selection)."""


@dataclass
class RunConfig:
    """A whole run: model, method (+ its own config), task, training and data."""

    model: str = "smollm2-135m"
    """Embedded model name (see `prompttune models`), HF model id, or local path."""
    method: str = "prompt_tuning"
    """Registered soft-prompt method."""
    method_config: dict[str, Any] = field(default_factory=dict)
    """Fields of the method's own config dataclass."""
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    out: str | None = None
    """Artifact directory."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config") -> RunConfig:
        """Build from a (YAML) mapping; `method` may be a name or a mapping with `name` plus method fields."""
        raw = dict(raw)
        sections = {"task": TaskConfig, "train": TrainConfig, "data": DataConfig}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise PromptTuneError(f"{where}: unknown key(s) {sorted(unknown)}; expected some of {sorted(known)}")
        method = raw.pop("method", cls.method)
        method_config = dict(raw.pop("method_config", {}) or {})
        if isinstance(method, dict):
            method_config.update({k: v for k, v in method.items() if k != "name"})
            method = method.get("name", cls.method)
        kwargs: dict[str, Any] = {"method": method, "method_config": method_config}
        for key, section_cls in sections.items():
            kwargs[key] = build_section(section_cls, raw.pop(key, {}) or {}, f"{where}: {key}")
        kwargs.update(raw)
        return cls(**kwargs)


def read_yaml_mapping(path: str | Path, what: str = "config sections") -> dict[str, Any]:
    """A YAML file's top-level mapping; errors name the file (and line:column for syntax errors)."""
    path = Path(path)
    if not path.is_file():
        raise PromptTuneError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise PromptTuneError(f"{where}: invalid YAML ({getattr(err, 'problem', None) or err})") from None
    if not isinstance(raw, dict):
        raise PromptTuneError(f"{path}: expected a mapping of {what}, got {type(raw).__name__}")
    return raw


def build_section(cls: type, values: dict[str, Any], where: str) -> Any:
    """Instantiate a config dataclass from a mapping, naming the offending key on error."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise PromptTuneError(f"{where}: unknown key(s) {sorted(unknown)}; expected some of {sorted(names)}")
    kinds = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    values = dict(values)
    for key, value in values.items():
        # PyYAML (YAML 1.1) reads `3e-2` as a string; accept numbers written that way.
        if isinstance(value, str) and kinds.get(key) in ("float", "float | None"):
            try:
                values[key] = float(value)
            except ValueError:
                raise PromptTuneError(f"{where}: field {key!r}: expected a number, got {value!r}") from None
    try:
        return cls(**values)
    except TypeError as err:
        raise PromptTuneError(f"{where}: {err}") from None


def parse_verbalizer(spec: str | dict[Any, Any] | list[Any]) -> dict[str, list[str]]:
    """Normalise a verbalizer to {label: [word, ...]}.

    Accepts `'0= negative,1= positive'` (CLI; `|` separates several words), a mapping label -> word or words, or a
    list of words indexed by label position.
    """
    if isinstance(spec, str):
        out: dict[str, list[str]] = {}
        for part in spec.split(","):
            if "=" not in part:
                raise PromptTuneError(f"verbalizer: expected 'label=word' pairs separated by commas, got {part!r}")
            label, words = part.split("=", 1)
            out[label.strip()] = words.split("|")
        spec = out
    if isinstance(spec, list):
        spec = dict(enumerate(spec))
    result: dict[str, list[str]] = {}
    for label, words in spec.items():
        words = [words] if isinstance(words, str) else list(words)
        if not words or any(not isinstance(w, str) or not w.strip() for w in words):
            raise PromptTuneError(f"verbalizer: label {label!r} needs at least one non-empty word, got {words!r}")
        result[str(label)] = words
    if len(result) < 2 and result:
        raise PromptTuneError(f"verbalizer: expected at least two labels, got {sorted(result)}")
    words = [w for ws in result.values() for w in ws]
    bare = [w for w in words if not w[0].isspace()]
    if bare and len(bare) < len(words):  # `1= positive|good`: the text is taken as typed, so `good` has no space
        warnings.warn(
            f"verbalizer: the words {bare} have no leading space and the others do; after `Sentiment:` a model "
            f"reads ' {bare[0]}' and '{bare[0]}' as different tokens (write the space you mean)",
            stacklevel=2,
        )
    return result


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal right after each field)."""
    docs: dict[str, str] = {}
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return docs
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[union-attr]
    return docs
