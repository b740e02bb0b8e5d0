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


def init_vectors(strategy: str, n: int, spec: BackboneSpec, ctx: InitContext, text: str | None) -> Tensor:
    """Return (n, D) starting vectors.

    Raises:
        PromptTuneError: unknown strategy, or `text` tokenises to nothing.
    """
    if strategy == "random":
        with torch.no_grad():
            sample = spec.embed_tokens(vocab_ids(spec, ctx, _STAT_SAMPLE)).cpu()  # (S, D)
        mean, std = sample.mean(0), sample.std(0)  # (D,), (D,)
        return mean + std * torch.randn(n, spec.hidden_size, generator=ctx.generator)
    if strategy == "sample_vocab":
        ids = vocab_ids(spec, ctx, n)
    elif strategy == "text":
        # The default hint is blank space; tokenizers that drop whitespace (WordPiece) get a neutral "." instead.
        candidates = [text] if text else [ctx.hint_text, "."]
        for text in candidates:
            ids = torch.tensor(ctx.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
            if ids.numel():
                break
        else:
            raise PromptTuneError(f"init_text {text!r} tokenises to nothing")
        ids = ids.repeat((n + ids.numel() - 1) // ids.numel())[:n]  # cycle the text to fill n slots
    else:
        raise PromptTuneError(f"init: expected one of {STRATEGIES}, got {strategy!r}")
    with torch.no_grad():
        return spec.embed_tokens(ids).detach().cpu().clone()  # (n, D)
