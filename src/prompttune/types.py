"""Plain data carriers shared by data, backbones, methods and heads. No logic lives here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from torch import Tensor


@dataclass(frozen=True)
class BackboneSpec:
    """Sizes of a frozen backbone and a frozen embedding lookup; nothing architecture-specific.

    Methods read only this (never the model class), so one method file serves every backbone.
    """

    kind: str  # "causal_lm" | "encoder"
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    embed_tokens: Callable[[Tensor], Tensor] = field(repr=False, compare=False)  # (...,) ids -> (..., D)
    # (L,) ids -> (layers, L, D): the frozen hidden states of that text at the input of every transformer layer
    # (layer 0: the embeddings plus anything the model adds to them). For initialising per-layer prompts; None when
    # the backbone cannot provide them.
    layer_inputs: Callable[[Tensor], Tensor] | None = field(default=None, repr=False, compare=False)
    # Widths of the input embeddings (soft tokens live there) and of the final hidden states (heads read those); both
    # are `hidden_size` except where the model projects around its layers (OPT-350m, ALBERT, ELECTRA). 0 = hidden_size.
    input_size: int = 0
    output_size: int = 0

    def __post_init__(self) -> None:
        for name in ("input_size", "output_size"):
            if not getattr(self, name):
                object.__setattr__(self, name, self.hidden_size)  # frozen dataclass: set once, here

    @property
    def embeddings_at_layer_width(self) -> bool:
        """Whether layer 0 reads the input embeddings as they are; False where the model projects them first, so a
        per-layer prompt for layer 0 must be written at that layer's input, not into the embeddings."""
        return self.input_size == self.hidden_size

    def sizes(self) -> dict[str, int | str]:
        """The size fields an artifact records and checks on load."""
        keys = ("kind", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "vocab_size")
        return {k: getattr(self, k) for k in keys}


@dataclass(frozen=True)
class Example:
    """One row of user data: named text fields and an optional label (a string, or a list for multi-label)."""

    fields: dict[str, str]
    label: str | tuple[str, ...] | None = None
    source: str = "<memory>"  # "file:line" for error messages


@dataclass(frozen=True)
class Row:
    """One sequence to run through the backbone (an example may expand to several, e.g. multi-token label words).

    `ids` holds the full token sequence; soft slots hold a placeholder id that the method overwrites.
    """

    ids: tuple[int, ...]
    soft: tuple[int, ...]  # indices into ids reserved for soft tokens, in order
    read: tuple[int, ...]  # indices whose final hidden state the head reads
    targets: tuple[int, ...] = ()  # token ids predicted at `read` (multi-token words, text targets)
    example: int = 0  # index of the example this row belongs to (within its batch)
    option: int = 0  # which class (multi-token verbalizer) this row scores


@dataclass
class PromptInputs:
    """What a method transforms and a backbone runs. Methods return a new instance and never mutate this one."""

    inputs_embeds: Tensor  # (B, T, D)
    attention_mask: Tensor  # (B, T) 1 = real token
    position_ids: Tensor  # (B, T) kept correct under left padding and cached prefixes
    soft_positions: Tensor  # (B, P) long: indices into T of the template's soft slots (P may be 0)
    token_index: Tensor  # (B, T) long: index of each non-soft token within its own text, -1 on pads/soft slots
    read_positions: Tensor  # (B, K) long: where the head reads
    past_key_values: tuple[tuple[Tensor, Tensor], ...] | None = None  # per layer (B, kvh, Lp, hd) keys, values
    past_attention_mask: Tensor | None = None  # (B, Lp) mask of the past keys/values
    condition: Any | None = None
    decoding: bool = False  # an incremental decoding step: the prompt (and any prefix) is already in the cache
    # The per-layer seam: set by a method's `apply` (its bound `layer_hook`), called by the backbone at the input of
    # every transformer layer as `layer_hook(layer, hidden (B, T, D), these inputs) -> hidden (B, T, D)`, for this
    # one call only. `hidden` covers the same columns as `inputs_embeds` (never a cached prefix).
    layer_hook: Callable[[int, Tensor, PromptInputs], Tensor] | None = None

    def replace(self, **changes: Any) -> PromptInputs:
        return replace(self, **changes)
