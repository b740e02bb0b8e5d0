"""Rows -> padded tensors. Left padding with explicit `position_ids`, so a row's result never depends on its
neighbours (PEFT defect 1); with a cached frozen prefix the prefix is left-padded and the rest right-padded."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..types import Row


@dataclass
class Batch:
    input_ids: Tensor  # (B, T)
    attention_mask: Tensor  # (B, T)
    position_ids: Tensor  # (B, T)
    soft_positions: Tensor  # (B, P)
    token_index: Tensor  # (B, T) -1 on pads and soft slots
    read_positions: Tensor  # (B, K)
    read_mask: Tensor  # (B, K) bool
    targets: Tensor  # (B, K) -100 where nothing is predicted
    example: Tensor  # (B,) example index of each row
    option: Tensor  # (B,) class index a row scores (multi-token verbalizers)
    past: tuple[tuple[Tensor, Tensor], ...] | None = None  # per layer (B, kvh, Lp, hd)
    past_mask: Tensor | None = None  # (B, Lp)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def collate(rows: Sequence[Row], pad_id: int, prefixes: Sequence[Tensor] | None = None) -> Batch:
    """Pad rows into a batch.

    Args:
        rows: rows to batch.
        pad_id: id written into padding (its embedding is masked out everywhere).
        prefixes: per row, the frozen keys/values of `row.ids[:L]` as `(layers, 2, kvh, L, hd)`; the batch then
            holds only `row.ids[L:]`, right-padded after a left-padded past.
    """
    B = len(rows)
    starts = [p.shape[3] for p in prefixes] if prefixes is not None else [0] * B
    lengths = [len(r.ids) - s for r, s in zip(rows, starts, strict=True)]
    T, P = max(lengths), max(len(r.soft) for r in rows)
    K = max(1, max(len(r.read) for r in rows))
    left = prefixes is None
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    token_index = torch.full((B, T), -1, dtype=torch.long)
    soft = torch.zeros(B, P, dtype=torch.long)
    read = torch.zeros(B, K, dtype=torch.long)
    read_mask = torch.zeros(B, K, dtype=torch.bool)
    targets = torch.full((B, K), -100, dtype=torch.long)
    position_ids = torch.zeros(B, T, dtype=torch.long)
    for b, (row, start, n) in enumerate(zip(rows, starts, lengths, strict=True)):
        shift = (T - n if left else 0) - start  # maps an index into row.ids to a column of the batch
        cols = slice(shift + start, shift + start + n)
        ids[b, cols] = torch.tensor(row.ids[start:], dtype=torch.long)
        mask[b, cols] = 1
        position_ids[b, cols] = torch.arange(start, start + n)
        is_soft = torch.zeros(len(row.ids), dtype=torch.bool)
        is_soft[list(row.soft)] = True
        index = torch.cumsum(~is_soft, 0) - 1  # (L,) position among the row's own text tokens
        index[is_soft] = -1
        token_index[b, cols] = index[start:]
        if row.soft:
            soft[b, : len(row.soft)] = torch.tensor(row.soft) + shift
        if row.read:
            read[b, : len(row.read)] = torch.tensor(row.read) + shift
            read_mask[b, : len(row.read)] = True
        if row.targets:
            targets[b, : len(row.targets)] = torch.tensor(row.targets)
    past = past_mask = None
    if prefixes is not None:
        past, past_mask = _stack_prefixes(prefixes)
    return Batch(
        ids,
        mask,
        position_ids,
        soft,
        token_index,
        read,
        read_mask,
        targets,
        torch.tensor([r.example for r in rows]),
        torch.tensor([r.option for r in rows]),
        past,
        past_mask,
    )


def _stack_prefixes(prefixes: Sequence[Tensor]) -> tuple[tuple[tuple[Tensor, Tensor], ...], Tensor]:
    layers, _, kvh, _, hd = prefixes[0].shape
    Lp = max(p.shape[3] for p in prefixes)
    out = prefixes[0].new_zeros(layers, 2, len(prefixes), kvh, Lp, hd)  # (nl, 2, B, kvh, Lp, hd)
    mask = torch.zeros(len(prefixes), Lp, dtype=torch.long)
    for b, p in enumerate(prefixes):
        out[:, :, b, :, Lp - p.shape[3] :] = p
        mask[b, Lp - p.shape[3] :] = 1
    return tuple((out[i, 0], out[i, 1]) for i in range(layers)), mask
