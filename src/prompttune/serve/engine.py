"""The engine: one thread owns the backbone and runs every forward pass, with continuous batching.

Each turn of its loop it admits queued work (after a short wait window when idle, so concurrent requests share a
batch), scores classification rows in one mixed-prompt pass, prefills newly admitted generations in one mixed pass,
and advances every decoding lane by one token. Finished sequences leave their lane at once and queued ones join at
the next turn, so a long generation never holds up a short one. A lane's key/value cache is kept per row and
left-padded, so rows of different lengths (and prompts with key/value prefixes of different lengths) decode together.

The forward passes themselves live in `passes.py`; this module decides what runs when. The HTTP side talks to the
engine through `Job`s: `submit` queues work (429 when the queue is full) and the engine sends events back to the
job's asyncio queue.
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

from ..backbones.base import Backbone
from ..errors import PromptTuneError
from ..types import Row
from .config import ServeConfig
from .decoding import Generation, Lane
from .metrics import Metrics
from .passes import Passes
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
        self.passes = Passes(backbone, metrics)
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
                for stage, items in ((self.passes.classify, scores), (self._prefill, fresh)):
                    if items:
                        self._isolated(stage, items)
                for key, lane in list(self._lanes.items()):
                    try:
                        self.passes.step(lane)
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

    def _prefill(self, seqs: list[Generation]) -> None:
        for prompt, members, state in self.passes.prefill(seqs):  # every pass succeeded: the sequences join a lane
            self._lanes.setdefault(self._lane_key(prompt), Lane()).add(members, *state)

    def _lane_key(self, prompt: LoadedPrompt) -> object:
        """All sequences decode in one lane, or (without mixing) one lane per prompt."""
        return None if self.cfg.mix_prompts else prompt
