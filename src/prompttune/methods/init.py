"""Initialisation of soft-prompt vectors (Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt
Tuning", arXiv 2104.08691, compare random, sampled-vocabulary and class-label initialisation).

Random vectors drawn with N(0, 1) land far off the embedding manifold (PEFT #2816); we match the per-dimension
scale of the real vocabulary instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import PromptTuneError
from ..types import BackboneSpec
from .base import InitContext

STRATEGIES = ("random", "sample_vocab", "text")
_STAT_SAMPLE = 4096


def vocab_ids(spec: BackboneSpec, ctx: InitContext, n: int) -> Tensor:
    """`n` ids sampled from the ordinary (non-special) part of the vocabulary."""
    special = set(getattr(ctx.tokenizer, "all_special_ids", []) or [])
    high = min(spec.vocab_size, len(ctx.tokenizer))
    ids = torch.randint(0, high, (n * 2 + len(special),), generator=ctx.generator)
    ids = ids[~torch.isin(ids, torch.tensor(sorted(special), dtype=torch.long))] if special else ids
    return ids[:n]


def init_ids(strategy: str, n: int, spec: BackboneSpec, ctx: InitContext, text: str | None) -> Tensor:
    """The n token ids (n,) a `sample_vocab` or `text` initialisation starts from.

    Raises:
        PromptTuneError: unknown strategy (or `random`, which has no ids), or `text` tokenises to nothing.
    """
    if strategy == "sample_vocab":
        return vocab_ids(spec, ctx, n)
    if strategy != "text":
        raise PromptTuneError(f"init: expected one of {STRATEGIES[1:]} here, got {strategy!r}")
    # The default hint is blank space; tokenizers that drop whitespace (WordPiece) get a neutral "." instead.
    candidates = [text] if text else [ctx.hint_text, "."]
    for text in candidates:
        ids = torch.tensor(ctx.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        if ids.numel():
            break
    else:
        raise PromptTuneError(f"init_text {text!r} tokenises to nothing")
    return ids.repeat((n + ids.numel() - 1) // ids.numel())[:n]  # cycle the text to fill n slots


def init_vectors(strategy: str, n: int, spec: BackboneSpec, ctx: InitContext, text: str | None) -> Tensor:
    """Return (n, D) starting vectors.

    Raises:
        PromptTuneError: unknown strategy, or `text` tokenises to nothing.
    """
    if strategy == "random":
        with torch.no_grad():
            sample = spec.embed_tokens(vocab_ids(spec, ctx, _STAT_SAMPLE)).cpu()  # (S, D)
        mean, std = sample.mean(0), sample.std(0)  # (D,), (D,)
        return mean + std * torch.randn(n, spec.input_size, generator=ctx.generator)
    if strategy not in STRATEGIES:
        raise PromptTuneError(f"init: expected one of {STRATEGIES}, got {strategy!r}")
    ids = init_ids(strategy, n, spec, ctx, text)
    with torch.no_grad():
        return spec.embed_tokens(ids).detach().cpu().clone()  # (n, D)


def layer_init_vectors(strategy: str, n: int, spec: BackboneSpec, ctx: InitContext, text: str | None) -> Tensor:
    """Return (layers, n, D) starting vectors for prompts written at the input of every layer (deep prompts, IAPT).

    Layer 0 gets `init_vectors` (input embeddings). Deeper layers get the frozen model's own hidden states of the same
    tokens at that layer's input (`spec.layer_inputs`, one short forward pass), so each layer's prompt starts at the
    scale and on the manifold of that layer: in pre-norm models the residual stream grows with depth, and vectors of
    embedding scale would be out of place there. The tokens are run after one copy of themselves and the second copy
    is kept, because the first positions of a causal LM gather outsized "attention sink" activations at deeper layers
    that would turn a soft slot into a second sink. `random` draws every layer like layer 0; a backbone without
    `layer_inputs` repeats the layer-0 vectors.
    """
    if strategy == "random":
        return torch.stack([init_vectors(strategy, n, spec, ctx, text) for _ in range(spec.num_layers)])
    ids = init_ids(strategy, n, spec, ctx, text)  # (n,)
    with torch.no_grad():
        first = spec.embed_tokens(ids).detach().cpu()  # (n, D)
        if spec.layer_inputs is None:
            return first.expand(spec.num_layers, n, spec.hidden_size).clone()
        states = spec.layer_inputs(torch.cat([ids, ids])).detach().cpu()  # (layers, 2n, D)
    if not spec.embeddings_at_layer_width:  # the model projects its embeddings: layer 0 reads the projected ones
        return states[:, n:].clone()  # (layers, n, D)
    return torch.cat([first[None], states[1:, n:]]).clone()  # (layers, n, D)
