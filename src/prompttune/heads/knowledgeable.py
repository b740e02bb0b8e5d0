"""Knowledgeable verbalizer (KPT): Hu et al., 2022, "Knowledgeable Prompt-tuning: Incorporating Knowledge into Prompt
Verbalizer for Text Classification", arXiv 2108.02035 (SciPrompt applies the same idea to scientific topics).

Each label's own words (the anchors) are expanded into many related words, refined on support data and weighted:

- expansion, without network access: the nearest neighbours of the anchors in the backbone's own input-embedding
  space (whole-word tokens with a leading space; each word goes to one label only), and/or a user-supplied list;
- frequency refinement: drop related words the model finds unlikely at the answer position (their prior on the
  support texts is in the lowest `frequency_cutoff` fraction of the whole vocabulary's prior);
- relevance refinement: drop related words whose probability profile across the support texts is not closer to
  their own label's anchors than to the other labels' (KPT's R(v) = r(v, own) / mean of r(v, other) < 1);
- contextualized calibration: divide each word's probability by its prior on the support texts;
- aggregation: class score = sum over the label's kept words of alpha_v * calibrated log-probability, alpha =
  softmax of per-word logits (zeros: KPT's zero-shot average; `learn_weights`: trained with the task loss).

Support texts are the training texts (labels unused) or an unlabelled `support` file. Scoring, multi-token words
included, is the plain verbalizer's (this head subclasses it), and so is the optional content-free calibration of
the class scores (`calibrate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import build_section
from ..errors import PromptTuneError
from ..registry import register_head
from ..types import Example
from .base import gather_positions
from .label_words import related_words
from .verbalizer import VerbalizerHead


@dataclass
class KPTConfig:
    """Options of the knowledgeable verbalizer (`head: kpt`)."""

    expand: int = 16
    """Related words added per label from the backbone's input-embedding space (nearest neighbours of the label's
    own words); 0 = none."""
    related_words: Any = None
    """User-supplied related words: a mapping label -> words, or a file: JSON (that mapping) or text lines
    `label<TAB>word, word, ...`. A word gets the leading space its label's own words have."""
    max_word_tokens: int = 1
    """Related words longer than this many tokens are dropped (each multi-token word costs one more row per
    example); the label's own words are always kept."""
    support: str | None = None
    """Unlabelled file (TSV/CSV/JSONL with the template's fields) for the priors (default: the training texts)."""
    support_size: int = 256
    """At most this many support texts (the first ones) estimate the priors."""
    frequency_cutoff: float = 0.5
    """Frequency refinement: drop related words whose prior is below this quantile of the vocabulary's (0 = off)."""
    relevance: bool = True
    """Relevance refinement: drop related words closer to the other labels' anchors than to their own."""
    calibrate_words: bool = True
    """Contextualized calibration: divide each word's probability by its prior on the support texts."""
    learn_weights: bool = True
    """Train one weight per word with the task loss (KPT few-shot); off = the plain average (KPT zero-shot)."""

    def __post_init__(self) -> None:
        checks = [
            (self.expand >= 0, "expand", "a non-negative integer", self.expand),
            (self.max_word_tokens >= 1, "max_word_tokens", "a positive integer", self.max_word_tokens),
            (self.support_size >= 1, "support_size", "a positive integer", self.support_size),
            (0 <= self.frequency_cutoff < 1, "frequency_cutoff", "a number in [0, 1)", self.frequency_cutoff),
        ]
        for ok, name, expected, got in checks:
            if not ok:
                raise PromptTuneError(f"head kpt: field {name!r}: expected {expected}, got {got!r}")


