"""Decoder-only language models (Llama, GPT-2, Gemma, Qwen, ... anything `AutoModelForCausalLM` loads)."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from torch import Tensor
from transformers import DynamicCache

from ..registry import register_backbone
from ..types import PromptInputs
from .base import Backbone

PastKV = tuple[tuple[Tensor, Tensor], ...]


@register_backbone("causal_lm")
class CausalLM(Backbone):
    kind = "causal_lm"
    supports_prefix_cache = True  # causal attention: a prefix's keys/values never depend on what follows
    _cache_kwarg: str | None = None  # name of the model's cache argument, looked up once

    def __init__(self, model, tokenizer, name: str):
        super().__init__(model, tokenizer, name)
        kv_heads, head_dim, width = self._measure()
        self.spec = dataclasses.replace(self.spec, num_kv_heads=kv_heads, head_dim=head_dim, output_size=width)

    @torch.no_grad()
    def _measure(self) -> tuple[int, int, int]:
        """(key/value heads, head size, width of the final hidden states) as the model's own forward produces them.
        Config fields cannot be trusted for this: the names differ (`num_key_value_heads`, Falcon's `num_kv_heads`
        and `multi_query`), a config may carry a field its model ignores (a GPT-NeoX or OPT config given
        `num_key_value_heads`), and OPT-350m projects its output down to `word_embed_proj_dim`."""
        ids = torch.full((1, 1), self.pad_id, dtype=torch.long, device=self.device)
        pos = torch.zeros_like(ids)
        out = self._call(self.embed(ids), torch.ones_like(ids), pos, DynamicCache(), use_cache=True)
        keys = _returned_cache(out).layers[0].keys  # (1, kv_heads, 1, head_dim)
        return int(keys.shape[1]), int(keys.shape[-1]), int(out.last_hidden_state.shape[-1])

    def _body(self, inputs: PromptInputs, use_cache: bool = False):
        mask = inputs.attention_mask  # (B, T)
        # A cache without the model's config keeps every key: a sliding-window layer's own cache would drop the
        # oldest ones, and a cached prefix longer than the window would lose keys (the masks still apply the window).
        cache = DynamicCache() if use_cache else None
        if inputs.past_key_values is not None:
            cache = DynamicCache(ddp_cache_data=inputs.past_key_values)  # a fresh cache per call: never stale
            mask = torch.cat([inputs.past_attention_mask.to(mask), mask], dim=1)  # (B, Lp + T)
        return self._call(inputs.inputs_embeds, mask, inputs.position_ids, cache, use_cache, inputs)

    def _call(
        self,
        embeds: Tensor,
        mask: Tensor,
        position_ids: Tensor,
        cache: DynamicCache | None,
        use_cache: bool,
        inputs: PromptInputs | None = None,
    ):
        """Run the base model; `inputs` (when given) supplies the method's per-layer hook for this call."""
        # transformers >= 5.2x renamed `past_key_values` to `cache`; accept both spellings.
        key = self._cache_kwarg
        if key is None:
            params = inspect.signature(self.model.base_model.forward).parameters
            key = self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        with self.hooked(inputs) if inputs is not None else nullcontext():
            return self.model.base_model(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=use_cache,
                **{key: cache},
            )

    def forward(self, inputs: PromptInputs) -> Tensor:
        return self._body(inputs).last_hidden_state  # (B, T, D), final norm applied

    def lm_logits(self, hidden: Tensor) -> Tensor:
        return self.model.get_output_embeddings()(hidden)  # (..., V)

    @torch.no_grad()
    def encode_prefixes(self, prefixes: Sequence[Sequence[int]], batch_size: int = 32) -> list[Tensor]:
        """Frozen keys/values of token prefixes, one `(layers, 2, kvh, L, hd)` tensor each (left-padded batches).

        Positions are 0..L-1, so a continuation at positions L.. reproduces the uncached run.
        """
        out: list[Tensor] = []
        for i in range(0, len(prefixes), batch_size):
            chunk = prefixes[i : i + batch_size]
            T = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), T), self.pad_id, dtype=torch.long)
            mask = torch.zeros(len(chunk), T, dtype=torch.long)
            for b, p in enumerate(chunk):
                ids[b, T - len(p) :] = torch.tensor(p)
                mask[b, T - len(p) :] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            inputs = PromptInputs(self.embed(ids), mask, pos, ids.new_zeros(len(chunk), 0), pos, pos[:, -1:])
            cache = _returned_cache(self._body(inputs, use_cache=True))
            kv = torch.stack([torch.stack([layer.keys, layer.values]) for layer in cache.layers])
            # kv: (layers, 2, B, kvh, T, hd)
            out.extend(kv[:, :, b, :, T - len(p) :].clone() for b, p in enumerate(chunk))
        return out

    @torch.no_grad()
    def generate(
        self,
        inputs: PromptInputs,
        prepare: Callable[[PromptInputs], PromptInputs],
        max_new_tokens: int,
        stop_ids: Sequence[int],
        constrain: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> list[list[int]]:
        """Greedy decoding of a left-padded batch with a KV cache.

        Args:
            inputs: the prompts (before `prepare`), left-padded so every prompt ends at column T-1.
            prepare: the method's `apply`; called on the prompt and on each decoding step (`decoding=True`).
            max_new_tokens: most tokens generated per row.
            stop_ids: ids that end a row (EOS).
            constrain: optional `(generated (B, t), logits (B, V)) -> logits (B, V)` applied before each argmax, e.g.
                to allow only the tokens a grammar permits; it must treat each row on its own (batch invariance).
        Returns:
            generated ids per row, without the stop token.
        """
        ready = prepare(inputs)
        out = self._body(ready, use_cache=True)
        cache, B = _returned_cache(out), inputs.inputs_embeds.shape[0]
        mask = ready.attention_mask
        if ready.past_attention_mask is not None:
            mask = torch.cat([ready.past_attention_mask.to(mask), mask], 1)
        position = ready.position_ids[:, -1:]  # (B, 1)
        index = inputs.token_index.max(dim=1, keepdim=True).values  # (B, 1)
        hidden = out.last_hidden_state[:, -1:]  # (B, 1, D)
        done = torch.zeros(B, dtype=torch.bool, device=mask.device)
        generated: list[list[int]] = [[] for _ in range(B)]
        stops = torch.tensor(list(stop_ids), device=mask.device)
        history = torch.zeros(B, 0, dtype=torch.long, device=mask.device)  # (B, t) every row's tokens so far
        for _ in range(max_new_tokens):
            logits = self.lm_logits(hidden[:, -1])  # (B, V)
            if constrain is not None:
                logits = constrain(history, logits)  # (B, V) forbidden tokens at -inf
            token = logits.argmax(-1)  # (B,)
            history = torch.cat([history, token[:, None]], 1)
            done |= torch.isin(token, stops)
            for b in range(B):
                if not done[b]:
                    generated[b].append(int(token[b]))
            if bool(done.all()):
                break
            position, index = position + 1, index + 1
            mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
            step = PromptInputs(
                self.embed(token[:, None]),
                mask.new_ones(B, 1),
                position,
                token.new_zeros(B, 0),
                index,
                position.new_zeros(B, 1),
                decoding=True,
            )
            step = prepare(step)
            hidden = self._call(step.inputs_embeds, mask, step.position_ids, cache, True, step).last_hidden_state
        return generated


def _returned_cache(output) -> DynamicCache:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
