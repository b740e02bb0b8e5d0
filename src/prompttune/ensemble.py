"""Prompt ensembles: several learned prompts (and templates) over one frozen backbone, combined at prediction time,
as in "Exploring Small Language Models with Prompt-Learning Paradigm for Efficient Domain-Specific Text
Classification" (arXiv 2507.14871).

Each member is a saved artifact (any method, template and classifier head with the same label set); the backbone is
loaded once and shared. Members' class scores become probabilities (softmax), which are combined by their mean
(soft voting) or by majority vote (each member votes for its argmax; ties go to the class with the larger mean
probability).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .api import PromptTuner
from .backbones.base import Backbone
from .data.examples import load_examples
from .errors import PromptTuneError
from .evaluation import score_metrics
from .types import Example

COMBINERS = ("mean", "vote")


def combine(probs: Tensor, how: str = "mean") -> Tensor:
    """Members' probabilities (M, N, C) -> ensemble scores (N, C) whose argmax is the ensemble's prediction.

    `mean`: the mean probability. `vote`: the fraction of members voting for each class, plus mean / (2M) to break
    ties (less than the 1/M one vote is worth, so it never overturns a majority).
    """
    if how not in COMBINERS:
        raise PromptTuneError(f"ensemble: combine must be one of {', '.join(COMBINERS)}, got {how!r}")
    mean = probs.mean(0)  # (N, C)
    if how == "mean":
        return mean
    M, _, C = probs.shape
    votes = torch.nn.functional.one_hot(probs.argmax(-1), C).float().mean(0)  # (N, C)
    return votes + mean / (2 * M)


class PromptEnsemble:
    """Several artifacts on one shared backbone.

    Example:
        >>> ens = PromptEnsemble.load(["runs/a", "runs/b", "runs/c"])
        >>> ens.evaluate("test.tsv", how="mean")["accuracy"]
    """

    def __init__(self, members: Sequence[PromptTuner]):
        if not members:
            raise PromptTuneError("ensemble: no members")
        self.members = list(members)
        first = self.members[0]
        for tuner in self.members:
            head = tuner._require_model().head
            if not head.is_classifier or head.multi_label:
                raise PromptTuneError(
                    f"ensemble: member {self._name(tuner)} has a {head.name} head; single-label "
                    "classification heads only"
                )
            if head.labels != first.model.head.labels:  # type: ignore[union-attr]
                raise PromptTuneError(
                    f"ensemble: member {self._name(tuner)} has labels {head.labels}, the first member "
                    f"{first.model.head.labels}"  # type: ignore[union-attr]
                )
            if tuner.backbone is not first.backbone:
                raise PromptTuneError("ensemble: members must share one backbone object (use PromptEnsemble.load)")

    @staticmethod
    def _name(tuner: PromptTuner) -> str:
        return str(getattr(tuner, "source", None) or tuner.config.method)

    @classmethod
    def load(cls, dirs: Sequence[str | Path], backbone: Backbone | None = None, device: str = "cpu") -> PromptEnsemble:
        """Load every artifact onto one backbone (built once from the first artifact's model name unless given).

        Raises:
            PromptTuneError: no directories, members recorded on different models, different label sets.
        """
        if not dirs:
            raise PromptTuneError("ensemble: give at least one artifact directory")
        members = []
        for d in dirs:
            tuner = PromptTuner.load(d, backbone=backbone, device=device)
            if not isinstance(tuner, PromptTuner):  # a DiscretePrompt: scored through its own LLM backend
                raise PromptTuneError(f"ensemble: {d} is a text prompt found by `search`; members are soft prompts")
            if members and tuner.config.model != members[0].config.model:
                raise PromptTuneError(
                    f"ensemble: {d} was trained on {tuner.config.model!r}, {dirs[0]} on {members[0].config.model!r}; "
                    "members must share one backbone"
                )
            tuner.source = str(d)  # type: ignore[attr-defined]
            backbone = tuner.backbone
            members.append(tuner)
        return cls(members)

    @property
    def labels(self) -> list[str]:
        return list(self.members[0].model.head.labels)  # type: ignore[union-attr]

    def examples(self, data: Any, require_label: bool = False) -> list[Example]:
        return load_examples(data, self.members[0].config.task.label_field, require_label)

    @torch.no_grad()
    def member_probabilities(self, data: Any, batch_size: int = 32) -> Tensor:
        """(M, N, C): each member's class probabilities (softmax of its scores, calibration included)."""
        examples = data if _is_examples(data) else self.examples(data)
        return torch.stack([t.model.scores(examples, batch_size).softmax(-1) for t in self.members])  # type: ignore

    def predict_proba(self, data: Any, how: str = "mean", batch_size: int = 32) -> Tensor:
        """(N, C) ensemble scores (see `combine`)."""
        return combine(self.member_probabilities(data, batch_size), how)

    def predict(self, data: Any, how: str = "mean", batch_size: int = 32) -> list[str]:
        """One label per example."""
        return [self.labels[i] for i in self.predict_proba(data, how, batch_size).argmax(-1).tolist()]

    def evaluate(self, data: Any, how: str = "mean", batch_size: int = 32) -> dict[str, Any]:
        """Metrics of the ensemble on labelled data (the members' own metrics: `evaluate_all`)."""
        return self.evaluate_all(data, (how,), batch_size)[how]

    def evaluate_all(self, data: Any, hows: Sequence[str] = COMBINERS, batch_size: int = 32) -> dict[str, Any]:
        """Each member's metrics and each combiner's, from one pass per member."""
        examples = data if _is_examples(data) else self.examples(data, require_label=True)
        head = self.members[0].model.head  # type: ignore[union-attr]
        head.encode_labels(examples)  # fails early, naming the row, on a label the members do not cover
        probs = self.member_probabilities(examples, batch_size)  # (M, N, C)
        out: dict[str, Any] = {"members": [score_metrics(head, examples, p.log()) for p in probs]}
        for how in hows:
            out[how] = score_metrics(head, examples, combine(probs, how))
        return out


def _is_examples(data: Any) -> bool:
    return isinstance(data, (list, tuple)) and bool(data) and all(isinstance(e, Example) for e in data)


# ---- CLI: `prompttune ensemble` -------------------------------------------------------------------------------------
def add_ensemble_verb(verbs: Any, make_verb: Any) -> None:
    """Register `prompttune ensemble DIR [DIR ...] --data FILE`."""
    p = make_verb(verbs, "ensemble", "metrics of several artifacts combined (prompt ensemble)", _cmd, None)
    p.add_argument("dirs", nargs="+", metavar="DIR", help="artifact directories (one shared backbone)")
    p.add_argument("--data", required=True, metavar="FILE", help="labelled TSV/CSV/JSONL file")
    p.add_argument("--combine", choices=[*COMBINERS, "both"], default="both", help="mean, vote or both (default)")
    p.add_argument("--batch-size", type=int, default=32, help="examples per batch (default: 32)")


def _cmd(args: Any) -> dict[str, Any]:
    from .cliutil import fmt, print_table

    ens = PromptEnsemble.load(args.dirs)
    hows = COMBINERS if args.combine == "both" else (args.combine,)
    result = ens.evaluate_all(args.data, hows, args.batch_size)
    key = result["members"][0]["primary_metric"]
    rows = [[d, fmt(m[key])] for d, m in zip(args.dirs, result["members"], strict=True)]
    rows += [[f"ensemble ({how})", fmt(result[how][key])] for how in hows]
    print_table(args, ["", key], rows)
    return {"dirs": list(args.dirs), **result}
