"""Verbalizer head: class score = log-probability of the class's label word(s) at the answer position.

Multi-token words are scored exactly (sum of their tokens' log-probabilities, one row per word), several words per
label are averaged in probability space. Only the positions that are read go through the LM head: no (B, T, V)
logits. Optional contextual calibration (Zhao et al., 2021, "Calibrate Before Use", arXiv 2102.09690) divides by
the label-word prior measured on a content-free input.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.collate import Batch
from ..data.templates import Prompt
from ..errors import PromptTuneError
from ..registry import register_head
from ..types import Row
from .base import Head, gather_positions


@register_head("verbalizer")
class VerbalizerHead(Head):
    def __init__(
        self, labels: Sequence[str], kind: str, words: dict[str, list[str]], tokenizer: Any, multi_label: bool = False
    ):
        super().__init__(labels, kind, multi_label)
        if kind != "causal_lm":
            raise PromptTuneError("the verbalizer head needs a causal LM; use head=classifier for encoders")
        self.words = {label: list(words[label]) for label in self.labels}
        self.options: list[tuple[int, tuple[int, ...]]] = []  # (class index, word token ids)
        for c, label in enumerate(self.labels):
            for word in self.words[label]:
                ids = tuple(tokenizer(word, add_special_tokens=False)["input_ids"])
                if not ids:
                    raise PromptTuneError(f"verbalizer: word {word!r} for label {label!r} tokenises to nothing")
                self.options.append((c, ids))
        self.multi_token = any(len(ids) > 1 for _, ids in self.options)
        self.register_buffer("option_class", torch.tensor([c for c, _ in self.options]), persistent=False)
        self.register_buffer("first_tokens", torch.tensor([ids[0] for _, ids in self.options]), persistent=False)
        self.register_buffer("prior", torch.zeros(len(self.labels)))  # (C,) log-prior removed by calibration

    @classmethod
    def from_task(cls, task: Any, backbone: Any, labels: Sequence[str]) -> VerbalizerHead:
        words = task.verbalizer
        if not words:
            if not labels:
                raise PromptTuneError(
                    "config field 'verbalizer': the verbalizer head needs label words, e.g. '0= negative,1= positive'"
                )
            # Labels such as "positive" or "sports" are words already; opaque ones ("0", "LABEL_1") still train, but
            # a zero-shot reading of them means little, so say what was chosen.
            words = {label: [" " + label] for label in labels}
            warnings.warn(
                f"no verbalizer given: the label names are the label words {words}; set `verbalizer` to choose "
                "words the model reads as the labels' meaning",
                stacklevel=2,
            )
        return cls(labels, backbone.kind, words, backbone.tokenizer)

    @classmethod
    def from_saved(cls, saved: dict[str, Any], task: Any, backbone: Any, labels: Sequence[str]) -> VerbalizerHead:
        """The artifact's own words (head.json), so a prompt trained with default words loads without a verbalizer."""
        words = saved.get("words") or task.verbalizer
        return cls(labels, backbone.kind, words, backbone.tokenizer) if words else cls.from_task(task, backbone, labels)

    def rows(self, prompt: Prompt, example: int, target: Any = None) -> list[Row]:
        end = len(prompt.ids) - 1
        if not self.multi_token:
            return [Row(prompt.ids, prompt.soft, (end,), example=example)]
        # One row per word: the word's tokens are teacher-forced after the prompt and scored one by one.
        return [
            Row(prompt.ids + ids[:-1], prompt.soft, tuple(range(end, end + len(ids))), ids, example, o)
            for o, (_, ids) in enumerate(self.options)
        ]

    def forward(self, hidden: Tensor, batch: Batch, backbone: nn.Module, num_examples: int) -> Tensor:
        return self._class_scores(self.word_scores(hidden, batch, backbone, num_examples)) - self.prior  # (N, C)

    def word_scores(self, hidden: Tensor, batch: Batch, backbone: nn.Module, num_examples: int) -> Tensor:
        """hidden (B, T, D) -> (N, W): log-probability of each label word (all its tokens) at the answer."""
        if not self.multi_token:
            h = gather_positions(hidden, batch.read_positions[:, :1])[:, 0]  # (N, D)
            logp = F.log_softmax(backbone.lm_logits(h).float(), -1)  # (N, V)
            word_scores = logp[:, self.first_tokens]  # (N, W)
        else:
            h = gather_positions(hidden, batch.read_positions)  # (B, K, D)
            logp = F.log_softmax(backbone.lm_logits(h).float(), -1)  # (B, K, V)
            tok = logp.gather(-1, batch.targets.clamp(min=0)[..., None])[..., 0]  # (B, K)
            row_scores = (tok * batch.read_mask).sum(-1)  # (B,)
            word_scores = row_scores.new_full((num_examples, len(self.options)), -math.inf)
            word_scores = word_scores.index_put((batch.example, batch.option), row_scores)  # (N, W)
        return word_scores

    def _class_scores(self, word_scores: Tensor) -> Tensor:
        """(N, W) word log-probs -> (N, C): log of the mean probability of each class's words."""
        C = len(self.labels)
        out = word_scores.new_full((word_scores.shape[0], C), -math.inf)
        for c in range(C):
            cols = word_scores[:, self.option_class == c]  # (N, W_c)
            out[:, c] = torch.logsumexp(cols, -1) - math.log(cols.shape[1])
        return out

    def loss(self, scores: Tensor, targets: Tensor, batch: Batch) -> Tensor:
        return F.cross_entropy(scores, targets)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "words": self.words}

    def tune_on_dev(self, model: Any, dev_scores: Tensor, dev: Sequence[Any], mode: str) -> dict[str, Any]:
        """Contextual calibration: `content_free` always, `auto` only if it does not lower the dev metric."""
        from ..evaluation import score_metrics

        if mode == "none" or self.multi_label:
            return {"calibrated": False}
        raw = dev_scores + self.prior.cpu()  # scores (on the CPU) without any previous calibration
        prior = model.content_free_prior()  # (C,)
        chosen = mode == "content_free"
        if mode == "auto" and dev:
            before, after = score_metrics(self, dev, raw), score_metrics(self, dev, raw - prior)
            key = before["primary_metric"]
            chosen = after[key] > before[key]
        with torch.no_grad():
            self.prior.copy_(prior if chosen else torch.zeros_like(prior))
        return {"calibrated": chosen, "prior": [round(p, 4) for p in prior.exp().tolist()]}
