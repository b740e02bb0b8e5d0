"""Text-to-text head: labels are target strings; the loss covers the target tokens only, computed at those
positions only; prediction is greedy decoding."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..data.collate import Batch
from ..data.templates import Prompt
from ..errors import PromptTuneError
from ..registry import register_head
from ..types import Row
from .base import Head, gather_positions


@register_head("generation")
class GenerationHead(Head):
    is_classifier = False

    def __init__(self, kind: str, tokenizer: Any, max_new_tokens: int = 32):
        super().__init__([], kind)
        if kind != "causal_lm":
            raise PromptTuneError("the generation head needs a causal LM")
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        eos = tokenizer.eos_token_id
        self.stop_ids = [eos] if eos is not None else []

    @classmethod
    def from_task(cls, task: Any, backbone: Any, labels: Any = None) -> GenerationHead:
        return cls(backbone.kind, backbone.tokenizer, task.max_new_tokens)

    def rows(self, prompt: Prompt, example: int, target: Any = None) -> list[Row]:
        end = len(prompt.ids) - 1
        if target is None:
            return [Row(prompt.ids, prompt.soft, (end,), example=example)]
        ids = tuple(self.tokenizer(str(target), add_special_tokens=False)["input_ids"]) + tuple(self.stop_ids)
        return [Row(prompt.ids + ids[:-1], prompt.soft, tuple(range(end, end + len(ids))), ids, example)]

    def forward(self, hidden: Tensor, batch: Batch, backbone: nn.Module, num_examples: int) -> Tensor:
        h = gather_positions(hidden, batch.read_positions)  # (B, K, D)
        return backbone.lm_logits(h).float()  # (B, K, V): target positions only

    def loss(self, scores: Tensor, targets: Tensor, batch: Batch) -> Tensor:
        return F.cross_entropy(scores.flatten(0, 1), batch.targets.to(scores.device).flatten(), ignore_index=-100)

    def dev_metrics(self, model: Any, dev: Any, batch_size: int) -> dict[str, Any]:
        from ..evaluation import evaluate

        return evaluate(model, dev, batch_size)

    def encode_labels(self, examples):  # targets travel inside the rows
        return None

    def config(self) -> dict[str, Any]:
        return {"head": self.name, "max_new_tokens": self.max_new_tokens}
