"""Prefix tuning: Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation"
(arXiv 2101.00190).

Trainable keys and values prepended at every attention layer. Optionally reparameterised through an MLP
(`projection=True`) as in the paper; the MLP is saved with the artifact, so a run resumes exactly (PEFT keeps only
the MLP's outputs, peft#2043). `init=text` starts from the frozen model's own keys/values of a real text, the
initialisation the paper found important with little data.

Known limit (PEFT shares it): in a left-padded batch the padding sits between the prefix and the text, so in a
sliding-window layer (Gemma 2/3, Mistral v0.1) an early text token whose window reaches back to the prefix when the
text runs alone reaches only padding in a batch. Models without sliding windows are exact, and so are texts shorter
than the window minus the padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import PromptTuneError
from ..registry import register_method
from ..types import BackboneSpec, PromptInputs
from .base import InitContext, SoftPromptMethod, check_config


@dataclass
class PrefixTuningConfig:
    num_virtual_tokens: int = 16
    """Prefix length (keys/values per layer)."""
    projection: bool = False
    """Reparameterise the prefix as MLP(embedding) during training."""
    projection_hidden: int = 512
    """Hidden width of the reparameterisation MLP."""
    init: str = "text"
    """`text` (frozen keys/values of real text; not with projection) or `random`."""
    init_text: str | None = None
    """Text for `init=text` (default: blank space, the start closest to the zero-shot template; `.` where the
    tokenizer drops spaces)."""

    def __post_init__(self) -> None:
        check_config(
            self.num_virtual_tokens > 0,
            "prefix_tuning",
            "num_virtual_tokens",
            "a positive integer",
            self.num_virtual_tokens,
        )
        check_config(self.init in ("text", "random"), "prefix_tuning", "init", "text or random", self.init)
        check_config(
            not (self.projection and self.init == "text"),
            "prefix_tuning",
            "init",
            "random when projection is on (the MLP output cannot start from text)",
            self.init,
        )


@register_method("prefix_tuning")
class PrefixTuning(SoftPromptMethod):
    config_cls = PrefixTuningConfig
    supports = frozenset({"causal_lm"})

    def __init__(self, config: PrefixTuningConfig, spec: BackboneSpec):
        super().__init__(config, spec)
        L, P, kvh, hd = spec.num_layers, config.num_virtual_tokens, spec.num_kv_heads, spec.head_dim
        self.shape = (L, 2, kvh, P, hd)
        if config.projection:
            self.embedding = nn.Parameter(torch.randn(P, spec.hidden_size) * 0.02)  # (P, D)
            self.mlp = nn.Sequential(
                nn.Linear(spec.hidden_size, config.projection_hidden),
                nn.Tanh(),
                nn.Linear(config.projection_hidden, L * 2 * kvh * hd),
            )
        else:
            self.kv = nn.Parameter(torch.zeros(self.shape))  # (L, 2, kvh, P, hd)

    def initialize(self, ctx: InitContext) -> None:
        if self.config.projection:
            return  # default module init, seeded by the loop
        P = self.config.num_virtual_tokens
        if self.config.init == "random" or ctx.prefix_kv is None:
            with torch.no_grad():
                self.kv.copy_(0.5 * torch.randn(self.shape, generator=ctx.generator))
            return
        text = self.config.init_text or ctx.hint_text
        ids = (
            ctx.tokenizer(text, add_special_tokens=False)["input_ids"]
            or ctx.tokenizer(".", add_special_tokens=False)["input_ids"]
        )
        if not ids:
            raise PromptTuneError(f"init_text {text!r} tokenises to nothing")
        ids = (ids * P)[:P]  # cycle the text to fill the prefix
        with torch.no_grad():
            self.kv.copy_(ctx.prefix_kv(ids).to(self.kv))

    def prefix(self) -> Tensor:
        """The prefix keys/values (L, 2, kvh, P, hd)."""
        if not self.config.projection:
            return self.kv
        L, two, kvh, P, hd = self.shape
        flat = self.mlp(self.embedding)  # (P, L * 2 * kvh * hd)
        return flat.view(P, L, two, kvh, hd).permute(1, 2, 3, 0, 4)  # (L, 2, kvh, P, hd)

    def apply(self, inputs: PromptInputs) -> PromptInputs:
        if inputs.decoding:  # the prefix already sits in the decoding cache
            return inputs
        if inputs.past_key_values is not None:
            raise PromptTuneError("prefix_tuning cannot be combined with a cached text prefix")
        kv = self.prefix()  # (L, 2, kvh, P, hd)
        B, P = inputs.inputs_embeds.shape[0], self.config.num_virtual_tokens
        past = tuple((kv[i, 0].expand(B, -1, -1, -1), kv[i, 1].expand(B, -1, -1, -1)) for i in range(kv.shape[0]))
        # The prefix occupies positions 0..P-1, as in PEFT, so the text keeps positions P.. (exports agree).
        return inputs.replace(
            past_key_values=past,
            position_ids=inputs.position_ids + P,
            past_attention_mask=inputs.attention_mask.new_ones(B, P),
        )

    def peft_export(self) -> tuple[str, Tensor]:
        kv = self.prefix().detach()  # (L, 2, kvh, P, hd)
        L, two, kvh, P, hd = kv.shape
        return "PREFIX_TUNING", kv.permute(3, 0, 1, 2, 4).reshape(P, L * two * kvh * hd)  # PEFT get_prompt's order
