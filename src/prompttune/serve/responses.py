"""OpenAI-shaped response bodies and stream chunks, and the chat prompt rendering."""

from __future__ import annotations

import time
import uuid
from typing import Any

from ..data.templates import special_affixes
from .protocol import APIError

Entry = tuple[str, float, list[tuple[str, float]], int]  # token text, log-prob, top-k, offset in the text


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def completion_logprobs(entries: list[Entry]) -> dict[str, Any]:
    """The legacy completions `logprobs` object (top-k as {token text: log-prob})."""
    tops = []
    for _, _, top, _ in entries:
        table: dict[str, float] = {}
        for text, value in top:  # two ids may decode to one text: keep the likelier
            table.setdefault(text, value)
        tops.append(table)
    return {
        "tokens": [e[0] for e in entries],
        "token_logprobs": [e[1] for e in entries],
        "top_logprobs": tops,
        "text_offset": [e[3] for e in entries],
    }


def chat_logprobs(entries: list[Entry]) -> dict[str, Any]:
    """The chat `logprobs` object: one entry per token with its top alternatives."""

    def one(text: str, value: float) -> dict[str, Any]:
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**one(t, v), "top_logprobs": [one(a, b) for a, b in top]} for t, v, top, _ in entries]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_chunk(rid: str, created: int, model: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}


def chat_chunk(rid: str, created: int, model: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """Messages -> prompt text: the tokenizer's chat template when it has one, else `role: content` lines.

    Raises:
        APIError: 400 when the chat template rejects the conversation (e.g. roles out of order).
    """
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # noqa: BLE001 - jinja raises its own error types for user-side problems
            raise APIError(400, f"the model's chat template rejected the messages: {err}", param="messages") from None
        bos = getattr(tokenizer, "bos_token", None)
        if bos and special_affixes(tokenizer)[0] and text.startswith(bos):
            text = text[len(bos) :]  # the tokenizer adds its BOS itself
        return text
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nassistant:"


def turn_end_ids(tokenizer: Any) -> set[int]:
    """The special token a chat template puts after an assistant turn (e.g. `<|im_end|>`): chat stops there."""
    if not getattr(tokenizer, "chat_template", None):
        return set()
    marker = "XQZ7"
    try:
        convo = [{"role": "user", "content": "a"}, {"role": "assistant", "content": marker}]
        text = tokenizer.apply_chat_template(convo, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render this simply gives no extra stop token
        return set()
    tail = text.split(marker, 1)[-1]
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return {ids[0]} if ids and ids[0] in special else set()
