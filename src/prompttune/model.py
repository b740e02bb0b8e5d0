"""`PromptModel`: backbone + method + head + template, and the one forward path every front end shares.

examples --template--> Prompt --head.rows--> Row --collate--> Batch
Batch --embed--> PromptInputs --method.apply--> PromptInputs --backbone--> hidden --head--> scores
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from .backbones.base import Backbone
from .data.collate import Batch, collate
from .data.templates import Template
from .errors import PromptTuneError
from .heads.base import Head
from .methods.base import SoftPromptMethod
from .types import Example, PromptInputs, Row

_MIN_CACHED_PREFIX = 2  # a shorter frozen prefix is not worth a cache entry
_CONTENT_FREE = ("N/A", "", "[MASK]")  # Zhao et al., 2021


class PromptModel(nn.Module):
    """The trainable parts (`method`, `head`) plus the frozen backbone and the template.

    The backbone is deliberately not a registered submodule: `parameters()` and `state_dict()` then hold exactly
    what is trained and saved.
    """

    def __init__(
        self,
        backbone: Backbone,
        method: SoftPromptMethod,
        head: Head,
        template: Template,
        max_length: int | None = None,
        truncate: bool = False,
    ):
        super().__init__()
        method.check_template(template)  # a layout the method cannot serve fails here, before any data is read
        self.__dict__["backbone"] = backbone
        self.method = method
        self.head = head
        self.template = template
        self.max_length = min(max_length or backbone.spec.max_positions, backbone.spec.max_positions)
        self.truncate = truncate
        self.cache_prefix = False

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    # ---- encoding -------------------------------------------------------------------------------------------
    def encode(self, examples: Sequence[Example], with_targets: bool = False) -> list[list[Row]]:
        """Rows per example (several for multi-token label words). Targets are attached for text heads."""
        out = []
        for i, ex in enumerate(examples):
            prompt = self.template.encode(
                ex,
                self.backbone.tokenizer,
                self.method.num_soft_slots,
                self.max_length,
                self.truncate,
                self.backbone.pad_id,
                add_suffix=self.backbone.kind == "encoder",
            )
            target = ex.label if (with_targets and not self.head.is_classifier) else None
            rows = self.head.rows(prompt, i, target)
            if max(len(r.ids) for r in rows) > self.backbone.spec.max_positions:
                raise PromptTuneError(
                    f"{ex.source}: prompt plus answer exceed the model's "
                    f"{self.backbone.spec.max_positions}-token context"
                )
            out.append(rows)
        return out

    def use_prefix_cache(self, enabled: bool) -> None:
        """Reuse frozen keys/values of the text before the first soft slot (only where that is exact)."""
        self.cache_prefix = enabled and self.method.edits_only_soft_slots and self.backbone.supports_prefix_cache

    def make_batch(self, rows: Sequence[Row], keep_cache: bool = True) -> Batch:
        """Collate rows, splitting off cached frozen prefixes when enabled."""
        prefixes = None
        if self.cache_prefix and all(r.soft and r.soft[0] >= _MIN_CACHED_PREFIX for r in rows):
            keys = [r.ids[: r.soft[0]] for r in rows]
            store = self.backbone.prefix_store  # frozen keys/values depend only on the backbone and the ids
            missing = list(dict.fromkeys(k for k in keys if k not in store))
            # One prefix per call: a cached value then never depends on which rows first shared its batch (left
            # padding changes float rounding), so a resumed run sees exactly the values the uninterrupted one did.
            fresh = {k: self.backbone.encode_prefixes([k])[0] for k in missing}
            if keep_cache or self.backbone.keep_all_prefixes:
                store.update(fresh)
            prefixes = [store.get(k, fresh.get(k)) for k in keys]
        return collate(rows, self.backbone.pad_id, prefixes)

    # ---- forward --------------------------------------------------------------------------------------------
    def inputs(self, batch: Batch) -> PromptInputs:
        """Batch -> PromptInputs on the backbone's device (before the method is applied)."""
        return self.backbone.inputs(batch)

    def hidden_states(self, batch: Batch) -> tuple[Tensor, Batch]:
        """Final hidden states `(B, T, D)` with the method applied, and the batch on the model's device (for code
        that reads more than the head's scores: label-word priors, pooled embeddings)."""
        return self.backbone(self.method.apply(self.inputs(batch))), _to(batch, self.device)

    def forward(self, batch: Batch, num_examples: int) -> Tensor:
        """Scores (N, C) for classification heads, target logits (B, K, V) for the generation head."""
        hidden = self.backbone(self.method.apply(self.inputs(batch)))  # (B, T, D)
        return self.head(hidden, _to(batch, self.device), self.backbone, num_examples)

    # ---- inference ------------------------------------------------------------------------------------------
    def batches(
        self, examples: Sequence[Example], batch_size: int, keep_cache: bool = False
    ) -> Iterator[tuple[list[int], Batch]]:
        """Length-sorted batches (less padding); yields the example indices each batch covers."""
        encoded = self.encode(examples)
        order = sorted(range(len(examples)), key=lambda i: -max(len(r.ids) for r in encoded[i]))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            rows = [Row(r.ids, r.soft, r.read, r.targets, j, r.option) for j, i in enumerate(idx) for r in encoded[i]]
            yield idx, self.make_batch(rows, keep_cache)

    @torch.no_grad()
    def scores(self, examples: Sequence[Example], batch_size: int = 32, keep_cache: bool = False) -> Tensor:
        """Class scores (N, C) in the input order; `keep_cache` keeps frozen prefixes for the next call (dev)."""
        out = torch.zeros(len(examples), len(self.head.labels))
        for idx, batch in self.batches(examples, batch_size, keep_cache):
            out[idx] = self(batch, len(idx)).float().cpu()
        return out

    @torch.no_grad()
    def generate(
        self, examples: Sequence[Example], batch_size: int = 16, max_new_tokens: int | None = None
    ) -> list[str]:
        """Greedy generations, in the input order."""
        out: list[str] = [""] * len(examples)
        limit = max_new_tokens or getattr(self.head, "max_new_tokens", 32)
        stops = getattr(self.head, "stop_ids", None) or [self.backbone.tokenizer.eos_token_id]
        # Decoding appends after the last column, so prompts must be left-padded: never a cached-prefix batch
        # (its text after the prefix is right-padded).
        cached, self.cache_prefix = self.cache_prefix, False
        try:
            for idx, batch in self.batches(examples, batch_size):
                ids = self.backbone.generate(
                    self.inputs(batch), self.method.apply, limit, stops, constrain=self.head.constrain
                )
                for i, seq in zip(idx, ids, strict=True):
                    out[i] = self.head.decode(seq, self.backbone.tokenizer)
        finally:
            self.cache_prefix = cached
        return out

    @torch.no_grad()
    def represent(self, examples: Sequence[Example], layer: str = "final", batch_size: int = 16) -> Tensor:
        """Frozen features of examples as the template frames them, without soft tokens or the method.

        Each example is the mean over its non-special tokens (BOS/CLS/SEP carry no content, and a decoder's BOS state
        is an outlier that would dominate the mean) of the input embeddings (`layer="embedding"`) or of the final
        hidden states (`layer="final"`). Rows are left-padded with explicit positions, so a row's features do not
        depend on its batch neighbours.

        Returns:
            (N, D) float32 on the CPU, in the input order.
        Raises:
            PromptTuneError: an unknown `layer`.
        """
        if layer not in ("embedding", "final"):
            raise PromptTuneError(f"represent: layer must be 'embedding' or 'final', got {layer!r}")
        special = set(getattr(self.backbone.tokenizer, "all_special_ids", []) or [])
        tok, pad = self.backbone.tokenizer, self.backbone.pad_id
        suffix = self.backbone.kind == "encoder"
        prompts = [self.template.encode(ex, tok, 0, self.max_length, self.truncate, pad, suffix) for ex in examples]
        rows = [Row(p.ids, (), ()) for p in prompts]
        spec = self.backbone.spec
        out = torch.zeros(len(rows), spec.input_size if layer == "embedding" else spec.output_size)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            batch = collate(chunk, pad)
            inputs = self.inputs(batch)
            feats = inputs.inputs_embeds if layer == "embedding" else self.backbone(inputs)  # (B, T, D)
            keep = batch.attention_mask.bool() & ~torch.isin(batch.input_ids, torch.tensor(sorted(special) or [-1]))
            keep = torch.where(keep.any(1, keepdim=True), keep, batch.attention_mask.bool())  # all special: use all
            weights = keep.to(feats.dtype).to(feats.device)[..., None]  # (B, T, 1)
            out[start : start + len(chunk)] = ((feats * weights).sum(1) / weights.sum(1)).float().cpu()  # (B, D)
        return out

    @torch.no_grad()
    def content_free_prior(self) -> Tensor:
        """Log-prior of each class on content-free inputs (contextual calibration); leaves the head unchanged."""
        saved = self.head.prior.clone()
        self.head.prior.zero_()  # measure the raw prior, not the calibrated one
        examples = [Example({f: text for f in self.template.fields}, source="<content-free>") for text in _CONTENT_FREE]
        probs = self.scores(examples).softmax(-1).mean(0)  # (C,)
        self.head.prior.copy_(saved)
        return probs.log()


def _to(batch: Batch, device: torch.device) -> Batch:
    if device.type == "cpu":
        return batch
    fields = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.__dict__.items()}
    return Batch(**fields)
