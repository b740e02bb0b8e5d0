"""The head contract: turn the backbone's final hidden states into class scores, or into token predictions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..data.collate import Batch
from ..data.templates import Prompt
from ..errors import PromptTuneError
from ..types import Example, Row


class Head(nn.Module):
    """Base class. `labels` is the ordered label set (classification) or empty (generation)."""

    name: ClassVar[str]
    is_classifier: ClassVar[bool] = True
    config_cls: ClassVar[type | None] = None  # the head's own options (TaskConfig.head_config), if it has any

    def __init__(self, labels: Sequence[str], kind: str, multi_label: bool = False):
        super().__init__()
        self.labels = list(labels)
        self.kind = kind
        self.multi_label = multi_label
        self.index = {label: i for i, label in enumerate(self.labels)}

    @classmethod
    def from_saved(cls, saved: dict[str, Any], task: Any, backbone: Any, labels: Sequence[str]) -> Head:
        """Rebuild from an artifact's head.json (heads whose structure was derived from data override this)."""
        return cls.from_task(task, backbone, labels)  # type: ignore[attr-defined]

    def prepare(self, model: Any, train: Sequence[Example]) -> dict[str, Any]:
        """Before training (not on resume): fit data-dependent state, e.g. label-word priors; returns what was set."""
        return {}

    def rows(self, prompt: Prompt, example: int, target: Any = None) -> list[Row]:
        """Rows to run for one encoded prompt (one for most heads)."""
        read = (0,) if self.kind == "encoder" else (len(prompt.ids) - 1,)
        return [Row(prompt.ids, prompt.soft, read, example=example)]

    def forward(self, hidden: Tensor, batch: Batch, backbone: nn.Module, num_examples: int) -> Tensor:
        """hidden (B, T, D) -> scores (N, C) for classifiers, logits (B, K, V) for generation."""
        raise NotImplementedError

    def loss(self, scores: Tensor, targets: Tensor, batch: Batch) -> Tensor:
        raise NotImplementedError

    def encode_labels(self, examples: Sequence[Example]) -> Tensor:
        """Class indices (N,) or multi-hot (N, C); raises naming the row when a label is unknown."""
        out = (
            torch.zeros(len(examples), len(self.labels))
            if self.multi_label
            else torch.zeros(len(examples), dtype=torch.long)
        )
        for i, ex in enumerate(examples):
            values = ex.label if isinstance(ex.label, tuple) else (ex.label,)
            if ex.label is None:
                raise PromptTuneError(f"{ex.source}: example has no label")
            if not self.multi_label and len(values) != 1:
                raise PromptTuneError(
                    f"{ex.source}: {len(values)} labels given to a single-label task "
                    f"(set multi_label for the classifier head)"
                )
            for value in values:
                if value not in self.index:
                    raise PromptTuneError(f"{ex.source}: label {value!r} is not covered; expected one of {self.labels}")
                if self.multi_label:
                    out[i, self.index[value]] = 1.0
                else:
                    out[i] = self.index[value]
        return out

    def decide(self, scores: Tensor) -> list[Any]:
        """Scores (N, C) -> predicted labels (a label, or a tuple of labels for multi-label)."""
        return [self.labels[i] for i in scores.argmax(-1).tolist()]

    # ---- text heads (generation) ----------------------------------------------------------------------------
    constrain: Any = None
    """A decoding constraint `(generated ids (B, t), logits (B, V)) -> logits (B, V)` applied at every greedy step
    (e.g. a label trie), or None for free decoding."""

    def decode(self, ids: Sequence[int], tokenizer: Any) -> str:
        """Generated ids (stop token excluded) -> text."""
        return tokenizer.decode(ids, skip_special_tokens=True)

    def parse(self, text: str) -> Any:
        """Generated text -> prediction: the text itself, or for heads with a label set the label(s) it names."""
        return text

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer groups of the head's trainable parameters; heads that need another learning rate override it."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]

    def dev_metrics(self, model: Any, dev: Sequence[Example], batch_size: int) -> dict[str, Any]:
        """Dev metrics for checkpoint selection during training (frozen dev prefixes are kept for the next call)."""
        from ..evaluation import score_metrics

        return score_metrics(self, dev, model.scores(dev, batch_size, keep_cache=True))

    def tune_on_dev(self, model: Any, dev_scores: Tensor, dev: Sequence[Example], mode: str) -> dict[str, Any]:
        """After training: choose decision settings (calibration, thresholds) on dev; returns what was chosen."""
        return {}

    def config(self) -> dict[str, Any]:
        """JSON-able description saved as head.json."""
        return {"head": self.name, "labels": self.labels, "multi_label": self.multi_label}


THRESHOLD_METRICS = ("macro_f1", "micro_f1", "jaccard")


@dataclass
class ThresholdConfig:
    """Options of the heads whose multi-label decisions have a dev-tuned threshold (`classifier`: a probability
    threshold; `label_generation`: a stop bias)."""

    threshold_metric: str = "macro_f1"
    """Multi-label: the dev metric the decision threshold (or stop bias) maximises: `macro_f1` (every label counts
    the same: favours recall on rare labels), `micro_f1` or `jaccard` (per-example overlap, as PTEC's repository
    reports: favours predicting few labels on sparse label sets)."""

    def __post_init__(self) -> None:
        if self.threshold_metric not in THRESHOLD_METRICS:
            raise PromptTuneError(
                f"head config field 'threshold_metric': expected one of {', '.join(THRESHOLD_METRICS)}, "
                f"got {self.threshold_metric!r}"
            )


def gather_positions(hidden: Tensor, positions: Tensor) -> Tensor:
    """hidden (B, T, D), positions (B, K) -> (B, K, D)."""
    return hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
