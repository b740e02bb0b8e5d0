"""Metrics and the evaluator."""

from .evaluator import evaluate, score_metrics

__all__ = ["evaluate", "score_metrics"]
