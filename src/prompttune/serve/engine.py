"""The engine: one thread owns the backbone and runs every forward pass, with continuous batching.

Each turn of its loop it admits queued work (after a short wait window when idle, so concurrent requests share a
batch), scores classification rows in one mixed-prompt pass, prefills newly admitted generations in one mixed pass,
and advances every decoding lane by one token. Finished sequences leave their lane at once and queued ones join at
the next turn, so a long generation never holds up a short one. A lane's key/value cache is kept per row and
left-padded, so rows of different lengths (and prompts with key/value prefixes of different lengths) decode together.

The HTTP side talks to the engine through `Job`s: `submit` queues work (429 when the queue is full) and the engine
sends events back to the job's asyncio queue.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..backbones.base import Backbone
from ..data.collate import Batch, collate
from ..errors import PromptTuneError
from ..types import PromptInputs, Row
from .batching import Group, Pass, full_mask, plan
from .config import ServeConfig
from .decoding import Generation, Lane, choose, push
from .metrics import Metrics
from .prompts import LoadedPrompt
from .protocol import APIError

log = logging.getLogger("prompttune.serve")


class Job:
    """One request as the engine sees it: a destination for events, living on the request's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, parts: int):
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.parts = parts  # items (examples or choices) still queued
        self.cancelled = False
        self.started = time.perf_counter()

    def emit(self, *event: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the request's loop is gone (server stopping): nobody is waiting
            self.cancelled = True


@dataclass(eq=False)
class ScoreItem:
    """One example of a classify request: its rows (several for multi-token label words)."""

    prompt: LoadedPrompt
    rows: list[Row]
    job: Job
    slot: int
    arrived: float = 0.0


class Engine:
    """Owns the backbone; see the module docstring. Thread-safe `submit`, `close`."""

    def __init__(self, backbone: Backbone, cfg: ServeConfig, metrics: Metrics):
        self.backbone, self.cfg, self.metrics = backbone, cfg, metrics
        self.tokenizer = backbone.tokenizer
        self._cond = threading.Condition()
        self._queue: deque[ScoreItem | Generation] = deque()
        self._waiting_jobs = 0
        self._lanes: dict[object, Lane] = {}
        self._stopping = False
        self._paused = False
        self._pieces: dict[int, str] = {}
        self._thread = threading.Thread(target=self._run, name="prompttune-engine", daemon=True)
        self._thread.start()

    # ---- the HTTP side ----------------------------------------------------------------------------------------
    def submit(self, job: Job, items: Iterable[ScoreItem | Generation]) -> None:
        """Queue a request's items.

        Raises:
            APIError: 429 when `max_queue` requests are already waiting, 503 while shutting down.
        """
        with self._cond:
            if self._stopping:
                raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
            if self._waiting_jobs >= self.cfg.max_queue:
                raise APIError(
                    429,
                    f"the queue is full ({self.cfg.max_queue} requests waiting); retry later",
                    type="rate_limit_error",
                    code="queue_full",
                )
            self._waiting_jobs += 1
            arrived = time.perf_counter()
            for item in items:
                item.arrived = arrived
                self._queue.append(item)
            self._cond.notify()

    @property
    def queue_depth(self) -> int:
        return self._waiting_jobs

    @property
    def active_sequences(self) -> int:
        return sum(len(lane.seqs) for lane in tuple(self._lanes.values()))  # read from other threads too

    def pause(self, paused: bool) -> None:
        """Hold admissions (tests use it to queue requests that must share one batch)."""
        with self._cond:
            self._paused = paused
            self._cond.notify()

    def close(self, timeout: float | None = None) -> None:
        """Finish everything queued and running, then stop the thread."""
        with self._cond:
            self._stopping = True
            self._paused = False
            self._cond.notify()
        self._thread.join(timeout)

    # ---- the loop -----------------------------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    if not self._wait():
                        return
                    scores, fresh = self._admit()
                for stage, items in ((self._classify, scores), (self._prefill, fresh)):
                    if items:
                        self._isolated(stage, items)
                for key, lane in list(self._lanes.items()):
                    try:
                        self._step(lane)
                    except Exception as err:  # noqa: BLE001
                        self._fail(lane.seqs, err)
                        lane.seqs = []
                    if not lane.seqs:
                        del self._lanes[key]

    def _wait(self) -> bool:
        """Block (holding the condition) until there is work; returns False when stopped and drained."""
        while True:
            busy = self.active_sequences > 0
            if self._queue and not self._paused:
                break
            if busy:
                return True
            if self._stopping and not self._queue:
                return False
            self._cond.wait(0.5)
        if not busy and not self._stopping:  # idle: give concurrent requests a moment to share the batch
            deadline = self._queue[0].arrived + self.cfg.batch_wait_ms / 1000
            while self._queued_rows() < self.cfg.max_batch_size and (left := deadline - time.perf_counter()) > 0:
                self._cond.wait(left)
        return True

    def _queued_rows(self) -> int:
        return sum(len(item.rows) for item in self._queue)

    def _admit(self) -> tuple[list[ScoreItem], list[Generation]]:
        """Take queued work that fits: classification rows up to the batch size, sequences up to the free slots."""
        if self._paused:
            return [], []
        scores: list[ScoreItem] = []
        fresh: list[Generation] = []
        score_rows, free = 0, self.cfg.max_batch_size - self.active_sequences
        only_prompt: dict[str, Any] = {}  # without mixing: the one prompt of this turn's classification pass
        keep: deque[ScoreItem | Generation] = deque()
        while self._queue:
            item = self._queue.popleft()
            if item.job.cancelled:
                self._release(item)
                continue
            if isinstance(item, ScoreItem):
                fits = not scores or score_rows + len(item.rows) <= self.cfg.max_batch_size
                if fits and not self.cfg.mix_prompts:
                    fits = only_prompt.setdefault("score", item.prompt) is item.prompt
                if fits:
                    scores.append(item)
                    score_rows += len(item.rows)
                    self._release(item)
                    continue
            elif free > 0:
                fresh.append(item)
                free -= 1
                self._release(item)
                continue
            keep.append(item)
        self._queue = keep
        return scores, fresh

    def _release(self, item: ScoreItem | Generation) -> None:
        item.job.parts -= 1
        if item.job.parts == 0:
            self._waiting_jobs -= 1

    def _isolated(self, stage: Any, items: list) -> None:
        """Run a stage on a batch; if it fails, run each item alone, so one bad request fails only itself.

        Stages change nothing (no event sent, no lane touched) until their computation has succeeded.
        """
        try:
            stage(items)
        except Exception as err:  # noqa: BLE001 - reported to its requests; the engine goes on
            if len(items) == 1:
                self._fail(items, err)
                return
            for item in items:
                try:
                    stage([item])
                except Exception as alone:  # noqa: BLE001
                    self._fail([item], alone)

    def _fail(self, items: list[ScoreItem] | list[Generation], err: Exception) -> None:
        if isinstance(err, PromptTuneError):  # the request's own input (e.g. a method that needs text it lacks)
            error = APIError(400, str(err))
        else:
            log.error("engine stage failed", exc_info=err)
            error = APIError(
                500, f"internal error while serving the request: {type(err).__name__}: {err}", type="server_error"
            )
        for item in items:
            item.job.cancelled = True  # its other parts stop too
            item.job.emit("error", item.slot, error)

    # ---- batches ------------------------------------------------------------------------------------------------
    def _groups(self, prompts: list[LoadedPrompt], widths: list[int]) -> list[Group]:
        """Rows of each prompt (by identity), in order of first appearance."""
        index: dict[int, list[int]] = {}
        owner: dict[int, LoadedPrompt] = {}
        for row, prompt in enumerate(prompts):
            index.setdefault(id(prompt), []).append(row)
            owner[id(prompt)] = prompt
        return [Group(owner[k].method, torch.tensor(rows), widths[rows[0]], owner[k]) for k, rows in index.items()]

    def _record(self, kind: str, passes: list[Pass]) -> None:
        for p in passes:
            self.metrics.inc("prompttune_forward_passes_total", kind=kind)
            self.metrics.observe("prompttune_batch_size", p.inputs.inputs_embeds.shape[0], kind=kind)
            self.metrics.observe("prompttune_batch_prompts", len(p.groups), kind=kind)

    def _classify(self, items: list[ScoreItem]) -> None:
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
        groups = self._groups(prompts, [len(r.soft) for r in rows])
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
        self._record("classify", passes)
        self.metrics.inc("prompttune_prompt_tokens_total", sum(len(r.ids) for r in rows))
        for item, scores in results.values():
            item.job.emit("scores", item.slot, scores)

    def _lane_key(self, prompt: LoadedPrompt) -> object:
        """All sequences decode in one lane, or (without mixing) one lane per prompt."""
        return None if self.cfg.mix_prompts else prompt

    def _prefill(self, seqs: list[Generation]) -> None:
        rows = [s.row for s in seqs]
        batch = collate(rows, self.backbone.pad_id)
        inputs = self.backbone.inputs(batch)
        last_index = inputs.token_index.max(dim=1, keepdim=True).values  # (B, 1) text tokens so far, per row
        passes = plan(inputs, self._groups([s.prompt for s in seqs], [len(r.soft) for r in rows]))
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
        self._record("prefill", passes)
        self.metrics.inc("prompttune_prompt_tokens_total", sum(len(r.ids) for r in rows))
        for prompt, members, state in joining:  # every pass succeeded: the sequences join their lane
            self._lanes.setdefault(self._lane_key(prompt), Lane()).add(members, *state)

    def _step(self, lane: Lane) -> None:
        """Emit each row's next token; drop finished rows; run one decoding step for the rest."""
        tokens = choose(lane)
        alive, before = [], sum(len(seq.ids) for seq in lane.seqs)
        for b, (seq, choice) in enumerate(zip(lane.seqs, tokens, strict=True)):
            if not push(seq, choice, self.tokenizer, self._piece):
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
        passes = plan(step, self._groups(prompts, [0] * B))
        self._record("decode", passes)
        if len(passes) == 1:  # the usual case: every row in one pass, in lane order
            lane.kv, lane.logits = self._decode_pass(passes[0], lane.kv, lane.mask)
        else:  # a method hooks its decoding steps: its rows run apart, with their rows of the cache
            kv: list[list[Tensor]] | None = None
            logits = lane.logits.new_empty(B, lane.logits.shape[1])
            for p in passes:
                rows = _pass_rows(p).to(dev)
                got, logits[rows] = self._decode_pass(p, tuple((k[rows], v[rows]) for k, v in lane.kv), lane.mask[rows])
                if kv is None:
                    kv = [[k.new_empty(B, *k.shape[1:]), v.new_empty(B, *v.shape[1:])] for k, v in got]
                for layer, (k, v) in enumerate(got):
                    kv[layer][0][rows], kv[layer][1][rows] = k, v
            lane.kv, lane.logits = tuple((k, v) for k, v in kv), logits
        lane.mask = torch.cat([lane.mask, lane.mask.new_ones(B, 1)], 1)

    def _piece(self, token: int) -> str:
        """A token's own text (cached: top-k log-probs decode many tokens per step)."""
        text = self._pieces.get(token)
        if text is None:
            text = self._pieces[token] = self.tokenizer.decode([token])
        return text

    def _decode_pass(self, p: Pass, kv: tuple, mask: Tensor) -> tuple[tuple[tuple[Tensor, Tensor], ...], Tensor]:
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
