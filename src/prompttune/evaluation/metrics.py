"""Metrics as pure functions over Python lists."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any


def accuracy(gold: Sequence[Any], pred: Sequence[Any]) -> float:
    return sum(g == p for g, p in zip(gold, pred, strict=True)) / max(1, len(gold))


def macro_f1(gold: Sequence[Any], pred: Sequence[Any], labels: Sequence[Any]) -> float:
    """Unweighted mean of per-class F1 over `labels` (a class absent from both gold and pred scores 0)."""
    scores = []
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(gold, pred, strict=True))
        fp = sum(g != label and p == label for g, p in zip(gold, pred, strict=True))
        fn = sum(g == label and p != label for g, p in zip(gold, pred, strict=True))
        scores.append(_f1(tp, fp, fn))
    return sum(scores) / max(1, len(scores))


def _f1(tp: int, fp: int, fn: int) -> float:
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def multilabel(gold: Sequence[Sequence[Any]], pred: Sequence[Sequence[Any]], labels: Sequence[Any]) -> dict[str, float]:
    """Metrics for label sets (one set per example).

    - `macro_f1`: the unweighted mean over `labels` of each label's F1 (a label never in gold nor pred scores 0, as
      in sklearn's `f1_score(average="macro", zero_division=0)`); labels outside `labels` are ignored.
    - `micro_f1`: F1 of the true/false positives and false negatives pooled over `labels`.
    - `jaccard`: see `jaccard`.
    - `exact_match`: share of examples whose predicted set equals the gold set.
    - `labels_per_example`: mean size of the predicted sets (PTEC's `avg_n_predicted`).
    """
    gold_sets, pred_sets = [set(g) for g in gold], [set(p) for p in pred]
    per_class, totals = [], [0, 0, 0]
    for label in labels:
        tp = sum(label in g and label in p for g, p in zip(gold_sets, pred_sets, strict=True))
        fp = sum(label not in g and label in p for g, p in zip(gold_sets, pred_sets, strict=True))
        fn = sum(label in g and label not in p for g, p in zip(gold_sets, pred_sets, strict=True))
        per_class.append(_f1(tp, fp, fn))
        totals = [totals[0] + tp, totals[1] + fp, totals[2] + fn]
    return {
        "micro_f1": _f1(*totals),
        "macro_f1": sum(per_class) / max(1, len(per_class)),
        "jaccard": jaccard(gold_sets, pred_sets),
        "exact_match": accuracy(gold_sets, pred_sets),
        "labels_per_example": sum(len(p) for p in pred_sets) / max(1, len(pred_sets)),
    }


def jaccard(gold: Sequence[Sequence[Any]], pred: Sequence[Sequence[Any]]) -> float:
    """Sample-wise Jaccard index: the mean over examples of |gold & pred| / |gold | pred|, the figure the PTEC
    repository reports (sklearn's `jaccard_score(average="samples")`). An example whose gold and predicted sets are
    both empty scores 1 (a correct "no label"; sklearn with `zero_division=0` scores it 0, which only matters for
    data with empty gold sets)."""
    scores = []
    for g, p in zip(gold, pred, strict=True):
        g, p = set(g), set(p)
        scores.append(len(g & p) / len(g | p) if (g | p) else 1.0)
    return sum(scores) / max(1, len(scores))


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def text_metrics(gold: Sequence[str], pred: Sequence[str]) -> dict[str, float]:
    """Exact match and token F1 after lower-casing and stripping punctuation (SQuAD-style)."""
    em, f1 = [], []
    for g, p in zip(gold, pred, strict=True):
        gt, pt = _normalise(g).split(), _normalise(p).split()
        em.append(float(gt == pt))
        common = sum((Counter(gt) & Counter(pt)).values())
        f1.append(0.0 if common == 0 else 2 * common / (len(gt) + len(pt)))
    n = max(1, len(gold))
    return {"exact_match": sum(em) / n, "token_f1": sum(f1) / n}
