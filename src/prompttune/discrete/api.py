"""`prompttune.search(...)`: discrete prompt search from Python with flat keyword arguments (the CLI uses the same
routing), e.g.

    >>> from prompttune import search
    >>> result = search("data/sst-2/16-shot/16-13", test="data/sst-2/16-shot/test.tsv", backend="hf",
    ...                 model="smollm2-135m", optimizer="promptquine", budget=2000, out="runs/pq",
    ...                 template="Review: {text}\\n{prompt}Sentiment:{answer}", verbalizer="0= negative,1= positive")
    >>> result.best.to_dict(), result.test

or from a YAML file laid out like the `run.yaml` every search artifact holds (so a finished search can be rerun
as it was, or edited and rerun): `search(**read_search_config("configs/search/sst2_promptquine.yaml"))`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..config import DataConfig, TaskConfig, build_section, read_yaml_mapping
from ..data.examples import find_split, load_examples
from ..errors import PromptTuneError
from ..llm.base import BackendConfig, LLMBackend, load_backend
from ..registry import OPTIMIZERS, lookup
from .config import SearchConfig, SearchResult
from .loop import search as run_loop

# Task fields that mean something to a discrete search (the rest belong to soft prompts).
TASK_FIELDS = ("template", "verbalizer", "label_field", "max_length", "truncate")
SECTIONS = {"search": SearchConfig, "backend": BackendConfig, "task": TaskConfig, "data": DataConfig}
_SKIP = {"optimizer_config"}


def route(optimizer: str, kwargs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Send each flat option to the section declaring it; the optimiser's own fields win over section fields."""
    opt_cls = lookup(OPTIMIZERS, optimizer, "optimizer")
    owners: dict[str, str] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.name not in _SKIP and (section != "task" or f.name in TASK_FIELDS):
                owners.setdefault(f.name, section)
    opt_fields = {f.name for f in dataclasses.fields(opt_cls.config_cls)}
    routed: dict[str, dict[str, Any]] = {"optimizer": {}, **{s: {} for s in SECTIONS}}
    for key, value in kwargs.items():
        if key in opt_fields:
            routed["optimizer"][key] = value
        elif key in owners:
            routed[owners[key]][key] = value
        else:
            raise PromptTuneError(f"unknown option {key!r} for optimizer {optimizer!r}; see `prompttune search --help`")
    return routed


def search(
    train: Any = None,
    dev: Any = None,
    test: Any = None,
    *,
    optimizer: str = "random",
    out: str | Path | None = None,
    resume: bool = False,
    quiet: bool = True,
    llm: LLMBackend | None = None,
    proposer: LLMBackend | None = None,
    **kwargs: Any,
) -> SearchResult:
    """Search a discrete prompt and (with `out`) write its artifact.

    Args:
        train, dev, test: files, a directory with train/dev/test files, or lists of dicts; `dev` and `test` default
            to `dev.*`/`test.*` next to a training directory.
        optimizer: a registered optimiser (`random`, `icl`, `promptquine`, `opro`, `manual`, ...).
        llm: an already built task backend (default: built from `backend`, `model`, ... options).
        proposer: an already built proposer backend (OPRO; default: `proposer_model`, else the task model).
        **kwargs: fields of `SearchConfig`, `BackendConfig`, the task (`template`, `verbalizer`, ...) and the
            optimiser's config, flat; `optimizer_config` may also be given as one mapping.
    """
    base = kwargs.pop("optimizer_config", None) or {}  # a mapping (YAML); flat optimiser options override it
    routed = route(optimizer, {**kwargs, "optimizer": optimizer})
    routed["search"]["optimizer_config"] = {**base, **routed.pop("optimizer")}
    config = build_section(SearchConfig, routed["search"], "search")
    task = build_section(TaskConfig, routed["task"], "task")
    data = build_section(DataConfig, routed["data"], "data")
    train = train if train is not None else data.train
    if train is None:
        raise PromptTuneError("no training data: pass train= (or --train)")
    dev = dev if dev is not None else data.dev
    test = test if test is not None else data.test
    if isinstance(train, (str, Path)) and Path(train).is_dir():
        dev = dev if dev is not None else find_split(train, "dev")
        test = test if test is not None else find_split(train, "test")
    label_field = task.label_field
    train_ex = load_examples(train, label_field)
    dev_ex = load_examples(dev, label_field) if dev is not None else []
    test_ex = load_examples(test, label_field) if test is not None else None
    backend_cfg = build_section(BackendConfig, routed["backend"], "backend")
    backend = llm or load_backend(backend_cfg)
    if proposer is None and config.proposer_model:
        proposer = load_backend(dataclasses.replace(backend_cfg, model=config.proposer_model), backend.budget)
    run = {
        "search": asdict(config),
        "backend": asdict(backend.config),
        "task": asdict(task),
        "data": {"train": _name(train), "dev": _name(dev), "test": _name(test)},
    }
    return run_loop(config, task, backend, train_ex, dev_ex, test_ex, out, resume, quiet, proposer, run)


def read_search_config(path: str | Path) -> dict[str, Any]:
    """`search()` keyword arguments from a YAML file with the sections of an artifact's `run.yaml`.

    Sections: `search` (`SearchConfig`, with `optimizer` and its `optimizer_config`), `backend` (`BackendConfig`),
    `task` (template, verbalizer, label_field, max_length, truncate), `data` (train/dev/test paths) and an optional
    top-level `out`. The other task fields a `run.yaml` lists (head, pooling, ...) mean nothing to a discrete search:
    they are accepted at their defaults and refused otherwise. Unknown keys are errors naming the file and section.
    """
    raw = read_yaml_mapping(path, "sections (search, backend, task, data)")
    known = {*SECTIONS, "out"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise PromptTuneError(f"{path}: unknown section(s) {unknown}; expected some of {sorted(known)}")
    out: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        values = raw.get(section) or {}
        if not isinstance(values, dict):
            raise PromptTuneError(f"{path}: section {section!r}: expected a mapping, got {type(values).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in values.items():
            where = f"{path}: {section}.{key}"
            if key not in fields:
                raise PromptTuneError(f"{where}: unknown key; expected some of {sorted(fields)}")
            if section == "task" and key not in TASK_FIELDS:
                if value != _default(fields[key]):
                    raise PromptTuneError(f"{where}: a discrete search does not use it (only {', '.join(TASK_FIELDS)})")
                continue
            if key == "optimizer_config" and not isinstance(value, dict):
                raise PromptTuneError(f"{where}: expected a mapping of the optimiser's fields")
            if section == "data" and value == "<memory>":  # a run.yaml of a search given in-memory rows
                raise PromptTuneError(f"{where}: the search used in-memory data; give a file path")
            out[key] = value
    if raw.get("out") is not None:
        out["out"] = str(raw["out"])
    return out


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _name(data: Any) -> str | None:
    return str(data) if isinstance(data, (str, Path)) else (None if data is None else "<memory>")
