"""A trie over the token sequences of a label set, for constrained decoding of label lists.

PTEC's text-to-text alternative (Buchner et al., 2024, "Prompt Tuned Embedding Classification for Multi-Label
Industry Sector Allocation", arXiv 2309.12075, "trie search"): the model generates `label, label, ..., <eos>`, and
at every step only the tokens that continue a path of the trie are allowed, so every generated label belongs to the
taxonomy and no label repeats.

The decoding state is recomputed from a row's own generated ids at each step (no state carried between calls), so the
constraint is the same function of a row whatever else is in its batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import PromptTuneError


@dataclass
class _Node:
    children: dict[int, _Node] = field(default_factory=dict)
    label: int | None = None  # a label's token sequence ends here
    below: set[int] = field(default_factory=set)  # labels whose sequences pass through (or end at) this node


@dataclass
class _State:
    """Where a generated prefix leaves the walk through the trie."""

    node: _Node
    used: list[int]  # completed labels, in generated order
    separator_at: int = 0  # > 0: inside the separator, this many of its tokens emitted
    finished: bool = False  # the end token was generated
    broken: bool = False  # a token left the trie (only possible without the constraint)


class LabelTrie:
    """The label set as a trie of token ids, plus the grammar `label (separator label)* end`.

    Args:
        sequences: token ids of each label, in label order (index = label index).
        separator: token ids between two labels (e.g. the ids of ",").
        end: the id that ends the answer (EOS).
        max_labels: most labels per answer (1 for single-label tasks; default: all of them).
        names: label names for error messages (default: their indices).

    Raises:
        PromptTuneError: an empty or duplicate label sequence, or a label whose tokens continue with the separator or
            the end token (the walk could not tell where that label ends).
    """

    def __init__(
        self,
        sequences: Sequence[Sequence[int]],
        separator: Sequence[int],
        end: int,
        max_labels: int | None = None,
        names: Sequence[str] | None = None,
    ):
        if not separator:
            raise PromptTuneError("label trie: the separator tokenises to nothing")
        self.names = [repr(n) for n in names] if names is not None else [str(i) for i in range(len(sequences))]
        self.sequences = [tuple(s) for s in sequences]
        self.separator = tuple(separator)
        self.end = end
        self.max_labels = len(self.sequences) if max_labels is None else max_labels
        self.root = _Node()
        for i, seq in enumerate(self.sequences):
            self._add(i, seq)
        self._check(self.root)

    def _add(self, label: int, seq: tuple[int, ...]) -> None:
        if not seq:
            raise PromptTuneError(f"label trie: label {self.names[label]} tokenises to nothing")
        if self.end in seq:
            raise PromptTuneError(f"label trie: label {self.names[label]} contains the end token {self.end}")
        node = self.root
        node.below.add(label)
        for token in seq:
            node = node.children.setdefault(token, _Node())
            node.below.add(label)
        if node.label is not None:
            raise PromptTuneError(
                f"label trie: labels {self.names[node.label]} and {self.names[label]} have the same tokens {list(seq)}"
            )
        node.label = label

    def _check(self, node: _Node) -> None:
        if node.label is not None and self.separator[0] in node.children:
            raise PromptTuneError(
                f"label trie: label {self.names[node.label]} is a prefix of another label that continues with the "
                f"separator token {self.separator[0]}; choose another separator"
            )
        for child in node.children.values():
            self._check(child)

    # ---- the grammar ------------------------------------------------------------------------------------------
    def walk(self, prefix: Sequence[int]) -> _State:
        """Follow generated ids from the start of the answer; tokens after the end token are ignored."""
        state = _State(self.root, [])
        for token in prefix:
            if state.finished or state.broken:
                break
            if state.separator_at:
                if token != self.separator[state.separator_at]:
                    state.broken = True
                    continue
                state.separator_at = (state.separator_at + 1) % len(self.separator)
                continue
            label = state.node.label
            if label is not None and token == self.end:
                state.used.append(label)
                state.finished = True
            elif label is not None and token == self.separator[0]:
                state.used.append(label)
                state.node = self.root
                state.separator_at = 1 % len(self.separator)
            elif token in state.node.children:
                state.node = state.node.children[token]
            else:
                state.broken = True
        return state

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        """Token ids that may follow `prefix` (never empty: a finished or broken answer may only end)."""
        state = self.walk(prefix)
        if state.finished or state.broken:
            return [self.end]
        if state.separator_at:
            return [self.separator[state.separator_at]]
        used = set(state.used)
        out = [t for t, child in state.node.children.items() if child.below - used]
        label = state.node.label
        if label is not None and label not in used:
            out.append(self.end)
            more = len(used) + 1 < self.max_labels and bool(self.root.below - used - {label})
            if more:
                out.append(self.separator[0])
        return out or [self.end]

    def parse(self, ids: Sequence[int]) -> list[int]:
        """Label indices named by generated ids, in generated order; a label cut off by the token limit counts only
        if its tokens are complete."""
        state = self.walk(ids)
        labels = list(state.used)
        label = state.node.label
        if not (state.finished or state.broken or state.separator_at) and label is not None and label not in labels:
            labels.append(label)
        return list(dict.fromkeys(labels))

    def encode(self, labels: Sequence[int]) -> tuple[int, ...]:
        """The target ids of a label set, in label order: `label sep label ... end`."""
        out: list[int] = []
        for i, label in enumerate(sorted(set(labels))):
            out.extend((self.separator if i else ()) + self.sequences[label])
        return (*out, self.end)

    def __call__(self, generated: Tensor, logits: Tensor, stop_bias: float = 0.0) -> Tensor:
        """The decoding constraint: generated (B, t) ids so far, logits (B, V) -> logits with every token the
        grammar forbids set to -inf. `stop_bias` is added to the end token's logit wherever the answer could also
        go on (after a complete label that may be followed by another): > 0 ends answers sooner, -inf never early."""
        mask = torch.full_like(logits, -math.inf)  # (B, V)
        for b, prefix in enumerate(generated.tolist()):
            allowed = self.allowed(prefix)
            mask[b, allowed] = 0.0
            if stop_bias and self._is_choice(allowed):
                mask[b, self.end] = stop_bias
        return logits + mask

    def _is_choice(self, allowed: list[int]) -> bool:
        """The answer may end here or go on (a complete label that another may follow)."""
        return self.end in allowed and len(allowed) > 1

    def choices(self, path: Sequence[int]) -> list[int]:
        """Positions k of a generated path where the answer could have ended instead of taking path[k]."""
        return [k for k in range(len(path)) if self._is_choice(self.allowed(path[:k]))]

    def stop_margins(self, path: Sequence[int], logits: Tensor) -> list[tuple[int, float]]:
        """(k, logit(end) minus the best allowed continuation) at each of `choices(path)`; `logits` (len(path), V)
        are the ones that predicted each path token. Greedy decoding with `stop_bias` b ends at the first choice
        whose margin + b > 0."""
        margins = []
        for k in range(len(path)):
            allowed = self.allowed(path[:k])  # walked once per position: `choices` would walk it again
            if self._is_choice(allowed):
                others = [t for t in allowed if t != self.end]
                margins.append((k, float(logits[k, self.end] - logits[k, others].max())))
        return margins
