"""Classifier head (PTEC-style: Prompt Tuned Embedding Classification): a linear layer on the pooled hidden state
in place of the LM head, for encoders and decoders, single-label (softmax) or multi-label (sigmoid + BCE, with the
decision threshold chosen on dev)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import build_section
from ..data.collate import Batch
from ..registry import register_head
from .base import Head, ThresholdConfig, gather_positions


@register_head("classifier")
class ClassifierHead(Head):
    config_cls = ThresholdConfig

    def __init__(
        self,
        labels: Sequence[str],
        kind: str,
        hidden_size: int,
        multi_label: bool = False,
        pooling: str = "answer",
        config: ThresholdConfig | None = None,
    ):
        super().__init__(labels, kind, multi_label)
        self.pooling = pooling
        self.options = config or ThresholdConfig()
        self.linear = nn.Linear(hidden_size, len(self.labels))
        nn.init.zeros_(self.linear.weight)  # start from uniform scores: the prompt learns before the head dominates
        nn.init.zeros_(self.linear.bias)
        self.register_buffer("threshold", torch.tensor(0.5))

    @classmethod
    def from_task(cls, task: Any, backbone: Any, labels: Sequence[str]) -> ClassifierHead:
        pooling = task.pooling if backbone.kind == "causal_lm" or task.pooling == "mean" else "mean"
        cfg = build_section(ThresholdConfig, task.head_config, "head classifier")
        return cls(labels, backbone.kind, backbone.spec.output_size, task.multi_label, pooling, cfg)

    def forward(self, hidden: Tensor, batch: Batch, backbone: nn.Module, num_examples: int) -> Tensor:
        if self.pooling == "mean":
            mask = batch.attention_mask.to(hidden)[..., None]  # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, D)
        else:
            pooled = gather_positions(hidden, batch.read_positions[:, :1])[:, 0]  # (B, D)
        return self.linear(pooled.float())  # (N, C)

    def prepare(self, model: Any, train: Sequence[Any]) -> dict[str, Any]:
        """Multi-label: start each label's bias at its training log-odds.

        With the zero weights alone every label starts at p = 0.5, so the untrained head predicts every label, and
        on sparse label sets (hate speech: 1.45 of 22 labels per comment) that beats early checkpoints in dev
        selection. From the base rates the untrained head predicts no label, and training only adds evidence.
        """
        if not self.multi_label:
            return {}
        n = len(train)
        rate = self.encode_labels(train).mean(0).clamp(0.5 / n, 1 - 0.5 / n)  # (C,) never exactly 0 or 1
        with torch.no_grad():
            self.linear.bias.copy_(torch.logit(rate))
        return {}

    def loss(self, scores: Tensor, targets: Tensor, batch: Batch) -> Tensor:
        if self.multi_label:
            return F.binary_cross_entropy_with_logits(scores, targets.to(scores))
        return F.cross_entropy(scores, targets)

    def decide(self, scores: Tensor) -> list[Any]:
        if not self.multi_label:
            return super().decide(scores)
        chosen = torch.sigmoid(scores) >= float(self.threshold)  # (N, C)
        return [tuple(self.labels[j] for j in torch.nonzero(row).flatten().tolist()) for row in chosen]

    def config(self) -> dict[str, Any]:
        return {**super().config(), "pooling": self.pooling, "threshold_metric": self.options.threshold_metric}

    def tune_on_dev(self, model: Any, dev_scores: Tensor, dev: Sequence[Any], mode: str) -> dict[str, Any]:
        """Multi-label: the probability threshold that maximises the dev `threshold_metric` (default macro-F1).

        One threshold for all labels, chosen on dev only: per-label thresholds would be fitted to a handful of dev
        positives for rare labels (hate-speech dev: 3 to 4 for several of its 22 labels) and overfit them.
        """
        from ..evaluation import score_metrics

        if not self.multi_label or not dev:
            return {}
        best = (-1.0, 0.5)
        # Sparse label sets put many probabilities near the base rates, far below 0.05: search down to 0.01 too.
        for t in [0.01, 0.02, 0.03, 0.04] + [i / 20 for i in range(1, 20)]:
            self.threshold.fill_(t)
            best = max(best, (score_metrics(self, dev, dev_scores)[self.options.threshold_metric], t))
        self.threshold.fill_(best[1])
        return {"threshold": best[1], f"dev_{self.options.threshold_metric}": best[0]}
