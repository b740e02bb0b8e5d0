"""Keyword hints for directional stimulus prompting: the words of an input, their frozen-LM features, a
Plackett-Luce policy over them, and the writer that turns keyword choices into hint texts.

Kept apart from the optimiser (`directional_stimulus.py`) so the policy's mathematics -- sampling without replacement,
its exact log-probability, the KL to the reference policy -- reads (and is tested) on its own.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..data.templates import resolve_field
from ..types import Example, PromptInputs
from .base import Candidate, example_key

_WORD = re.compile(r"[A-Za-z0-9][\w'-]*")


# ---- words and their features ----------------------------------------------------------------------------------------
def input_words(text: str, limit: int) -> list[str]:
    """Distinct words (lower-cased, first `limit`), in order of first appearance."""
    return list(dict.fromkeys(m.group().lower() for m in _WORD.finditer(text)))[:limit]


@torch.no_grad()
def word_features(backbone: Any, texts: Sequence[str], limit: int, batch_size: int = 16) -> list[Tensor]:
    """Per text: (W, D) frozen final hidden states averaged over each distinct word's tokens (`input_words` order)."""
    tok, out = backbone.tokenizer, []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        enc = [tok(t, add_special_tokens=False, return_offsets_mapping=True) for t in chunk]
        T = max(1, max(len(e["input_ids"]) for e in enc))
        ids = torch.full((len(chunk), T), backbone.pad_id, dtype=torch.long)
        mask = torch.zeros(len(chunk), T, dtype=torch.long)
        for b, e in enumerate(enc):  # right padding: causal attention never lets a real token see a pad
            ids[b, : len(e["input_ids"])] = torch.tensor(e["input_ids"], dtype=torch.long)
            mask[b, : len(e["input_ids"])] = 1
        ids, mask = ids.to(backbone.device), mask.to(backbone.device)
        pos = torch.arange(T, device=ids.device).expand(len(chunk), T)  # (B, T)
        inputs = PromptInputs(backbone.embed(ids), mask, pos, ids.new_zeros(len(chunk), 0), pos, pos[:, -1:])
        hidden = backbone(inputs).float().cpu()  # (B, T, D)
        for b, (text, e) in enumerate(zip(chunk, enc, strict=True)):
            words = input_words(text, limit)
            slot = {w: i for i, w in enumerate(words)}
            owner = [-1] * len(text)  # char -> word index
            for m in _WORD.finditer(text):
                if m.group().lower() in slot:
                    owner[m.start() : m.end()] = [slot[m.group().lower()]] * (m.end() - m.start())
            feats, counts = torch.zeros(len(words), hidden.shape[-1]), torch.zeros(len(words), 1)
            for t, (s, end) in enumerate(e["offset_mapping"]):
                w = next((owner[c] for c in range(end - 1, s - 1, -1) if owner[c] >= 0), -1)
                if w >= 0:
                    feats[w] += hidden[b, t]
                    counts[w] += 1
            out.append(feats / counts.clamp(min=1))
    return out


# ---- Plackett-Luce ---------------------------------------------------------------------------------------------------
def pl_sample(scores: Tensor, k: int, generator: torch.Generator | None) -> list[int]:
    """k distinct indices drawn from softmax(scores) without replacement (greedy top-k when generator is None)."""
    k = min(k, scores.shape[0])
    if generator is None:
        return scores.topk(k).indices.tolist()
    u = torch.rand(scores.shape, generator=generator).clamp(1e-12, 1 - 1e-12)
    return (scores.detach() - torch.log(-torch.log(u))).topk(k).indices.tolist()  # Gumbel top-k: exact PL sample


