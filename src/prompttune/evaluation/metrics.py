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
    """Micro/macro F1, sample-averaged Jaccard and exact-match for label sets."""
    gold_sets, pred_sets = [set(g) for g in gold], [set(p) for p in pred]
    per_class, totals = [], [0, 0, 0]
    for label in labels:
        tp = sum(label in g and label in p for g, p in zip(gold_sets, pred_sets, strict=True))
        fp = sum(label not in g and label in p for g, p in zip(gold_sets, pred_sets, strict=True))
        fn = sum(label in g and label not in p for g, p in zip(gold_sets, pred_sets, strict=True))
        per_class.append(_f1(tp, fp, fn))
        totals = [totals[0] + tp, totals[1] + fp, totals[2] + fn]
    jaccard = [len(g & p) / len(g | p) if (g | p) else 1.0 for g, p in zip(gold_sets, pred_sets, strict=True)]
    return {
        "micro_f1": _f1(*totals),
        "macro_f1": sum(per_class) / max(1, len(per_class)),
        "jaccard": sum(jaccard) / max(1, len(jaccard)),
        "exact_match": accuracy(gold_sets, pred_sets),
    }


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
