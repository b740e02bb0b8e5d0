"""Mixed-prompt batching: rows of different prompts share one forward pass.

Each prompt's method runs its own `apply` on its own rows (the rows are cut out of the batch, the method sees a
normal batch of its rows only), and the results are merged back row by row: per-row soft embeddings for input-level
methods, per-row key/value prefixes for prefix methods (shorter prefixes left-padded and masked through
`past_attention_mask`), the discrete prompt's tokens for text prompts (they are ordinary ids). Left padding with
explicit positions makes a row's result independent of its neighbours (the core's padding guarantee), so a request
gets the same numbers (to float rounding) in a mixed batch as alone.

A method that acts inside the network (its `apply` sets `layer_hook`) cannot share a pass with other prompts: the
hook sees every row. Its rows get a pass of their own. Nothing here looks at method names, only at what `apply`
returned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import PromptTuneError
from ..types import PromptInputs


@dataclass
class Group:
    """Rows of one prompt within a batch."""

    method: torch.nn.Module
    rows: Tensor  # (n,) long: indices into the batch
    soft_width: int  # soft slots per row (the template's count for this method)
    key: object = None  # who these rows belong to (the caller's prompt object)


@dataclass
class Pass:
    """One backbone call: the applied, merged inputs of one or more groups."""

    inputs: PromptInputs  # (b, T, D) ...
    groups: list[tuple[Group, Tensor]]  # each group with the positions (n,) of its rows (in `rows` order) in the pass
    hooked: bool  # the pass carries a method's layer hook (one group only)


def take(inputs: PromptInputs, rows: Tensor, soft_width: int) -> PromptInputs:
    """The sub-batch of `rows` (a normal left-padded batch, as if they had been collated alone but wider)."""

    def sel(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.index_select(0, rows)

    past = inputs.past_key_values
    if past is not None:
        past = tuple((k.index_select(0, rows), v.index_select(0, rows)) for k, v in past)
    return PromptInputs(
        inputs_embeds=sel(inputs.inputs_embeds),
        attention_mask=sel(inputs.attention_mask),
        position_ids=sel(inputs.position_ids),
        soft_positions=sel(inputs.soft_positions)[:, :soft_width],
        token_index=sel(inputs.token_index),
        read_positions=sel(inputs.read_positions),
        past_key_values=past,
        past_attention_mask=sel(inputs.past_attention_mask),
        condition=inputs.condition,
        decoding=inputs.decoding,
    )


def plan(inputs: PromptInputs, groups: Sequence[Group]) -> list[Pass]:
    """Apply every group's method to its rows; merge the groups that can share a pass.

    Returns:
        passes: one merged pass for all groups without a layer hook (its rows in batch order), plus one pass per
        hooked group (its rows in the group's order).
    """
    B = inputs.inputs_embeds.shape[0]
    if len(groups) == 1 and groups[0].rows.numel() == B:  # one prompt: no cutting or merging at all
        g = groups[0]
        out = g.method.apply(inputs.replace(soft_positions=inputs.soft_positions[:, : g.soft_width]))
        return [Pass(out, [(g, g.rows)], out.layer_hook is not None)]
    plain: list[tuple[Group, PromptInputs]] = []
    passes: list[Pass] = []
    dev = inputs.inputs_embeds.device
    for g in groups:
        out = g.method.apply(take(inputs, g.rows.to(dev), g.soft_width))
        if out.layer_hook is not None:
            passes.append(Pass(out, [(g, torch.arange(len(g.rows)))], True))
        else:
            plain.append((g, out))
    if plain:
        rows = torch.cat([g.rows for g, _ in plain])
        local = torch.full((B,), -1, dtype=torch.long)
        local[rows.sort().values] = torch.arange(len(rows))  # batch order among the plain rows
        passes.insert(0, merge([(g, out, local[g.rows]) for g, out in plain], len(rows)))
    return passes


def merge(parts: Sequence[tuple[Group, PromptInputs, Tensor]], B: int) -> Pass:
    """Place applied sub-batches at their positions (n,) in one batch of B rows, left-padding anything that differs
    in length: the text (a method may add columns) and the key/value prefix."""
    T = max(p.inputs_embeds.shape[1] for _, p, _ in parts)
    first = parts[0][1]
    D, dev = first.inputs_embeds.shape[-1], first.inputs_embeds.device
    embeds = first.inputs_embeds.new_zeros(B, T, D)  # (B, T, D)
    mask = torch.zeros(B, T, dtype=first.attention_mask.dtype, device=dev)  # (B, T)
    position = torch.zeros(B, T, dtype=torch.long, device=dev)  # (B, T)
    token_index = torch.full((B, T), -1, dtype=torch.long, device=dev)  # (B, T)
    K = max(p.read_positions.shape[1] for _, p, _ in parts)
    read = torch.zeros(B, K, dtype=torch.long, device=dev)  # (B, K)
    lengths = [0 if p.past_key_values is None else p.past_key_values[0][0].shape[2] for _, p, _ in parts]
    Lp = max(lengths)
    past_k: list[Tensor] = []
    past_v: list[Tensor] = []
    past_mask = torch.zeros(B, Lp, dtype=torch.long, device=dev) if Lp else None  # (B, Lp)
    if Lp:
        ref = next(p.past_key_values for _, p, _ in parts if p.past_key_values is not None)
        for k, v in ref:
            past_k.append(k.new_zeros(B, k.shape[1], Lp, k.shape[3]))  # (B, kvh, Lp, hd)
            past_v.append(v.new_zeros(B, v.shape[1], Lp, v.shape[3]))
    groups: list[tuple[Group, Tensor]] = []
    for (g, p, pos), lp in zip(parts, lengths, strict=True):
        if p.decoding and p.past_key_values is not None:
            raise PromptTuneError(f"{type(g.method).__name__}.apply returned a key/value prefix while decoding")
        if p.condition is not None:
            raise PromptTuneError(f"{type(g.method).__name__} sets `condition`, which cannot be merged across prompts")
        at = pos.to(dev)
        s = T - p.inputs_embeds.shape[1]  # extra left padding of this part
        embeds[at, s:] = p.inputs_embeds
        mask[at, s:] = p.attention_mask
        position[at, s:] = p.position_ids
        token_index[at, s:] = p.token_index
        read[at, : p.read_positions.shape[1]] = p.read_positions + s
        if lp:
            for layer, (k, v) in enumerate(p.past_key_values):
                past_k[layer][at, :, Lp - lp :] = k
                past_v[layer][at, :, Lp - lp :] = v
            past_mask[at, Lp - lp :] = p.past_attention_mask.to(past_mask)
        groups.append((g, pos))
    merged = PromptInputs(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=position,
        soft_positions=torch.zeros(B, 0, dtype=torch.long, device=dev),  # already written
        token_index=token_index,
        read_positions=read,
        past_key_values=tuple(zip(past_k, past_v, strict=True)) if Lp else None,
        past_attention_mask=past_mask,
        decoding=first.decoding,
    )
    return Pass(merged, groups, False)


def full_mask(inputs: PromptInputs) -> Tensor:
    """The attention mask over past and current columns (B, Lp + T), as the backbone builds it."""
    if inputs.past_key_values is None:
        return inputs.attention_mask
    return torch.cat([inputs.past_attention_mask.to(inputs.attention_mask), inputs.attention_mask], 1)
