"""Shared fixtures: tiny in-process backbones (nothing downloads), small SST-style data, and builders for a
`PromptTuner` or an initialised `PromptModel` of any registered method."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch

from prompttune import PromptTuner
from prompttune.api import build_model, hint_text, init_context, make_config
from prompttune.backbones import Backbone, load_backbone
from prompttune.data.examples import load_examples
from prompttune.model import PromptModel
from prompttune.registry import METHODS, lookup

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's barriers turn every 32-wide
# matmul into a ~20 ms wait (measured: 1 thread is ~1000x faster there). The slow real-model tests use 2 threads.
torch.set_num_threads(1)

SINGLE_WORDS = {"0": [" negative"], "1": [" positive"]}
# " superb" and " awful" are several BPE pieces in the tiny tokenizer; " bad" is one: a class may mix lengths.
MULTI_WORDS = {"0": [" awful", " bad"], "1": [" superb"]}

# Short, long and in-between sentences so batches always mix lengths (left padding is exercised).
SST_TRAIN = [
    {"text": "a great movie with a great cast .", "label": "1"},
    {"text": "the plot was bad and the ending was worse .", "label": "0"},
    {"text": "good fun .", "label": "1"},
    {"text": "terrible .", "label": "0"},
    {"text": "the story starts slowly , but the second half is strong and the final scene is moving .", "label": "1"},
    {"text": "i hated it ... the worst film i have seen in years .", "label": "0"},
    {"text": "we watched the movie with friends and talked about it for a long time .", "label": "1"},
    {"text": "not good , not bad , just a bad movie .", "label": "0"},
]
SST_DEV = [
    {"text": "this film was great .", "label": "1"},
    {"text": "a bad film .", "label": "0"},
    {"text": "one of the best movies of the year ; great music , great jokes .", "label": "1"},
    {"text": "do not watch it .", "label": "0"},
]
GEN_TRAIN = [{"text": r["text"], "label": "positive" if r["label"] == "1" else "negative"} for r in SST_TRAIN]


@pytest.fixture(scope="session")
def tiny_llama() -> Backbone:
    return load_backbone("tiny-llama")


@pytest.fixture(scope="session")
def tiny_gpt2() -> Backbone:
    return load_backbone("tiny-gpt2")


@pytest.fixture(scope="session")
def tiny_bert() -> Backbone:
    return load_backbone("tiny-bert")


@pytest.fixture(scope="session")
def backbones(tiny_llama: Backbone, tiny_gpt2: Backbone, tiny_bert: Backbone) -> dict[str, Backbone]:
    return {"tiny-llama": tiny_llama, "tiny-gpt2": tiny_gpt2, "tiny-bert": tiny_bert}


@pytest.fixture(scope="session")
def sst_train() -> list[dict[str, str]]:
    return [dict(r) for r in SST_TRAIN]


@pytest.fixture(scope="session")
def sst_dev() -> list[dict[str, str]]:
    return [dict(r) for r in SST_DEV]


@pytest.fixture(scope="session")
def gen_train() -> list[dict[str, str]]:
    """SST rows whose labels are text targets ("positive"/"negative") for the generation head."""
    return [dict(r) for r in GEN_TRAIN]


@pytest.fixture(scope="session")
def multi_words() -> dict[str, list[str]]:
    return {k: list(v) for k, v in MULTI_WORDS.items()}


def method_options(method: str, **overrides: Any) -> dict[str, Any]:
    """Small, fast settings for any registered method: 4 soft tokens where the method has them."""
    fields = {f.name for f in dataclasses.fields(lookup(METHODS, method, "method").config_cls)}
    options = {"num_virtual_tokens": 4} if "num_virtual_tokens" in fields else {}
    if "max_positions" in fields:
        options["max_positions"] = 64
    options.update({k: v for k, v in overrides.items() if k in fields})
    return options


def task_options(backbone: Backbone, head: str | None, template: str | None, verbalizer: Any) -> dict[str, Any]:
    if head is None:
        head = "verbalizer" if backbone.kind == "causal_lm" else "classifier"
    if template is None:
        template = "Review: {text}{soft} Sentiment:{answer}" if backbone.kind == "causal_lm" else "Review: {text}{soft}"
    options: dict[str, Any] = {"head": head, "template": template}
    if head == "verbalizer":
        options["verbalizer"] = verbalizer or SINGLE_WORDS
    elif head == "classifier":
        options["labels"] = ["0", "1"]
    return options


def _make_tuner(
    method: str,
    backbone: Backbone,
    *,
    head: str | None = None,
    template: str | None = None,
    verbalizer: Any = None,
    **kwargs: Any,
) -> PromptTuner:
    train = {"max_steps": 3, "batch_size": 4, "eval_every": 3, "lr": 0.05, "calibrate": "none"}
    train.update(kwargs)
    method_kw = method_options(method, **train)
    rest = {k: v for k, v in train.items() if k not in method_kw}
    return PromptTuner(
        backbone.spec.name,
        method,
        backbone=backbone,
        **task_options(backbone, head, template, verbalizer),
        **method_kw,
        **rest,
    )


def perturb(module: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    """Add Gaussian noise to every parameter, so no prompt is trivially zero (zero-initialised parts included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)


def _make_model(
    method: str,
    backbone: Backbone,
    *,
    head: str | None = None,
    template: str | None = None,
    verbalizer: Any = None,
    noise: float = 0.2,
    seed: int = 0,
    **method_kw: Any,
) -> PromptModel:
    """A freshly initialised PromptModel whose method (and head) parameters carry random noise."""
    cfg = make_config(
        backbone.spec.name,
        method,
        **task_options(backbone, head, template, verbalizer),
        **method_options(method, **method_kw),
    )
    labels = list(cfg.task.verbalizer) if cfg.task.verbalizer else list(cfg.task.labels or [])
    with torch.random.fork_rng(devices=[]):  # modules with default init (p-tuning's encoder) draw from the global RNG
        torch.manual_seed(seed)
        model = build_model(cfg, backbone, labels)
    # The SST rows stand in for the training split, so data-dependent initialisation (BayesPrompt) runs here too.
    model.method.initialize(init_context(model, seed, hint_text(cfg), load_examples(SST_TRAIN)))
    if noise:
        perturb(model.method, seed + 1, noise)
        perturb(model.head, seed + 2, noise)
    return model


@pytest.fixture(scope="session")
def make_tuner() -> Callable[..., PromptTuner]:
    """`make_tuner(method, backbone, head=None, template=None, verbalizer=None, **train_or_method_options)`."""
    return _make_tuner


@pytest.fixture(scope="session")
def make_model() -> Callable[..., PromptModel]:
    """`make_model(method, backbone, head=None, template=None, verbalizer=None, noise=0.2, seed=0, **method_kw)`."""
    return _make_model


def prompt_inputs(backbone: Backbone, rows: Any, hook: Any = None) -> Any:
    """Collated rows as the backbone runs them, with an optional per-layer hook (tests of the layer seam)."""
    from prompttune.data.collate import collate

    return backbone.inputs(collate(rows, backbone.pad_id)).replace(layer_hook=hook)
