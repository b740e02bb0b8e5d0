"""Decoding state for continuous batching: a `Lane` of sequences sharing a left-padded key/value cache, the choice
of each row's next token (greedy, or sampled with its own seeded generator; top-k log-probs), and the text each
sequence sends (stop strings, held-back text that may still become one, unfinished multi-byte characters)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..types import Row
from .protocol import Sampling

if TYPE_CHECKING:
    from .prompts import LoadedPrompt

Choice = tuple[int, float | None, list[tuple[int, float]]]  # token, its log-prob, top-k (token, log-prob)


@dataclass(eq=False)
class Generation:
    """One generated choice: its prompt row, decoding options and the text produced so far."""

    prompt: LoadedPrompt
    row: Row
    job: Any  # engine.Job
    slot: int
    sampling: Sampling
    stop_ids: frozenset[int]
    generator: torch.Generator | None = None
    ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters already sent
    entries: list[tuple[str, float, list[tuple[str, float]], int]] = field(default_factory=list)
    sent_entries: int = 0
    finish: str | None = None
    arrived: float = 0.0

    @property
    def rows(self) -> list[Row]:
        return [self.row]


class Lane:
    """Sequences decoding together: a left-padded key/value cache per row, their next-token logits, positions."""

    def __init__(self) -> None:
        self.seqs: list[Generation] = []
        self.kv: tuple[tuple[Tensor, Tensor], ...] = ()  # per layer (B, kvh, L, hd)
        self.mask = torch.zeros(0, 0, dtype=torch.long)  # (B, L)
        self.logits = torch.zeros(0, 0)  # (B, V)
        self.position = torch.zeros(0, 1, dtype=torch.long)  # (B, 1) position of the last token in the cache
        self.index = torch.zeros(0, 1, dtype=torch.long)  # (B, 1) its index among the row's text tokens

    def add(self, seqs, kv, mask, logits, position, index) -> None:
        """Rows join: both caches are left-padded to the longer one (padding is masked)."""
        if not self.seqs:
            self.seqs, self.kv, self.mask = list(seqs), tuple(kv), mask
            self.logits, self.position, self.index = logits, position, index
            return
        L = max(self.mask.shape[1], mask.shape[1])
        self.kv = tuple(
            (torch.cat([_left_pad(k0, L), _left_pad(k1, L)]), torch.cat([_left_pad(v0, L), _left_pad(v1, L)]))
            for (k0, v0), (k1, v1) in zip(self.kv, kv, strict=True)
        )
        self.mask = torch.cat([_left_pad(self.mask, L), _left_pad(mask, L)])
        self.logits = torch.cat([self.logits, logits])
        self.position = torch.cat([self.position, position])
        self.index = torch.cat([self.index, index])
        self.seqs += list(seqs)

    def keep(self, rows: list[int]) -> None:
        """Only these rows stay; columns that are padding for every remaining row are dropped."""
        if len(rows) == len(self.seqs):
            return
        self.seqs = [self.seqs[b] for b in rows]
        if not rows:
            self.kv, self.mask = (), self.mask[:0]
            return
        at = torch.tensor(rows, device=self.mask.device)
        mask = self.mask.index_select(0, at)
        start = int(mask.any(0).long().argmax())
        self.mask = mask[:, start:]
        self.kv = tuple((k.index_select(0, at)[:, :, start:], v.index_select(0, at)[:, :, start:]) for k, v in self.kv)
        self.logits = self.logits.index_select(0, at)
        self.position = self.position.index_select(0, at)
        self.index = self.index.index_select(0, at)


def _left_pad(t: Tensor, L: int) -> Tensor:
    """Pad the sequence dimension (dim -2 of keys/values (B, kvh, L, hd), dim -1 of masks (B, L)) on the left."""
    dim = -1 if t.dim() == 2 else -2
    missing = L - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim)


def choose(lane: Lane) -> list[Choice]:
    """Each row's next token from the lane's logits; log-probs only for rows that asked for them.

    A head's decoding constraint (e.g. a label trie) is applied row by row, as the core's `generate` applies it.
    Log-probs are those of the model's distribution at that step (before temperature).
    """
    logits = lane.logits  # (B, V)
    constrained = [b for b, s in enumerate(lane.seqs) if getattr(s.prompt.head, "constrain", None) is not None]
    if constrained:
        logits = logits.clone()
        for b in constrained:
            seq = lane.seqs[b]
            history = torch.tensor([seq.ids], dtype=torch.long, device=logits.device)  # (1, t)
            logits[b] = seq.prompt.head.constrain(history, logits[b : b + 1])[0]
    chosen = logits.argmax(-1).tolist()
    for b, seq in enumerate(lane.seqs):
        sp = seq.sampling
        if sp.temperature > 0:
            chosen[b] = _sample(logits[b], sp.temperature, sp.top_p, seq.generator)
    out: list[Choice] = [(t, None, []) for t in chosen]
    wanted = [b for b, s in enumerate(lane.seqs) if s.sampling.logprobs is not None]
    if wanted:
        rows = torch.tensor(wanted, device=logits.device)
        logp = F.log_softmax(logits.index_select(0, rows), -1)  # (W, V)
        k = max(lane.seqs[b].sampling.logprobs for b in wanted)
        top_v, top_i = logp.topk(k, -1)  # (W, k)
        picked = logp.gather(1, torch.tensor([chosen[b] for b in wanted], device=logits.device)[:, None])  # (W, 1)
        for j, b in enumerate(wanted):
            n = lane.seqs[b].sampling.logprobs
            top = list(zip(top_i[j, :n].tolist(), top_v[j, :n].tolist(), strict=True))
            out[b] = (chosen[b], float(picked[j, 0]), top)
    return out


def push(seq: Generation, choice: Choice, tokenizer: Any, piece: Callable[[int], str]) -> bool:
    """Add one token to a sequence and send the text that is final; returns True when the sequence has ended.

    Args:
        seq: the sequence (its job receives "delta" and "done" events).
        choice: from `choose`.
        tokenizer: decodes the sequence's ids (through its head's `decode`).
        piece: a token's own text (for log-prob entries).
    """
    if seq.job.cancelled:
        return True
    token, logprob, top = choice
    if token in seq.stop_ids:
        seq.finish = "stop"
    else:
        before = len(seq.text)
        seq.ids.append(token)
        seq.text = seq.prompt.head.decode(seq.ids, tokenizer)
        if logprob is not None:
            seq.entries.append((piece(token), logprob, [(piece(t), v) for t, v in top], before))
        cut = _find_stop(seq.text, seq.sampling.stop, before)
        if cut is not None:
            seq.text, seq.finish = seq.text[:cut], "stop"
        elif len(seq.ids) >= seq.sampling.max_tokens:
            seq.finish = "length"
    safe = len(seq.text)
    if seq.finish is None:
        if seq.sampling.stop:  # hold back what may be the start of a stop string
            safe -= max(len(s) for s in seq.sampling.stop) - 1
        if seq.text.endswith("\ufffd"):  # an unfinished multi-byte character
            safe = min(safe, len(seq.text) - 1)
    safe = max(safe, seq.sent)
    if safe > seq.sent or seq.finish is not None:
        entries = [e for e in seq.entries[seq.sent_entries :] if e[3] < safe]
        seq.sent_entries += len(entries)
        seq.job.emit("delta", seq.slot, seq.text[seq.sent : safe], entries)
        seq.sent = safe
    if seq.finish is not None:
        seq.job.emit("done", seq.slot, seq.finish, len(seq.ids))
        return True
    return False


def _sample(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    probs = torch.softmax(logits.float().cpu() / temperature, -1)  # (V,)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # the smallest set whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def _find_stop(text: str, stops: list[str], since: int) -> int | None:
    """Index of the earliest stop string that ends after `since` (the text before it was already checked)."""
    found = [i for s in stops if (i := text.find(s, max(0, since - len(s) + 1))) >= 0]
    return min(found) if found else None
