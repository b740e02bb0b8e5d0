"""The backbone protocol: a frozen pretrained model that embeds ids and runs `PromptInputs`.

This package is the only place that touches transformers model classes; methods see a `BackboneSpec`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import PromptTuneError
from ..registry import BACKBONES, lookup
from ..types import BackboneSpec, PromptInputs


class Backbone(nn.Module):
    """A frozen model. Subclasses implement `forward` (final hidden states) and, for LMs, `lm_logits`."""

    kind: ClassVar[str]
    supports_prefix_cache: ClassVar[bool] = False

    def __init__(self, model: nn.Module, tokenizer: Any, name: str):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:  # padding is always masked, any id will do
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        # Frozen keys/values of token prefixes, shared by every prompt on this backbone (they never go stale: the
        # backbone never changes). `keep_all_prefixes` also keeps those of one-off evaluations (benchmarks).
        self.prefix_store: dict[tuple[int, ...], Tensor] = {}
        self.keep_all_prefixes = False
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        cfg = model.config.get_text_config()
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        max_pos = getattr(cfg, "max_position_embeddings", None) or getattr(tokenizer, "model_max_length", 2048)
        self.spec = BackboneSpec(
            kind=self.kind,
            name=name,
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=cfg.vocab_size,
            max_positions=int(min(max_pos, 1 << 20)),
            embed_tokens=self.embed,
        )

    def train(self, mode: bool = True) -> Backbone:
        # The backbone is frozen: dropout stays off even while a method trains.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def embed(self, ids: Tensor) -> Tensor:
        """Token ids (...,) -> input embeddings (..., D), including any model-specific scaling."""
        return self.model.get_input_embeddings()(ids.to(self.device))

    def forward(self, inputs: PromptInputs) -> Tensor:
        """Run the model; returns final hidden states `(B, T, D)` for the current (non-past) positions."""
        raise NotImplementedError

    def lm_logits(self, hidden: Tensor) -> Tensor:
        """Final hidden states (..., D) -> next-token logits (..., V). Call it only where logits are needed."""
        raise PromptTuneError(
            f"backbone {self.spec.name!r} ({self.kind}) has no language-model head; use the classifier head"
        )


def load_backbone(name: str, device: str | torch.device = "cpu") -> Backbone:
    """Load a frozen backbone by embedded name, `tiny-*` name, HF id or local path."""
    from .. import zoo

    model, tokenizer, ref = zoo.load(name)
    cls = lookup(BACKBONES, ref.kind, "backbone kind")
    return cls(model.to(device), tokenizer, name).to(device)
