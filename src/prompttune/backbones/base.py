"""The backbone protocol: a frozen pretrained model that embeds ids and runs `PromptInputs`.

This package is the only place that touches transformers model classes; methods see a `BackboneSpec`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..data.collate import Batch
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
            layer_inputs=self.layer_inputs,
            input_size=self.embed(torch.tensor([self.pad_id])).shape[-1],
        )
        self._layers: tuple[nn.Module, ...] | None = None  # found on first use (a tuple: not re-registered)

    def train(self, mode: bool = True) -> Backbone:
        # The backbone is frozen: dropout stays off even while a method trains.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def inputs(self, batch: Batch) -> PromptInputs:
        """Batch -> PromptInputs on this backbone's device (before any method is applied)."""
        dev = self.device
        past = None
        if batch.past is not None:
            past = tuple((k.to(dev), v.to(dev)) for k, v in batch.past)
        return PromptInputs(
            inputs_embeds=self.embed(batch.input_ids.to(dev)),
            attention_mask=batch.attention_mask.to(dev),
            position_ids=batch.position_ids.to(dev),
            soft_positions=batch.soft_positions.to(dev),
            token_index=batch.token_index.to(dev),
            read_positions=batch.read_positions.to(dev),
            past_key_values=past,
            past_attention_mask=None if batch.past_mask is None else batch.past_mask.to(dev),
        )

    def embed(self, ids: Tensor) -> Tensor:
        """Token ids (...,) -> input embeddings (..., D), including any model-specific scaling."""
        return self.model.get_input_embeddings()(ids.to(self.device))

    def forward(self, inputs: PromptInputs) -> Tensor:
        """Run the model; returns final hidden states `(B, T, D)` for the current (non-past) positions.

        Subclasses run the model inside `self.hooked(inputs)`, so a method's `layer_hook` is honoured.
        """
        raise NotImplementedError

    # ---- the per-layer seam ---------------------------------------------------------------------------------------
    @property
    def layers(self) -> tuple[nn.Module, ...]:
        """The transformer layers, in order (found by shape, see `find_layers`)."""
        if self._layers is None:
            self._layers = tuple(find_layers(self.model, self.spec.num_layers, self.spec.name))
        return self._layers

    def hooked(self, inputs: PromptInputs):
        """Context manager: `inputs.layer_hook` edits the input of every layer during this call only."""
        hook = inputs.layer_hook
        if hook is None:
            return nullcontext()
        return layer_hooks(self.layers, lambda layer, hidden: hook(layer, hidden, inputs))

    @torch.no_grad()
    def layer_inputs(self, ids: Sequence[int] | Tensor) -> Tensor:
        """Frozen hidden states of one token sequence at the input of every layer: (L,) ids -> (layers, L, D)."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)[None]  # (1, L)
        pos = torch.arange(ids.shape[1], device=self.device)[None]  # (1, L)
        seen: list[Tensor] = []

        def record(layer: int, hidden: Tensor, inputs: PromptInputs) -> Tensor:
            seen.append(hidden[0].detach().clone())  # (L, D)
            return hidden

        self(PromptInputs(self.embed(ids), torch.ones_like(ids), pos, ids[:, :0], pos, pos[:, -1:], layer_hook=record))
        return torch.stack(seen)  # (layers, L, D)

    def lm_logits(self, hidden: Tensor) -> Tensor:
        """Final hidden states (..., D) -> next-token logits (..., V). Call it only where logits are needed."""
        raise PromptTuneError(
            f"backbone {self.spec.name!r} ({self.kind}) has no language-model head; use the classifier head"
        )


def find_layers(model: nn.Module, num_layers: int, name: str = "model") -> nn.ModuleList:
    """The model's list of transformer layers, found by shape instead of by attribute name (`layers`, `h`,
    `layer`, `blocks` all occur): the shallowest `nn.ModuleList` holding `num_layers` modules of one class.

    Raises:
        PromptTuneError: no such list (the model is not a stack of `num_layers` layers).
    """
    found = [
        (qual.count("."), module)
        for qual, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == num_layers and len({type(m) for m in module}) == 1
    ]
    if not found:
        raise PromptTuneError(
            f"backbone {name!r}: no list of {num_layers} transformer layers found, so per-layer prompts "
            "(methods with a layer_hook) cannot run on it"
        )
    return min(found, key=lambda depth_module: depth_module[0])[1]


@contextmanager
def layer_hooks(layers: Sequence[nn.Module], hook: Callable[[int, Tensor], Tensor]) -> Iterator[None]:
    """Let `hook(layer, hidden (B, T, D)) -> hidden` rewrite the input of every layer until the block ends.

    The hooks are removed on exit (also on errors), so nothing leaks into later calls, and they act only in the
    thread that installed them, so two prompts running at once on one shared backbone never see each other's.
    """
    owner = threading.get_ident()

    def pre_hook(index: int):
        def rewrite(module: nn.Module, args: tuple, kwargs: dict):
            if threading.get_ident() != owner:
                return None
            if args:  # every HF decoder/encoder layer takes hidden_states first
                return (hook(index, args[0]), *args[1:]), kwargs
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": hook(index, kwargs["hidden_states"])}
            raise PromptTuneError(f"layer {index} ({type(module).__name__}) was called without hidden states")

        return rewrite

    handles = []
    try:
        for index, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(pre_hook(index), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def load_backbone(name: str, device: str | torch.device = "cpu") -> Backbone:
    """Load a frozen backbone by embedded name, `tiny-*` name, HF id or local path."""
    from .. import zoo

    model, tokenizer, ref = zoo.load(name)
    cls = lookup(BACKBONES, ref.kind, "backbone kind")
    return cls(model.to(device), tokenizer, name).to(device)
