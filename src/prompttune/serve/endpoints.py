"""The OpenAI-compatible endpoints (completions, chat, with server-sent events) and classification.

A mixin of `PromptServer`: it turns validated requests into engine work (`ScoreItem`s, `Generation`s), waits for
the engine's events and shapes the answers. Everything it raises is an `APIError` the server's gate answers.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import torch
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..types import Row
from . import responses as R
from .decoding import Generation
from .engine import Job, ScoreItem
from .prompts import LoadedPrompt
from .protocol import APIError, Sampling, parse_chat, parse_classify, parse_completion

if TYPE_CHECKING:
    from ..backbones.base import Backbone
    from .config import ServeConfig
    from .engine import Engine
    from .metrics import Metrics
    from .prompts import PromptRegistry


class Endpoints:
    """The request handlers; `PromptServer` provides the attributes declared here."""

    cfg: ServeConfig
    backbone: Backbone
    registry: PromptRegistry
    engine: Engine
    metrics: Metrics
    stopping: bool
    stop_ids: frozenset[int]
    chat_stop_ids: frozenset[int]

    # ---- classification -----------------------------------------------------------------------------------------
    async def classify(self, request: Request) -> Response:
        req = parse_classify(await self._json(request), self.cfg)
        prompt = self.registry.get(req.model)
        if not prompt.classifies:
            raise APIError(400, f"model {req.model!r} has no classification head; use /v1/completions", param="model")
        job = Job(asyncio.get_running_loop(), len(req.inputs))
        items, tokens = [], 0
        for i, value in enumerate(req.inputs):
            encoded = prompt.encode(value, self.cfg.max_input_tokens, f"input[{i}]" if len(req.inputs) > 1 else "input")
            rows = prompt.head.rows(encoded, 0)
            self._check_context(max(len(r.ids) for r in rows), 0)
            tokens += len(encoded.ids)
            items.append(ScoreItem(prompt, rows, job, i))
        self._submit(job, items)
        scores: list[torch.Tensor | None] = [None] * len(items)
        await self._gather(job, len(items), lambda slot, value: scores.__setitem__(slot, value))
        head = prompt.head
        data = []
        for i, s in enumerate(scores):
            labels = head.labels
            entry: dict[str, Any] = {
                "index": i,
                "label": labels[int(s.argmax())],
                "scores": {label: float(v) for label, v in zip(labels, s.tolist(), strict=True)},
            }
            if head.multi_label:
                probs = torch.sigmoid(s)
                threshold = req.threshold if req.threshold is not None else float(getattr(head, "threshold", 0.5))
                entry["labels"] = [label for label, p in zip(labels, probs.tolist(), strict=True) if p >= threshold]
                entry["threshold"] = threshold
            else:
                probs = torch.softmax(s, -1)
            entry["probabilities"] = {label: float(p) for label, p in zip(labels, probs.tolist(), strict=True)}
            data.append(entry)
        body = {
            "id": R.new_id("clf"),
            "object": "classification",
            "created": R.now(),
            "model": req.model,
            "data": data,
            "usage": R.usage(tokens, 0),
        }
        return JSONResponse(body)

    # ---- generation ---------------------------------------------------------------------------------------------
    def _check_context(self, prompt_tokens: int, new_tokens: int) -> None:
        limit = self.backbone.spec.max_positions
        if prompt_tokens + new_tokens > limit:
            raise APIError(
                400,
                f"the prompt ({prompt_tokens} tokens) plus max_tokens ({new_tokens}) exceed the model's "
                f"{limit}-token context",
                param="max_tokens",
                code="context_length_exceeded",
            )

    def _gen_row(self, prompt: LoadedPrompt, value: str | list[int], max_tokens: int, where: str) -> Row:
        if self.backbone.kind != "causal_lm":
            raise APIError(400, f"backbone {self.registry.backbone_name!r} is an encoder: it cannot generate")
        if isinstance(value, list):
            if prompt.name:
                raise APIError(400, "token-id prompts are accepted for the bare backbone only", param="prompt")
            if max(value) >= self.backbone.spec.vocab_size:
                raise APIError(400, f"token id {max(value)} is outside the vocabulary", param="prompt")
            if len(value) > self.cfg.max_input_tokens:
                raise APIError(
                    400,
                    f"{where}: prompt is {len(value)} tokens, longer than the limit of {self.cfg.max_input_tokens}",
                    param="prompt",
                    code="context_length_exceeded",
                )
            ids, soft = tuple(value), ()
        else:
            encoded = prompt.encode(value, self.cfg.max_input_tokens, where)
            ids, soft = encoded.ids, encoded.soft
        if not ids:
            raise APIError(400, f"{where}: the prompt is empty", param="prompt")
        self._check_context(len(ids), max_tokens)
        return Row(ids, soft, (len(ids) - 1,))

    def _sequences(
        self, prompt: LoadedPrompt, rows: list[Row], sampling: Sampling, job: Job, stop_ids: frozenset[int]
    ) -> list[Generation]:
        head_stops = frozenset(getattr(prompt.head, "stop_ids", None) or ())
        seqs = []
        for i, row in enumerate(rows):
            for j in range(sampling.n):
                slot = i * sampling.n + j
                gen = None
                if sampling.temperature > 0 and sampling.seed is not None:
                    gen = torch.Generator().manual_seed((sampling.seed + slot) % (1 << 63))
                seqs.append(Generation(prompt, row, job, slot, sampling, stop_ids | head_stops, gen))
        return seqs

    def _submit(self, job: Job, items: list) -> None:
        if self.stopping:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        self.engine.submit(job, items)

    async def _gather(self, job: Job, parts: int, on_scores: Callable | None = None) -> list[dict[str, Any]]:
        """Wait for every part of a job; per choice: text, finish reason, tokens, log-prob entries."""
        out = [{"text": "", "finish": None, "tokens": 0, "entries": []} for _ in range(parts)]
        left = parts
        try:
            while left:
                event = await job.events.get()
                kind, slot = event[0], event[1]
                if kind == "error":
                    raise event[2]
                if kind == "scores":
                    on_scores(slot, event[2])
                    left -= 1
                elif kind == "delta":
                    out[slot]["text"] += event[2]
                    out[slot]["entries"] += event[3]
                elif kind == "done":
                    out[slot]["finish"], out[slot]["tokens"] = event[2], event[3]
                    left -= 1
        except BaseException:
            job.cancelled = True  # the client went away, or the request failed: stop its other parts
            raise
        return out

    async def completions(self, request: Request) -> Response:
        req = parse_completion(await self._json(request), self.cfg)
        prompt = self.registry.get(req.model)
        many = len(req.prompts) > 1
        rows = [
            self._gen_row(prompt, p, req.sampling.max_tokens, f"prompt[{i}]" if many else "prompt")
            for i, p in enumerate(req.prompts)
        ]
        return await self._respond(prompt, req.model, rows, req.sampling, self.stop_ids, chat=False)

    async def chat(self, request: Request) -> Response:
        req = parse_chat(await self._json(request), self.cfg)
        prompt = self.registry.get(req.model)
        text = R.render_chat(self.backbone.tokenizer, req.messages)
        row = self._gen_row(prompt, text, req.sampling.max_tokens, "messages")
        return await self._respond(prompt, req.model, [row], req.sampling, self.chat_stop_ids, chat=True)

    async def _respond(
        self, prompt: LoadedPrompt, model: str, rows: list[Row], sp: Sampling, stops: frozenset[int], chat: bool
    ) -> Response:
        """Queue `sp.n` generations per row; stream them as events or answer with one JSON body."""
        job = Job(asyncio.get_running_loop(), len(rows) * sp.n)
        seqs = self._sequences(prompt, rows, sp, job, stops)
        self._submit(job, seqs)
        prompt_tokens = sum(len(r.ids) for r in rows)
        rid, created = R.new_id("chatcmpl" if chat else "cmpl"), R.now()
        if sp.stream:
            return _sse(self._stream(job, len(seqs), rid, created, model, sp, prompt_tokens, chat=chat))
        results = await self._gather(job, len(seqs))
        logprobs = R.chat_logprobs if chat else R.completion_logprobs
        choices = []
        for i, r in enumerate(results):
            content = {"message": {"role": "assistant", "content": r["text"]}} if chat else {"text": r["text"]}
            lp = logprobs(r["entries"]) if sp.logprobs is not None else None
            choices.append({**content, "index": i, "logprobs": lp, "finish_reason": r["finish"]})
        body = {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": R.usage(prompt_tokens, sum(r["tokens"] for r in results)),
        }
        return JSONResponse(body)

    async def _stream(
        self, job: Job, parts: int, rid: str, created: int, model: str, sp: Sampling, prompt_tokens: int, chat: bool
    ) -> AsyncIterator[str]:
        """Server-sent events: one chunk per piece of text that is final, then the finish reason, then [DONE]."""
        make = R.chat_chunk if chat else R.completion_chunk
        start, first, left, generated = time.perf_counter(), True, parts, 0
        try:
            if chat:
                yield _event(
                    make(
                        rid,
                        created,
                        model,
                        [
                            {
                                "index": i,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                            for i in range(parts)
                        ],
                    )
                )
            while left:
                event = await job.events.get()
                kind, slot = event[0], event[1]
                if kind == "error":
                    yield _event(event[2].body())
                    return
                if kind == "delta":
                    text, entries = event[2], event[3]
                    if not text and not entries:
                        continue
                    if first:
                        first = False
                        ttft = time.perf_counter() - start
                        self.metrics.observe("prompttune_time_to_first_token_seconds", ttft)
                    lp = None
                    if sp.logprobs is not None:
                        lp = R.chat_logprobs(entries) if chat else R.completion_logprobs(entries)
                    choice = {"index": slot, "delta": {"content": text}} if chat else {"index": slot, "text": text}
                    yield _event(make(rid, created, model, [{**choice, "logprobs": lp, "finish_reason": None}]))
                elif kind == "done":
                    left -= 1
                    generated += event[3]
                    choice = {"index": slot, "delta": {}} if chat else {"index": slot, "text": ""}
                    yield _event(make(rid, created, model, [{**choice, "logprobs": None, "finish_reason": event[2]}]))
            if sp.include_usage:
                yield _event({**make(rid, created, model, []), "usage": R.usage(prompt_tokens, generated)})
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled = left > 0  # the client disconnected mid-stream: free the batch slots


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _sse(body: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
