"""Evaluation: one dict of floats plus the name of the metric that model selection maximises
(sentence-transformers' evaluator convention)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..types import Example
from . import metrics


def evaluate(model: Any, examples: Sequence[Example], batch_size: int = 32) -> dict[str, Any]:
    """Score a PromptModel on labelled examples.

    Returns:
        metrics, e.g. `{"accuracy": 0.91, "macro_f1": 0.90, "primary_metric": "accuracy"}`.
    """
    head = model.head
    if not head.is_classifier and head.labels:  # a text head over a label set: its generations name labels
        head.encode_labels(examples)
        pred = [head.parse(text) for text in model.generate(examples, batch_size=batch_size)]
        return label_metrics(head, examples, pred)
    if not head.is_classifier:
        pred = model.generate(examples, batch_size=batch_size)
        gold = [str(ex.label) for ex in examples]
        return {**metrics.text_metrics(gold, pred), "primary_metric": "exact_match"}
    head.encode_labels(examples)  # fails early, naming the row, on a label the head does not cover
    scores = model.scores(examples, batch_size)
    return score_metrics(head, examples, scores)


def score_metrics(head: Any, examples: Sequence[Example], scores: torch.Tensor) -> dict[str, Any]:
    """Metrics from precomputed scores (N, C)."""
    return label_metrics(head, examples, head.decide(scores))


def label_metrics(head: Any, examples: Sequence[Example], pred: Sequence[Any]) -> dict[str, Any]:
    """Metrics from predicted labels (a label, or a tuple of labels for multi-label heads)."""
    if head.multi_label:
        gold = [ex.label if isinstance(ex.label, tuple) else (ex.label,) for ex in examples]
        return {**metrics.multilabel(gold, pred, head.labels), "primary_metric": "macro_f1"}
    gold = [ex.label for ex in examples]
    return {
        "accuracy": metrics.accuracy(gold, pred),
        "macro_f1": metrics.macro_f1(gold, pred, head.labels),
        "primary_metric": "accuracy",
    }
