"""IAPT: Zhu et al., 2024, "IAPT: Instruction-Aware Prompt Tuning for Large Language Models" (arXiv 2405.18203).

A few soft tokens (4 in the paper) whose values at every transformer layer are generated from the input itself. At
the input of layer l a bottleneck generator reads the hidden states of the instruction (the prompt's real text):

    z = rms(H_l) W_down                   (T, m)  down-projection of the layer's RMS-normalised input states
    a_p = softmax_t(q_p . z_t / sqrt(m))  (P, T)  self-attention pooling, one learned query per soft token
    S_l = g_l(a z) W_up + b               (P, D)  learned activation, up-projection, per-token bias

and S_l replaces the soft slots' hidden states at layer l (layer 0: written into the embeddings, as prompt tuning
does). Pooling and down-projection are both linear, so pooling the projected states is the same map as projecting
the pooled ones; it is just cheaper. `g_l` is a rational function in Padé form, learned per layer, with a "safe"
denominator that is never below 1, so the activation has no poles (rational activations as in Molina et al., 2020,
"Padé Activation Units", arXiv 1907.06732, whose own safe variant is 1 + sum |b_k| |x|^k):

    g(x) = (a_0 + a_1 x + ... + a_5 x^5) / (1 + |b_1 x + ... + b_4 x^4|)

Its coefficients start as a least-squares fit of a standard activation (`activation`) on [-5, 5], computed at init
time. `W_up` starts at zero, so training starts exactly at `b`: a deep prompt initialised from text (see
`deep_prompt.py`), and the instruction-dependent part grows from there.

The instruction is every real token of the row (`token_index >= 0`, attention mask 1), never a pad or a soft slot,
so a row's prompt does not depend on its batch neighbours. In a causal LM only the tokens *before* the first soft
slot count: then nothing in the sequence depends on anything after it, so teacher-forced scoring, the generation
head's training targets and incremental decoding all see the same prompt, and no label token can leak into it. A
template must therefore put `{soft}` after the text (checked when the model is built). The frozen-prefix cache
(`edits_only_soft_slots`) stays off: the text before the slot is exactly what the generator reads at every layer,
and a cached prefix keeps only its keys and values, not its hidden states.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.templates import Template
from ..errors import PromptTuneError
from ..registry import register_method
from ..types import BackboneSpec, PromptInputs
from .base import InitContext, SoftPromptMethod, check_config, write_slots, write_soft
from .init import STRATEGIES, layer_init_vectors

NUM_DEGREE, DEN_DEGREE = 5, 4  # Padé activation units' (5, 4)
FIT_RANGE = 5.0  # wide enough that the fitted GELU keeps rising past |x| = 5 instead of bending back
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "relu": torch.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "identity": lambda x: x,
}


@dataclass
class IAPTConfig:
    num_virtual_tokens: int = 4
    """Soft tokens generated per layer per input (the paper uses 4)."""
    bottleneck: int = 16
    """Width m of each layer's generator (hidden -> m -> hidden)."""
    activation: str = "gelu"
    """Function the learned rational activations start from: gelu, relu, silu, tanh or identity."""
    init: str = "text"
    """Start of the per-token bias (the prompt before training): `text`, `sample_vocab` or `random`, as deep_prompt."""
    init_text: str | None = None
    """Text for `init=text` (default: blank space, the start closest to the zero-shot template; `.` where the
    tokenizer drops spaces)."""

    def __post_init__(self) -> None:
        check_config(
            self.num_virtual_tokens > 0, "iapt", "num_virtual_tokens", "a positive integer", self.num_virtual_tokens
        )
        check_config(self.bottleneck > 0, "iapt", "bottleneck", "a positive integer", self.bottleneck)
        check_config(
            self.activation in ACTIVATIONS, "iapt", "activation", f"one of {tuple(ACTIVATIONS)}", self.activation
        )
        check_config(self.init in STRATEGIES, "iapt", "init", f"one of {STRATEGIES}", self.init)


def rational(x: Tensor, numerator: Tensor, denominator: Tensor) -> Tensor:
    """Safe Padé activation `P(x) / (1 + |Q(x)|)`, elementwise.

    Args:
        x: any shape.
        numerator: (NUM_DEGREE + 1,) a_0 .. a_m.
        denominator: (DEN_DEGREE,) b_1 .. b_n (no constant term: the 1 is fixed).
    """
    p = torch.zeros_like(x)
    for a in numerator.flip(0):  # Horner
        p = p * x + a
    q = torch.zeros_like(x)
    for b in denominator.flip(0):
        q = q * x + b
    return p / (1 + (q * x).abs())


