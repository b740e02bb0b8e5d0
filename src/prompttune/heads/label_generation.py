"""Label generation head: the text-to-text alternative to a classifier head in PTEC (Buchner et al., 2024, "Prompt
Tuned Embedding Classification for Multi-Label Industry Sector Allocation", arXiv 2309.12075).

The model learns to write the label set as text, `" label, label<eos>"` (labels in label-set order), with the
generation loss on those target tokens only. Prediction is greedy decoding constrained by a trie of the labels'
token sequences (`trie.LabelTrie`): every generated label belongs to the label set and none repeats, and the
prediction is the set of labels named (one label when the task is single-label). At least one label is always
generated.

Labels are tokenised as `" " + label` (a word after the prompt's last token) and joined by the separator's own
tokens, so training targets and the trie hold exactly the same ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..data.templates import Prompt
from ..errors import PromptTuneError
from ..registry import register_head
from ..types import Example, Row
from .base import Head
from .generation import GenerationHead
from .trie import LabelTrie

SEPARATOR = ","


@register_head("label_generation")
class LabelGenerationHead(GenerationHead):
    def __init__(
        self,
        labels: Sequence[str],
        kind: str,
        tokenizer: Any,
        multi_label: bool = False,
        max_new_tokens: int = 32,
    ):
        super().__init__(kind, tokenizer, max_new_tokens)
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
        self.constrain = self.trie

    @classmethod
    def from_task(cls, task: Any, backbone: Any, labels: Sequence[str]) -> LabelGenerationHead:
        return cls(labels, backbone.kind, backbone.tokenizer, task.multi_label, task.max_new_tokens)

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
        return {**super().config(), "labels": self.labels, "multi_label": self.multi_label, "separator": SEPARATOR}


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