@register_head("kpt")
class KnowledgeableVerbalizerHead(VerbalizerHead):
    config_cls = KPTConfig

    def __init__(
        self,
        labels: Sequence[str],
        kind: str,
        words: dict[str, list[str]],
        tokenizer: Any,
        anchors: dict[str, int],
        config: KPTConfig,
    ):
        super().__init__(labels, kind, words, tokenizer)
        self.kpt = config
        self.anchors = {label: int(anchors[label]) for label in self.labels}
        is_anchor = [i < self.anchors[label] for label in self.labels for i in range(len(self.words[label]))]
        W = len(self.options)
        self.register_buffer("is_anchor", torch.tensor(is_anchor), persistent=False)  # (W,)
        self.register_buffer("keep", torch.ones(W, dtype=torch.bool))  # (W,) refinement's verdict
        self.register_buffer("word_prior", torch.zeros(W))  # (W,) log prior on the support texts; 0 = uncalibrated
        if config.learn_weights:
            self.word_weight = nn.Parameter(torch.zeros(W))  # (W,) softmax-normalised within each label
        else:
            self.register_buffer("word_weight", torch.zeros(W))

    # ---- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def from_task(cls, task: Any, backbone: Any, labels: Sequence[str]) -> KnowledgeableVerbalizerHead:
        cfg = build_section(KPTConfig, task.head_config, "head kpt")
        if not task.verbalizer:
            raise PromptTuneError("config field 'verbalizer': the kpt head expands label words, e.g. '0= bad,1= good'")
        anchors = {label: list(task.verbalizer[label]) for label in labels}
        related = related_words(anchors, backbone, cfg.related_words, cfg.expand, cfg.max_word_tokens)
        words = {label: anchors[label] + related[label] for label in labels}
        counts = {label: len(anchors[label]) for label in labels}
        return cls(labels, backbone.kind, words, backbone.tokenizer, counts, cfg)

    @classmethod
    def from_saved(
        cls, saved: dict[str, Any], task: Any, backbone: Any, labels: Sequence[str]
    ) -> KnowledgeableVerbalizerHead:
        """The saved word list is used as is: no new expansion, no need for the original related-words file."""
        cfg = build_section(KPTConfig, task.head_config, "head kpt")
        return cls(labels, backbone.kind, saved["words"], backbone.tokenizer, saved["anchors"], cfg)

    # ---- scoring --------------------------------------------------------------------------------------------------
    def _class_scores(self, word_scores: Tensor) -> Tensor:
        """(N, W) word log-probs -> (N, C): weighted mean of the kept words' calibrated log-probabilities."""
        calibrated = word_scores - self.word_prior  # (N, W)
        logits = self.word_weight.masked_fill(~self.keep, -torch.inf)  # (W,)
        out = []
        for c in range(len(self.labels)):
            cols = self.option_class == c
            alpha = torch.softmax(logits[cols], -1)  # (W_c,) zero on dropped words
            terms = torch.where(alpha > 0, calibrated[:, cols] * alpha, 0.0)  # (N, W_c) no 0 * -inf
            out.append(terms.sum(-1))
        return torch.stack(out, -1)  # (N, C)

    # ---- refinement on support data -------------------------------------------------------------------------------
    def prepare(self, model: Any, train: Sequence[Example]) -> dict[str, Any]:
        """Frequency and relevance refinement and the word priors, from the support texts (labels unused)."""
        support = list(train)
        if self.kpt.support:
            from ..data.examples import load_examples

            support = load_examples(self.kpt.support, require_label=False)
        support = support[: self.kpt.support_size]
        word_logp, vocab_prob = self.support_statistics(model, support)  # (S, W), (V,)
        probs = word_logp.exp()  # (S, W)
        prior = probs.mean(0)  # (W,)
        keep = torch.ones_like(self.keep.cpu())
        dropped: dict[str, list[str]] = {"frequency": [], "relevance": []}
        if self.kpt.frequency_cutoff > 0:
            floor = torch.quantile(vocab_prob, self.kpt.frequency_cutoff)
            rare = (prior < floor) & ~self.is_anchor.cpu()
            dropped["frequency"] = self._names(rare)
            keep &= ~rare
        if self.kpt.relevance and len(self.labels) > 1:
            irrelevant = (relevance(probs, self.option_class.cpu(), self.is_anchor.cpu()) < 1) & ~self.is_anchor.cpu()
            dropped["relevance"] = self._names(irrelevant & keep)
            keep &= ~irrelevant
        with torch.no_grad():
            self.keep.copy_(keep)
            self.word_prior.copy_(prior.clamp_min(1e-30).log() if self.kpt.calibrate_words else torch.zeros_like(prior))
        return {"kpt_support": len(support), "kpt_kept": self.kept_words(), "kpt_dropped": dropped}

    @torch.no_grad()
    def support_statistics(
        self, model: Any, examples: Sequence[Example], batch_size: int = 32
    ) -> tuple[Tensor, Tensor]:
        """Word log-probabilities (S, W) on each support text and the vocabulary's mean probability (V,) at the answer,
        with the model's current prompt and no word calibration."""
        word = torch.zeros(len(examples), len(self.options))
        vocab: Tensor | None = None
        for idx, batch in model.batches(examples, batch_size):
            hidden, batch = model.hidden_states(batch)  # (B, T, D)
            word[idx] = self.word_scores(hidden, batch, model.backbone, len(idx)).float().cpu()
            first = batch.option == 0  # one row per example (all rows of an example share the answer position)
            h = gather_positions(hidden[first], batch.read_positions[first][:, :1])[:, 0]  # (N, D)
            p = F.softmax(model.backbone.lm_logits(h).float(), -1).sum(0).cpu()  # (V,)
            vocab = p if vocab is None else vocab + p
        assert vocab is not None
        return word, vocab / len(examples)

    def _names(self, mask: Tensor) -> list[str]:
        flat = [w for label in self.labels for w in self.words[label]]
        return [flat[i] for i in torch.nonzero(mask).flatten().tolist()]

    def kept_words(self) -> dict[str, list[str]]:
        flat = [w for label in self.labels for w in self.words[label]]
        keep = self.keep.tolist()
        return {
            label: [flat[i] for i in range(len(flat)) if keep[i] and int(self.option_class[i]) == c]
            for c, label in enumerate(self.labels)
        }

    def config(self) -> dict[str, Any]:
        # `words` is the full list the tensors index; `kept` is informative (the `keep` tensor is authoritative).
        return {**super().config(), "anchors": self.anchors, "kept": self.kept_words(), "kpt": asdict(self.kpt)}


def relevance(probs: Tensor, word_class: Tensor, is_anchor: Tensor) -> Tensor:
    """KPT's relevance R(v) = r(v, own label) / mean over other labels of r(v, label).

    Args:
        probs: (S, W) probability of each word on each support text.
        word_class: (W,) label index of each word.
        is_anchor: (W,) bool, the labels' own words; a label's profile is the mean of its anchors' columns.
    Returns:
        (W,) relevance; below 1 means a word is closer to other labels than to its own.
    """
    C = int(word_class.max()) + 1
    profiles = torch.stack([probs[:, is_anchor & (word_class == c)].mean(1) for c in range(C)], 1)  # (S, C)
    r = F.cosine_similarity(probs.T[:, None, :], profiles.T[None, :, :], dim=-1)  # (W, C)
    own = r.gather(1, word_class[:, None])[:, 0]  # (W,)
    others = (r.sum(1) - own) / max(C - 1, 1)  # (W,)
    return own / others.clamp_min(1e-12)
