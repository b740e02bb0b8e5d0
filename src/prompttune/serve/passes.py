"""The engine's forward passes: a mixed-prompt classification pass, a mixed prefill of new generations, and one
decoding step of a lane.

`plan` splits a batch into passes (rows of prompts that can share one forward pass); each pass runs once and each
prompt's head or lane reads its own rows back. The engine (`engine.py`) decides what runs when; this module only
computes, and changes nothing it was given until every pass of a stage has succeeded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..backbones.base import Backbone
from ..data.collate import Batch, collate
from ..types import PromptInputs, Row
from .batching import Group, Pass, full_mask, plan
from .decoding import Generation, Lane, choose, push
from .metrics import Metrics
from .prompts import LoadedPrompt

if TYPE_CHECKING:
    from .engine import ScoreItem


class Passes:
    """Forward passes over one backbone, counted in `metrics`."""

    def __init__(self, backbone: Backbone, metrics: Metrics):
        self.backbone, self.metrics = backbone, metrics
        self.tokenizer = backbone.tokenizer
        self._pieces: dict[int, str] = {}

    def groups(self, prompts: list[LoadedPrompt], widths: list[int]) -> list[Group]:
        """Rows of each prompt (by identity), in order of first appearance."""
        index: dict[int, list[int]] = {}
        owner: dict[int, LoadedPrompt] = {}
        for row, prompt in enumerate(prompts):
            index.setdefault(id(prompt), []).append(row)
            owner[id(prompt)] = prompt
        return [Group(owner[k].method, torch.tensor(rows), widths[rows[0]], owner[k]) for k, rows in index.items()]

    def record(self, kind: str, passes: list[Pass]) -> None:
        for p in passes:
            self.metrics.inc("prompttune_forward_passes_total", kind=kind)
            self.metrics.observe("prompttune_batch_size", p.inputs.inputs_embeds.shape[0], kind=kind)
            self.metrics.observe("prompttune_batch_prompts", len(p.groups), kind=kind)

    def classify(self, items: list[ScoreItem]) -> None:
        """Score every item's rows in mixed-prompt passes and send each item its scores."""
        rows: list[Row] = []
        prompts: list[LoadedPrompt] = []
        owner: list[ScoreItem] = []
        examples: dict[int, int] = {}  # per prompt: examples numbered so far (the head groups rows by example)
        for item in items:
            number = examples.get(id(item.prompt), 0)
            examples[id(item.prompt)] = number + 1
            for r in item.rows:
                rows.append(Row(r.ids, r.soft, r.read, r.targets, number, r.option))
                prompts.append(item.prompt)
                owner.append(item)
        batch = collate(rows, self.backbone.pad_id)
        groups = self.groups(prompts, [len(r.soft) for r in rows])
        passes = plan(self.backbone.inputs(batch), groups)
        results: dict[int, tuple[ScoreItem, Tensor]] = {}
        for p in passes:
            hidden = self.backbone(p.inputs)  # (b, T, D)
            for g, pos in p.groups:
                prompt: LoadedPrompt = g.key  # type: ignore[assignment]
                sub = _sub_batch(batch, g.rows, p.inputs, pos, hidden.device)
                scores = prompt.head(hidden[pos.to(hidden.device)], sub, self.backbone, examples[id(prompt)])
                scores = scores.float().cpu()  # (n, C)
                for r in g.rows.tolist():
                    results[id(owner[r])] = (owner[r], scores[rows[r].example])
        self.record("classify", passes)
        self.metrics.inc("prompttune_prompt_tokens_total", sum(len(r.ids) for r in rows))
        for item, scores in results.values():
            item.job.emit("scores", item.slot, scores)

    def prefill(self, seqs: list[Generation]) -> list[tuple[LoadedPrompt, list[Generation], tuple]]:
        """Prefill new sequences in mixed passes: per prompt, its sequences and their lane state (cache, mask,
        next-token logits, positions); nothing is changed, so a failed pass loses nothing."""
        rows = [s.row for s in seqs]
        batch = collate(rows, self.backbone.pad_id)
        inputs = self.backbone.inputs(batch)
        last_index = inputs.token_index.max(dim=1, keepdim=True).values  # (B, 1) text tokens so far, per row
        passes = plan(inputs, self.groups([s.prompt for s in seqs], [len(r.soft) for r in rows]))
        joining = []
        for p in passes:
            out = self.backbone._body(p.inputs, use_cache=True)
            kv = _cache_tensors(out)  # per layer (b, kvh, L, hd)
            mask = full_mask(p.inputs)  # (b, L)
            logits = self.backbone.lm_logits(out.last_hidden_state[:, -1]).float()  # (b, V)
            position = p.inputs.position_ids[:, -1:]  # (b, 1)
            for g, pos in p.groups:
                at = pos.to(mask.device)
                rows_kv = [(k[at], v[at]) for k, v in kv]
                state = (rows_kv, mask[at], logits[at], position[at], last_index[g.rows.to(mask.device)])
                joining.append((g.key, [seqs[r] for r in g.rows.tolist()], state))
        self.record("prefill", passes)
        self.metrics.inc("prompttune_prompt_tokens_total", sum(len(r.ids) for r in rows))
        return joining

    def step(self, lane: Lane) -> None:
        """Emit each row's next token; drop finished rows; run one decoding step for the rest."""
        tokens = choose(lane)
        alive, before = [], sum(len(seq.ids) for seq in lane.seqs)
        for b, (seq, choice) in enumerate(zip(lane.seqs, tokens, strict=True)):
            if not push(seq, choice, self.tokenizer, self.piece):
                alive.append(b)
        self.metrics.inc("prompttune_generated_tokens_total", sum(len(seq.ids) for seq in lane.seqs) - before)
        lane.keep(alive)
        if not lane.seqs:
            return
        B = len(lane.seqs)
        dev = lane.mask.device
        token = torch.tensor([tokens[b][0] for b in alive], device=dev)  # (B,)
        lane.position, lane.index = lane.position + 1, lane.index + 1
        step = PromptInputs(
            inputs_embeds=self.backbone.embed(token[:, None]),  # (B, 1, D)
            attention_mask=lane.mask.new_ones(B, 1),
            position_ids=lane.position,
            soft_positions=token.new_zeros(B, 0),
            token_index=lane.index,
            read_positions=token.new_zeros(B, 1),
            decoding=True,
        )
        prompts = [s.prompt for s in lane.seqs]
        passes = plan(step, self.groups(prompts, [0] * B))
        self.record("decode", passes)
        if len(passes) == 1:  # the usual case: every row in one pass, in lane order
            lane.kv, lane.logits = self.decode_pass(passes[0], lane.kv, lane.mask)
        else:  # a method hooks its decoding steps: its rows run apart, with their rows of the cache
            kv: list[list[Tensor]] | None = None
            logits = lane.logits.new_empty(B, lane.logits.shape[1])
            for p in passes:
                rows = _pass_rows(p).to(dev)
                got, logits[rows] = self.decode_pass(p, tuple((k[rows], v[rows]) for k, v in lane.kv), lane.mask[rows])
                if kv is None:
                    kv = [[k.new_empty(B, *k.shape[1:]), v.new_empty(B, *v.shape[1:])] for k, v in got]
                for layer, (k, v) in enumerate(got):
                    kv[layer][0][rows], kv[layer][1][rows] = k, v
            lane.kv, lane.logits = tuple((k, v) for k, v in kv), logits
        lane.mask = torch.cat([lane.mask, lane.mask.new_ones(B, 1)], 1)

    def piece(self, token: int) -> str:
        """A token's own text (cached: top-k log-probs decode many tokens per step)."""
        text = self._pieces.get(token)
        if text is None:
            text = self._pieces[token] = self.tokenizer.decode([token])
        return text

    def decode_pass(self, p: Pass, kv: tuple, mask: Tensor) -> tuple[tuple[tuple[Tensor, Tensor], ...], Tensor]:
        """One decoding step of one pass over its rows of the cache: (new cache, next-token logits (b, V))."""
        if p.inputs.past_key_values is not None:
            raise RuntimeError("a decoding step must not add a key/value prefix")
        out = self.backbone._body(p.inputs.replace(past_key_values=kv, past_attention_mask=mask), use_cache=True)
        return _cache_tensors(out), self.backbone.lm_logits(out.last_hidden_state[:, -1]).float()


def _cache_tensors(output: Any) -> tuple[tuple[Tensor, Tensor], ...]:
    cache = getattr(output, "cache", None)
    cache = cache if cache is not None else output.past_key_values
    return tuple((layer.keys, layer.values) for layer in cache.layers)


def _pass_rows(p: Pass) -> Tensor:
    """The batch row of each row of a pass, in pass order."""
    rows = torch.empty(sum(len(g.rows) for g, _ in p.groups), dtype=torch.long)
    for g, pos in p.groups:
        rows[pos] = g.rows
    return rows


def _sub_batch(batch: Batch, rows: Tensor, inputs: PromptInputs, pos: Tensor, device: torch.device) -> Batch:
    """The batch fields of one prompt's rows, with the read positions and mask of the pass they ran in."""
    fields = {}
    for name, value in batch.__dict__.items():
        fields[name] = value.index_select(0, rows).to(device) if isinstance(value, Tensor) else value
    at = pos.to(inputs.read_positions.device)
    fields["read_positions"] = inputs.read_positions.index_select(0, at)
    fields["attention_mask"] = inputs.attention_mask.index_select(0, at)
    fields["past"] = fields["past_mask"] = None
    return Batch(**fields)