@functools.cache
def fit_rational(activation: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Padé coefficients approximating `activation` on [-FIT_RANGE, FIT_RANGE] (linearised least squares, float64).

    Solves P(x) - f(x) (b_1 x + ... + b_n x^n) = f(x) for (a, b), the standard linearisation of P / (1 + Q) = f;
    the minimum-norm solution (`gelsd`) keeps the identity exact and the denominators of the others non-negative.
    """
    x = torch.linspace(-FIT_RANGE, FIT_RANGE, 1001, dtype=torch.float64)  # (S,)
    y = ACTIVATIONS[activation](x)  # (S,)
    powers = x[:, None] ** torch.arange(NUM_DEGREE + 1, dtype=torch.float64)  # (S, m + 1)
    system = torch.cat([powers, -y[:, None] * powers[:, 1 : DEN_DEGREE + 1]], dim=1)  # (S, m + 1 + n)
    solution = torch.linalg.lstsq(system, y[:, None], driver="gelsd").solution[:, 0]  # (m + 1 + n,)
    return tuple(solution[: NUM_DEGREE + 1].tolist()), tuple(solution[NUM_DEGREE + 1 :].tolist())


@register_method("iapt")
class IAPT(SoftPromptMethod):
    config_cls = IAPTConfig
    # The generator reads the hidden states of the text before the slots, which a cached prefix does not keep.
    edits_only_soft_slots = False
    uses_layer_hook = True

    def __init__(self, config: IAPTConfig, spec: BackboneSpec):
        super().__init__(config, spec)
        L, P, D, m = spec.num_layers, config.num_virtual_tokens, spec.hidden_size, config.bottleneck
        self.down = nn.Parameter(torch.zeros(L, D, m))  # (L, D, m)
        self.query = nn.Parameter(torch.zeros(L, P, m))  # (L, P, m) one pooling query per soft token
        self.numerator = nn.Parameter(torch.zeros(L, NUM_DEGREE + 1))  # (L, 6) a_0 .. a_5 per layer
        self.denominator = nn.Parameter(torch.zeros(L, DEN_DEGREE))  # (L, 4) b_1 .. b_4 per layer
        self.up = nn.Parameter(torch.zeros(L, m, D))  # (L, m, D)
        self.bias = nn.Parameter(torch.zeros(L, P, D))  # (L, P, D) the prompt the generator starts from

    @property
    def num_soft_slots(self) -> int:
        return self.config.num_virtual_tokens

    def check_template(self, template: Template) -> None:
        if self.spec.kind != "causal_lm":
            return  # a bidirectional encoder reads the whole input wherever the slots are
        before = template.segments[0] if template.soft_markers else []  # pieces before the first {soft}
        if not any(piece.strip() for piece in before):
            raise PromptTuneError(
                f"template {template.text!r}: iapt generates its soft tokens from the text before them, and in a "
                "causal LM that text must come first; put {soft} after the input, e.g. "
                "'Review: {text}{soft} Sentiment:{answer}'"
            )

    def initialize(self, ctx: InitContext) -> None:
        L, D, m = self.spec.num_layers, self.spec.hidden_size, self.config.bottleneck
        numerator, denominator = fit_rational(self.config.activation)
        bias = layer_init_vectors(self.config.init, self.num_soft_slots, self.spec, ctx, self.config.init_text)
        with torch.no_grad():  # drawn on the CPU generator, then copied: the same values on every device
            self.down.copy_(torch.randn(L, D, m, generator=ctx.generator) / math.sqrt(D))  # z ~ unit scale
            self.query.copy_(torch.randn(self.query.shape, generator=ctx.generator))
            self.numerator.copy_(torch.tensor(numerator).expand(L, -1))
            self.denominator.copy_(torch.tensor(denominator).expand(L, -1))
            self.up.zero_()  # no instruction-dependent part yet: the prompt starts at `bias`
            self.bias.copy_(bias)

    def instruction_mask(self, inputs: PromptInputs) -> Tensor:
        """(B, T) bool: the real tokens the generator pools over (in a causal LM, only those before the slots)."""
        mask = (inputs.token_index >= 0) & (inputs.attention_mask > 0)  # (B, T) no pads, no soft slots
        if self.spec.kind == "causal_lm":
            columns = torch.arange(mask.shape[1], device=mask.device)  # (T,)
            mask = mask & (columns[None, :] < inputs.soft_positions[:, :1])  # (B, T)
        return mask

    def generate(self, layer: int, hidden: Tensor, mask: Tensor) -> Tensor:
        """Soft tokens of one layer: hidden (B, T, D) at the layer's input, mask (B, T) -> (B, P, D)."""
        h = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)  # (B, T, D) one scale at every depth
        z = (h @ self.down[layer].to(h.dtype)).masked_fill(~mask[..., None], 0.0)  # (B, T, m)
        scores = torch.einsum("btm,pm->bpt", z, self.query[layer].to(z.dtype)) / math.sqrt(z.shape[-1])  # (B, P, T)
        weights = scores.masked_fill(~mask[:, None, :], float("-inf")).softmax(-1)  # (B, P, T)
        pooled = weights @ z  # (B, P, m)
        act = rational(pooled, self.numerator[layer], self.denominator[layer])  # (B, P, m)
        return act @ self.up[layer].to(act.dtype) + self.bias[layer].to(act.dtype)  # (B, P, D)

    def apply(self, inputs: PromptInputs) -> PromptInputs:
        if inputs.decoding:  # the prompt's keys/values at every layer are already in the decoding cache
            return inputs
        if inputs.past_key_values is not None:
            raise PromptTuneError(
                "iapt reads the hidden states of the text before its slots; a cached prefix hides them"
            )
        mask = self.instruction_mask(inputs)  # (B, T)
        if not bool(mask.any(1).all()):
            raise PromptTuneError(
                "iapt: a row has no text before its soft slots to generate the prompt from (empty input field?)"
            )
        if not self.spec.embeddings_at_layer_width:  # projected embeddings (OPT-350m): layer 0 in the hook
            return inputs.replace(layer_hook=self.layer_hook)
        soft = self.generate(0, inputs.inputs_embeds, mask)  # (B, P, D)
        return inputs.replace(inputs_embeds=write_soft(inputs, soft), layer_hook=self.layer_hook)

    def layer_hook(self, layer: int, hidden: Tensor, inputs: PromptInputs) -> Tensor:
        if layer == 0 and self.spec.embeddings_at_layer_width:  # written into the embeddings by `apply`
            return hidden
        return write_slots(hidden, inputs.soft_positions, self.generate(layer, hidden, self.instruction_mask(inputs)))
