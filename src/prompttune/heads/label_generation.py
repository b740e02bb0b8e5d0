"""Label generation head: the text-to-text alternative to a classifier head in PTEC (Buchner et al., 2024, "Prompt
Tuned Embedding Classification for Multi-Label Industry Sector Allocation", arXiv 2309.12075).

The model learns to write the label set as text, `" label, label<eos>"` (labels in label-set order), with the
generation loss on those target tokens only. Prediction is greedy decoding constrained by a trie of the labels'
token sequences (`trie.LabelTrie`): every generated label belongs to the label set and none repeats, and the
prediction is the set of labels named (one label when the task is single-label). At least one label is always
generated.

Labels are tokenised as `" " + label` (a word after the prompt's last token) and joined by the separator's own
tokens, so training targets and the trie hold exactly the same ids.

How many labels an answer gets is the generation analogue of a classifier's threshold: after each complete label
the model chooses between the end token and going on, and a few hundred training steps of a 16-token prompt do not
teach a small model to stop (SmolLM2-135M on hate speech named ~8 of 22 labels per comment, gold ~1.5). So
multi-label dev evaluation tunes a stop bias added to the end token's logit at those choices: dev is decoded once
with early ends forbidden, the path is scored by teacher forcing to get every choice's margin (end vs the best
continuation), and the bias maximising the dev `threshold_metric` (macro-F1 by default, or micro-F1 or Jaccard) is
read off without decoding again (greedy decoding with bias b stops at the first choice whose margin + b > 0). The
bias is a buffer: selected with its checkpoint, saved with the artifact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..config import build_section
from ..data.templates import Prompt
from ..errors import PromptTuneError
from ..registry import register_head
from ..types import Example, Row
from .base import Head, ThresholdConfig
from .generation import GenerationHead
from .trie import LabelTrie

SEPARATOR = ","


@register_head("label_generation")
class LabelGenerationHead(GenerationHead):
    # `threshold_metric` is the dev metric the stop bias maximises (the same trade-off as a
    # classifier's threshold: macro-F1 favours more labels, Jaccard fewer).
    config_cls = ThresholdConfig

    def __init__(
        self,
        labels: Sequence[str],
        kind: str,
        tokenizer: Any,
        multi_label: bool = False,
        max_new_tokens: int = 32,
        config: ThresholdConfig | None = None,
    ):
        super().__init__(kind, tokenizer, max_new_tokens)
        self.options = config or ThresholdConfig()
        if not labels:
            raise PromptTuneError(
                "the label_generation head needs a label set: set labels or label_columns, or give labelled data"
            )
        if tokenizer.eos_token_id is None:
            raise PromptTuneError("the label_generation head needs a tokenizer with an end-of-sequence token")
        self.labels, self.multi_label = [str(label) for label in labels], multi_label
        self.index = {label: i for i, label in enumerate(self.labels)}
        self.joiner = SEPARATOR + " "  # how label names are joined in the decoded text

        def ids(text: str) -> tuple[int, ...]:
            return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])

        sequences = [ids(" " + label) for label in self.labels]
        max_labels = None if multi_label else 1
        self.trie = LabelTrie(sequences, ids(SEPARATOR), tokenizer.eos_token_id, max_labels, self.labels)
        self.register_buffer("stop_bias", torch.tensor(0.0))  # tuned on dev (multi-label); see the module docstring
        self.constrain = self._constrain

    def _constrain(self, generated: Tensor, logits: Tensor) -> Tensor:
        return self.trie(generated, logits, float(self.stop_bias))

    @classmethod
    def from_task(cls, task: Any, backbone: Any, labels: Sequence[str]) -> LabelGenerationHead:
        cfg = build_section(ThresholdConfig, task.head_config, "head label_generation")
        return cls(labels, backbone.kind, backbone.tokenizer, task.multi_label, task.max_new_tokens, cfg)

    def _label_ids(self, target: Any) -> list[int]:
        values = target if isinstance(target, (tuple, list)) else (target,)
        unknown = [v for v in values if v not in self.index]
        if unknown:
            raise PromptTuneError(f"label {unknown[0]!r} is not in the label set {self.labels}")
        return [self.index[v] for v in values]

    def rows(self, prompt: Prompt, example: int, target: Any = None) -> list[Row]:
        end = len(prompt.ids) - 1
        if target is None:
            return [Row(prompt.ids, prompt.soft, (end,), example=example)]
        ids = self.trie.encode(self._label_ids(target))  # (label sep)* label eos
        return [Row(prompt.ids + ids[:-1], prompt.soft, tuple(range(end, end + len(ids))), ids, example)]

    def encode_labels(self, examples: Sequence[Example]) -> None:
        Head.encode_labels(self, examples)  # fails naming the row on a label outside the set; targets travel in rows
        return None

    def dev_metrics(self, model: Any, dev: Sequence[Example], batch_size: int) -> dict[str, Any]:
        """Multi-label: tune the stop bias on dev (module docstring) and return dev metrics at it."""
        from ..evaluation import metrics as M

        if not self.multi_label:
            return super().dev_metrics(model, dev, batch_size)
        options = self._stop_options(model, dev, batch_size)
        gold = [ex.label for ex in dev]

        def predict(bias: float) -> list[tuple[str, ...]]:
            # Greedy decoding with this bias ends at the first choice whose margin + bias > 0, else runs the path out.
            return [next((labels for m, labels in choices if m + bias > 0), full) for choices, full in options]

        # Every distinct behaviour: a bias just past each margin, plus never ending early and ending at once.
        cuts = sorted({-m for choices, _ in options for m, _ in choices})
        cuts = cuts[:: max(1, len(cuts) // 400)]  # a few hundred candidates are plenty for one scalar
        candidates = [0.0, -1e4, 1e4, *[c + 1e-4 for c in cuts]]
        metric = self.options.threshold_metric
        best = max(candidates, key=lambda b: (M.multilabel(gold, predict(b), self.labels)[metric], -abs(b)))
        self.stop_bias.fill_(best)
        return {**M.multilabel(gold, predict(best), self.labels), "primary_metric": "macro_f1"}

    def _stop_options(
        self, model: Any, dev: Sequence[Example], batch_size: int
    ) -> list[tuple[list[tuple[float, tuple[str, ...]]], tuple[str, ...]]]:
        """Per dev example: the longest greedy answer (early ends forbidden) as labels, and at each choice on its
        path between ending and going on, (margin of the end token, the labels an end there gives)."""
        kept = float(self.stop_bias)
        self.stop_bias.fill_(-math.inf)
        try:
            texts = model.generate(dev, batch_size)
        finally:
            self.stop_bias.fill_(kept)
        paths = [self._ids(self.parse(text)) for text in texts]
        prompts = [rows[0] for rows in model.encode(dev)]
        out: list[tuple[list[tuple[float, tuple[str, ...]]], tuple[str, ...]]] = [([], self._names(p)) for p in paths]
        todo = [i for i, path in enumerate(paths) if self.trie.choices(path)]  # single-label answers: no choice
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            rows = [
                Row(prompts[i].ids + paths[i][:-1], prompts[i].soft, _reads(prompts[i], paths[i]), paths[i], j)
                for j, i in enumerate(chunk)
            ]
            with torch.no_grad():
                logits = model(model.make_batch(rows, keep_cache=False), len(rows))  # (B, K, V) predicting the path
            for j, i in enumerate(chunk):
                path = paths[i]
                margins = self.trie.stop_margins(path, logits[j, : len(path)].float())
                out[i][0].extend((m, self._names(path[:k])) for k, m in margins)
        return out

    def tune_on_dev(self, model: Any, dev_scores: Any, dev: Sequence[Example], mode: str) -> dict[str, Any]:
        """The stop bias chosen with the selected checkpoint (by `dev_metrics`), for the run's record."""
        return {"stop_bias": float(self.stop_bias)} if self.multi_label else {}

    def _ids(self, labels: Sequence[str]) -> tuple[int, ...]:
        """The token ids of labels in the given order, joined by the separator (no end token)."""
        out: list[int] = []
        for i, label in enumerate(labels):
            out.extend((self.trie.separator if i else ()) + self.trie.sequences[self.index[label]])
        return tuple(out)

    def _names(self, ids: Sequence[int]) -> tuple[str, ...]:
        return tuple(self.labels[i] for i in self.trie.parse(ids))

    def decode(self, ids: Sequence[int], tokenizer: Any) -> str:
        """The labels the ids name, joined by ", " (exact: read from the trie, not re-detokenised)."""
        return self.joiner.join(self.labels[i] for i in self.trie.parse(ids))

    def parse(self, text: str) -> Any:
        """Decoded text -> a tuple of labels (multi-label) or one label (None when the text names none)."""
        found = _split(text.strip(), sorted(self.labels, key=len, reverse=True), self.joiner) or []
        if self.multi_label:
            return tuple(dict.fromkeys(found))
        return found[0] if found else None

    def config(self) -> dict[str, Any]:
        extra = {"separator": SEPARATOR, "threshold_metric": self.options.threshold_metric}
        return {**super().config(), "labels": self.labels, "multi_label": self.multi_label, **extra}


def _reads(prompt: Row, path: Sequence[int]) -> tuple[int, ...]:
    """Positions whose next-token logits predict the path's tokens: the prompt's last, then each path token's."""
    end = len(prompt.ids) - 1
    return tuple(range(end, end + len(path)))


def _split(text: str, labels: list[str], joiner: str) -> list[str] | None:
    """`text` as labels joined by `joiner` (labels may themselves contain the joiner; longest match first)."""
    if not text:
        return []
    for label in labels:
        if text == label:
            return [label]
        if text.startswith(label + joiner):
            rest = _split(text[len(label) + len(joiner) :], labels, joiner)
            if rest is not None:
                return [label, *rest]
    return None
