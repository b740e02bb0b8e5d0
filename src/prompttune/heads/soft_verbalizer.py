"""Soft verbalizer: learned label embeddings scored against the answer position's hidden state, as in WARP
(Hambardzumyan et al., 2021, "WARP: Word-level Adversarial ReProgramming", arXiv 2101.00121).

Class score = h . e_c + b_c, where h is the final hidden state at the answer position and (e_c, b_c) start as the
LM head's row (and bias) of the first token of label c's word(s), averaged over the label's words. At that start
the scores equal the label words' next-token logits, so the softmax over classes is the plain single-token
verbalizer's; training then moves the label embeddings away from the words. Content-free calibration of the class
scores is the plain verbalizer's (this head subclasses it); training reads one position per example, whatever the
words' lengths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..config import build_section
from ..data.collate import Batch
from ..data.templates import Prompt
from ..errors import PromptTuneError
from ..registry import register_head
from ..types import Row
from .base import gather_positions
from .verbalizer import VerbalizerHead

_CHUNK = 64  # rows of the identity fed through the LM head at once: (64, V) logits, not (D, V)


@dataclass
class SoftVerbalizerConfig:
    """Options of the soft verbalizer (`head: soft_verbalizer`)."""

    init: str = "words"
    """Start the label embeddings from the label words' output embeddings (`words`) or from small random vectors
    (`random`, seeded by the training seed)."""
    lr_scale: float = 1.0
    """The label embeddings' learning rate as a multiple of the training `lr`."""

    def __post_init__(self) -> None:
        if self.init not in ("words", "random"):
            raise PromptTuneError(f"head soft_verbalizer: field 'init': expected words or random, got {self.init!r}")
        if not self.lr_scale > 0:
            raise PromptTuneError(
                f"head soft_verbalizer: field 'lr_scale': expected a positive number, got {self.lr_scale!r}"
            )


@register_head("soft_verbalizer")
class SoftVerbalizerHead(VerbalizerHead):
    config_cls = SoftVerbalizerConfig

    def __init__(
        self,
        labels: Sequence[str],
        kind: str,
        words: dict[str, list[str]],
        tokenizer: Any,
        hidden_size: int,
        config: SoftVerbalizerConfig,
    ):
        super().__init__(labels, kind, words, tokenizer)
        self.soft = config
        C = len(self.labels)
        self.class_embed = nn.Parameter(torch.randn(C, hidden_size) * hidden_size**-0.5)  # (C, D)
        self.class_bias = nn.Parameter(torch.zeros(C))  # (C,)

    @classmethod
    def from_task(cls, task: Any, backbone: Any, labels: Sequence[str]) -> SoftVerbalizerHead:
        head = cls.from_saved({}, task, backbone, labels)
        if head.soft.init == "words":
            head.init_from_words(backbone)
        return head

    @classmethod
    def from_saved(cls, saved: dict[str, Any], task: Any, backbone: Any, labels: Sequence[str]) -> SoftVerbalizerHead:
        """Structure only: the label embeddings come from head.safetensors."""
        cfg = build_section(SoftVerbalizerConfig, task.head_config, "head soft_verbalizer")
        if not task.verbalizer:
            raise PromptTuneError(
                "config field 'verbalizer': the soft verbalizer starts from label words, e.g. '0= bad,1= good'"
            )
        return cls(labels, backbone.kind, task.verbalizer, backbone.tokenizer, backbone.spec.output_size, cfg)

    @torch.no_grad()
    def init_from_words(self, backbone: Any) -> None:
        """e_c, b_c = mean over label c's words of the LM head's row and bias for the word's first token.

        The rows are read through `backbone.lm_logits` (an affine map h -> W h + b): b = lm_logits(0) and
        W[:, j] = lm_logits(unit vector j) - b, so no architecture-specific attribute is needed.
        """
        D = self.class_embed.shape[1]
        dev = backbone.device
        bias = backbone.lm_logits(torch.zeros(1, D, device=dev)).float()[0]  # (V,)
        first = self.first_tokens.to(dev)  # (W,)
        rows = []
        for start in range(0, D, _CHUNK):
            eye = torch.eye(D, device=dev)[start : start + _CHUNK]  # (k, D)
            rows.append((backbone.lm_logits(eye).float() - bias)[:, first])  # (k, W)
        weight = torch.cat(rows).T.cpu()  # (W, D): output embedding of each word's first token
        for c in range(len(self.labels)):
            cols = (self.option_class == c).cpu()
            self.class_embed[c] = weight[cols].mean(0).to(self.class_embed)
            self.class_bias[c] = bias.cpu()[first.cpu()[cols]].mean().to(self.class_bias)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return super().param_groups(lr * self.soft.lr_scale)

    def rows(self, prompt: Prompt, example: int, target: Any = None) -> list[Row]:
        return [Row(prompt.ids, prompt.soft, (len(prompt.ids) - 1,), example=example)]

    def forward(self, hidden: Tensor, batch: Batch, backbone: nn.Module, num_examples: int) -> Tensor:
        h = gather_positions(hidden, batch.read_positions[:, :1])[:, 0].float()  # (N, D)
        return h @ self.class_embed.T + self.class_bias - self.prior  # (N, C)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "soft_verbalizer": asdict(self.soft)}