def pl_log_prob(scores: Tensor, order: Sequence[int]) -> Tensor:
    """log P(order) under Plackett-Luce: sum_j [s_{o_j} - logsumexp(s of the words not chosen before j)]."""
    chosen = torch.tensor(list(order), dtype=torch.long)  # (k,)
    taken = torch.zeros(len(chosen), scores.shape[0], dtype=torch.bool)  # (k, W): row j masks o_0 .. o_{j-1}
    for j in range(1, len(chosen)):
        taken[j, chosen[:j]] = True
    denominators = scores.expand(len(chosen), -1).masked_fill(taken, -math.inf).logsumexp(-1)  # (k,)
    return (scores[chosen] - denominators).sum()


def tfidf_targets(word_lists: list[list[str]], k: int) -> list[list[int]]:
    """Per text, the indices of its k highest TF-IDF words (document frequency over all texts)."""
    df = Counter(w for words in word_lists for w in set(words))
    n = len(word_lists)
    return [
        sorted(range(len(words)), key=lambda i: (-math.log((1 + n) / (1 + df[words[i]])), i))[:k]
        for words in word_lists
    ]


def render_hint(template: str, words: list[str], order: Sequence[int]) -> str:
    return template.replace("{keywords}", ", ".join(words[i] for i in sorted(order)))


class HintWriter:
    """Keyword choices -> hint texts for inputs, with each input's word features computed once (frozen LM)."""

    def __init__(self, backbone: Any, column: str, config: Any):
        """`config` needs `max_words`, `num_keywords` and `hint_template` (a `DirectionalStimulusConfig`)."""
        self.backbone, self.column, self.config = backbone, column, config
        self.features: dict[str, tuple[list[str], Tensor]] = {}  # example key -> (words, (W, D)); recomputable

    def featurise(self, examples: Sequence[Example]) -> None:
        todo = list({example_key(ex): ex for ex in examples if example_key(ex) not in self.features}.values())
        texts = [resolve_field(ex, self.column) for ex in todo]
        limit = self.config.max_words
        for ex, text, feats in zip(todo, texts, word_features(self.backbone, texts, limit), strict=True):
            self.features[example_key(ex)] = (input_words(text, limit), feats)

    def scores(self, key: str, scorer: nn.Module) -> Tensor:
        return scorer(self.features[key][1])[:, 0]  # (W,)

    def hints(
        self, examples: Sequence[Example], scorer: nn.Module, orders: dict[str, list[int]] | None = None
    ) -> dict[str, str]:
        """Example key -> hint: the keywords in `orders` (sampled), else the greedy choice of `scorer`."""
        self.featurise(examples)
        out = {}
        for key in (example_key(ex) for ex in examples):
            with torch.no_grad():
                order = orders[key] if orders else pl_sample(self.scores(key, scorer), self.config.num_keywords, None)
            out[key] = render_hint(self.config.hint_template, self.features[key][0], order) if order else ""
        return out

    def specialize(self, candidate: Candidate, examples: Sequence[Example], scorer: nn.Module) -> Candidate:
        """Greedy hints for the optimiser's candidate (text with `{hint}`) when it has none yet; other candidates
        (the manual prompt) are left alone."""
        if candidate.hints or "{hint}" not in candidate.text:
            return candidate
        return candidate.specialized(hints=self.hints(examples, scorer))


def make_scorer(dim: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))


def kl_words(scores: Tensor, reference: Tensor) -> Tensor:
    """KL(softmax(scores) || softmax(reference)) over one input's words."""
    logp, logq = scores.log_softmax(0), reference.detach().log_softmax(0)
    return (logp.exp() * (logp - logq)).sum()


def without_word(example: Example, column: str, word: str) -> Example:
    """The example with every occurrence of `word` (case-insensitive, whole word) removed from its text column."""
    value = resolve_field(example, column)
    key = next(k for k, v in example.fields.items() if v == value)
    pattern = re.compile(rf"(?<![\w'-]){re.escape(word)}(?![\w'-])", re.IGNORECASE)
    text = re.sub(r"\s{2,}", " ", pattern.sub("", value)).strip()
    return Example({**example.fields, key: text}, example.label, example.source)
