"""The OpenAI-compatible wire format: request validation (every malformed field -> a 4xx `APIError` naming it) and
the error shape `{"error": {"message", "type", "param", "code"}}`.

Unknown fields are ignored, as OpenAI-compatible servers do, so clients that send extra options keep working; an
option that would change the result but is not implemented (echo, suffix, penalties, logit_bias) is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .config import ServeConfig

MAX_STOPS = 4


class APIError(Exception):
    """An error answered as JSON in OpenAI's shape; `status` is the HTTP code."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, expected: str, got: Any) -> APIError:
    shown = repr(got)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return APIError(400, f"'{param}': expected {expected}, got {shown}", param=param, code="invalid_value")


# ---- field readers ----------------------------------------------------------------------------------------------
def _int(body: dict, key: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise bad(key, f"an integer in {lo}..{hi}", value)
    return value


def _float(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(key, f"a number in {lo}..{hi}", value)
    if not lo <= value <= hi:
        raise bad(key, f"a number in {lo}..{hi}", value)
    return float(value)


def _bool(body: dict, key: str, default: bool = False) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(key, "true or false", value)
    return value


def _model(body: dict) -> str:
    value = body.get("model")
    if not isinstance(value, str) or not value:
        raise bad("model", "a model name such as '<backbone>:<prompt>' (see GET /v1/models)", value)
    return value


def _stops(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOPS
        or not all(isinstance(s, str) and 0 < len(s) <= 256 for s in stops)
    ):
        raise bad("stop", f"a non-empty string or a list of at most {MAX_STOPS}", value)
    return stops


def _unsupported(body: dict, keys_and_neutral: dict[str, Any]) -> None:
    for key, neutral in keys_and_neutral.items():
        value = body.get(key)
        if value is not None and value != neutral:
            raise APIError(400, f"'{key}' is not supported by this server", param=key, code="unsupported_parameter")


@dataclass
class Sampling:
    """Decoding options shared by completions and chat."""

    max_tokens: int
    temperature: float
    top_p: float
    n: int
    stop: list[str]
    seed: int | None
    logprobs: int | None  # top-k log-probs per generated token; None: off
    stream: bool
    include_usage: bool


def _sampling(body: dict, cfg: ServeConfig, max_key: str, logprobs: int | None) -> Sampling:
    _unsupported(body, {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}})
    max_tokens = _int(body, max_key, cfg.default_max_tokens, 1, cfg.max_new_tokens)
    n = _int(body, "n", 1, 1, cfg.max_inputs)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("stream_options", "an object", options)
    return Sampling(
        max_tokens=max_tokens,
        temperature=_float(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_float(body, "top_p", 1.0, 1e-6, 1.0),
        n=n,
        stop=_stops(body),
        seed=_int(body, "seed", None, -(2**63), 2**63 - 1),
        logprobs=logprobs,
        stream=_bool(body, "stream"),
        include_usage=bool((options or {}).get("include_usage", False)),
    )


# ---- requests -----------------------------------------------------------------------------------------------------
@dataclass
class CompletionRequest:
    model: str
    prompts: list[str | list[int]]  # text, or token ids (bare backbone only)
    sampling: Sampling


def parse_completion(body: dict, cfg: ServeConfig) -> CompletionRequest:
    model = _model(body)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(_is_ids(p) for p in prompt):
        prompts = [list(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and p and _is_ids(p[0]) for p in prompt):
        if not all(all(_is_ids(t) for t in p) for p in prompt):
            raise bad("prompt", "token ids (non-negative integers)", prompt)
        prompts = [list(p) for p in prompt]
    else:
        raise bad("prompt", "a string, a list of strings, or token ids", prompt)
    if _bool(body, "echo"):
        raise APIError(400, "'echo' is not supported by this server", param="echo", code="unsupported_parameter")
    _unsupported(body, {"suffix": ""})
    logprobs = _int(body, "logprobs", None, 0, cfg.max_logprobs)
    sampling = _sampling(body, cfg, "max_tokens", logprobs)
    best_of = body.get("best_of")
    if best_of is not None and best_of != sampling.n:
        raise APIError(400, "'best_of' other than n is not supported", param="best_of", code="unsupported_parameter")
    if len(prompts) * sampling.n > cfg.max_inputs:
        raise bad("prompt", f"at most {cfg.max_inputs} prompts x n", f"{len(prompts)} x {sampling.n}")
    return CompletionRequest(model, prompts, sampling)


def _is_ids(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass
class ChatRequest:
    model: str
    messages: list[dict[str, str]]
    sampling: Sampling


_ROLES = ("system", "developer", "user", "assistant", "tool")


def parse_chat(body: dict, cfg: ServeConfig) -> ChatRequest:
    model = _model(body)
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw or len(raw) > 1000:
        raise bad("messages", "a non-empty list of {role, content} objects", raw)
    messages = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise bad(f"{where}.role", f"one of {', '.join(_ROLES)}", m.get("role") if isinstance(m, dict) else m)
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text parts are understood
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise bad(f"{where}.content", "a string or a list of text parts", content)
            content = "".join(p["text"] for p in content)
        if content is None and m["role"] == "assistant":
            content = ""
        if not isinstance(content, str):
            raise bad(f"{where}.content", "a string", content)
        messages.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    want = _bool(body, "logprobs")
    top = _int(body, "top_logprobs", None, 0, cfg.max_logprobs)
    if top is not None and not want:
        raise bad("top_logprobs", "to be used with logprobs: true", top)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    sampling = _sampling(body, cfg, key, (top or 0) if want else None)
    return ChatRequest(model, messages, sampling)


@dataclass
class ClassifyRequest:
    model: str
    inputs: list[str | dict[str, str]]
    threshold: float | None


def parse_classify(body: dict, cfg: ServeConfig) -> ClassifyRequest:
    model = _model(body)
    value = body.get("input")
    items = value if isinstance(value, list) else [value]
    if not items or len(items) > cfg.max_inputs:
        raise bad("input", f"1..{cfg.max_inputs} inputs", value)
    for i, item in enumerate(items):
        ok = isinstance(item, str) or (
            isinstance(item, dict) and item and all(isinstance(k, str) and isinstance(v, str) for k, v in item.items())
        )
        if not ok:
            raise bad("input" if len(items) == 1 else f"input[{i}]", "a string or an object of string fields", item)
    threshold = body.get("threshold")
    if threshold is not None:
        threshold = _float(body, "threshold", 0.5, 0.0, 1.0)
    return ClassifyRequest(model, items, threshold)


@dataclass
class LoadRequest:
    path: str
    name: str | None


def parse_load(body: dict) -> LoadRequest:
    path, name = body.get("path"), body.get("name")
    if not isinstance(path, str) or not path or "\0" in path or len(path) > 4096:
        raise bad("path", "an artifact directory inside an allowed prompt directory", path)
    if name is not None and not isinstance(name, str):
        raise bad("name", "a string", name)
    return LoadRequest(path, name)
