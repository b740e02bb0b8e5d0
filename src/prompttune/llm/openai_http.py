"""An OpenAI-compatible HTTP endpoint as a backend (vLLM, llama.cpp's server, Ollama, `prompttune serve`, hosted
APIs). Standard library only.

Scoring label words, two ways (`BackendConfig.scoring`):

- `logprobs`: POST /completions with `max_tokens: 1, logprobs: k` and read the top-k next-token log-probs. A label
  word is scored token by token: its first piece is the longest returned token that begins it, each next piece the
  longest token returned after the prompt plus the pieces so far (one more request per distinct context, so words
  sharing a beginning share it), and the word's log-prob is the sum. A piece not among the top k adds
  `floor_logprob`. The pieces are the server's own tokens but chosen longest-first, which is the server tokenizer's
  segmentation for most words (the OpenAI API has no call that scores a given continuation exactly; local backends
  score the tokenizer's segmentation exactly). Only the first request counts as an LLM call — a call is one prompt
  scored, as on the local backends; every request's tokens count.
- `text`: POST /chat/completions and map the answer text back to a label word (first word of the answer, then any
  label word it contains); the chosen word gets log-prob 0, the others `floor_logprob`. For chat-only APIs.

Every request has a timeout; timeouts, connection errors and HTTP 429/5xx are retried with exponential backoff;
at most `concurrency` requests are in flight. Failures raise `BackendError` naming the URL and, for malformed
answers, the missing field.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import PromptTuneError
from .base import BackendConfig, BackendError, Budget, LLMBackend

_ANSWER_TOKENS = 8  # text scoring: a label answer is a word or two
_MAX_WORD_PIECES = 16  # logprobs scoring: a label word longer than this many tokens gets the floor for the rest


class _Retry(Exception):
    """A failure worth retrying (timeout, connection reset, HTTP 429/5xx)."""


class OpenAIBackend(LLMBackend):
    kind = "openai"

    def __init__(self, config: BackendConfig, budget: Budget | None = None):
        super().__init__(config, budget)
        if not config.base_url:
            raise PromptTuneError("backend openai: no endpoint; pass --base-url, e.g. http://127.0.0.1:8000/v1")
        if not re.match(r"^https?://", config.base_url):
            raise PromptTuneError(f"backend openai: base_url {config.base_url!r} must start with http:// or https://")
        self.base_url = config.base_url.rstrip("/")
        self.api_key = _read_key(config.api_key_file)

    # ---- protocol ---------------------------------------------------------------------------------------------------
    def _label_logprobs(self, prompts: list[str], words: list[str], prefixes: list[str]) -> Tensor:
        score = self._score_text if self.config.scoring == "text" else self._score_logprobs
        rows = self._parallel(lambda p: score(p, words), prompts)
        return torch.tensor(rows, dtype=torch.float32)  # (N, W)

    def _generate(
        self, prompts: list[str], max_new_tokens: int, temperature: float, seed: int, chat: bool
    ) -> list[str]:
        def one(item: tuple[int, str]) -> str:
            i, prompt = item
            body = {"model": self.config.model, "max_tokens": max_new_tokens, "temperature": temperature}
            body["seed"] = seed * 1_000_003 + i
            if chat:
                body["messages"] = [{"role": "user", "content": prompt}]
                answer = self._post("/chat/completions", body, "generate")
                return _field(answer, "choices", 0, "message", "content", where=self.base_url) or ""
            answer = self._post("/completions", {**body, "prompt": prompt}, "generate")
            return _field(answer, "choices", 0, "text", where=self.base_url)

        return self._parallel(one, list(enumerate(prompts)))

    # ---- scoring ----------------------------------------------------------------------------------------------------
    def _score_logprobs(self, prompt: str, words: list[str]) -> list[float]:
        tops: dict[str, dict[str, float]] = {}  # context -> its top-k next tokens, shared by this prompt's words

        def top(context: str) -> dict[str, float]:
            if context not in tops:
                tops[context] = self._top_logprobs(context, calls=1 if context == prompt else 0)
            return tops[context]

        return [_word_logprob(prompt, word, top, self.config.floor_logprob) for word in words]

    def _top_logprobs(self, context: str, calls: int) -> dict[str, float]:
        body = {
            "model": self.config.model,
            "prompt": context,
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": self.config.top_logprobs,
        }
        answer = self._post("/completions", body, calls=calls)
        top = _field(answer, "choices", 0, "logprobs", "top_logprobs", 0, where=self.base_url)
        if not isinstance(top, dict) or not all(isinstance(v, (int, float)) for v in top.values()):
            raise BackendError(
                f"{self.base_url}/completions: malformed response: field 'choices[0].logprobs.top_logprobs[0]' "
                f"should map tokens to log-probs, got {str(top)[:200]}"
            )
        return top

    def _score_text(self, prompt: str, words: list[str]) -> list[float]:
        body = {
            "model": self.config.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": _ANSWER_TOKENS,
            "temperature": 0.0,
        }
        answer = self._post("/chat/completions", body)
        text = _field(answer, "choices", 0, "message", "content", where=self.base_url) or ""
        chosen = _answer_word(text, words)
        return [0.0 if i == chosen else self.config.floor_logprob for i in range(len(words))]

    # ---- transport --------------------------------------------------------------------------------------------------
    def _post(self, path: str, body: dict[str, Any], kind: str = "score", calls: int = 1) -> dict[str, Any]:
        """POST JSON, retrying what is worth retrying; charges the budget `calls` calls and the tokens on success."""
        url = self.base_url + path
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"

        def attempt() -> dict[str, Any]:
            request = urllib.request.Request(url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.config.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as err:
                detail = _error_detail(err)
                if err.code == 429 or err.code >= 500:
                    raise _Retry(f"HTTP {err.code}: {detail}") from None
                raise BackendError(f"{url}: HTTP {err.code}: {detail}") from None
            except TimeoutError as err:
                raise _Retry(f"no answer within {self.config.timeout:g} s") from err
            except urllib.error.URLError as err:
                reason = err.reason
                if isinstance(reason, TimeoutError):
                    raise _Retry(f"no answer within {self.config.timeout:g} s") from None
                if isinstance(reason, ConnectionRefusedError):
                    raise BackendError(
                        f"{url}: connection refused; is the server running and is --base-url right?"
                    ) from None
                raise _Retry(f"cannot reach the endpoint ({reason})") from None
            except (ConnectionError, OSError) as err:
                raise _Retry(f"connection failed ({err})") from None
            try:
                return json.loads(raw)
            except json.JSONDecodeError:
                raise BackendError(f"{url}: malformed response: not JSON ({raw[:120]!r})") from None

        try:
            answer = self._retrying(path, attempt, lambda err: isinstance(err, _Retry))
        except _Retry as err:
            raise BackendError(f"{url}: {err} (after {self.config.retries + 1} attempts)") from None
        if not isinstance(answer, dict):
            raise BackendError(f"{url}: malformed response: expected a JSON object, got {type(answer).__name__}")
        usage = answer.get("usage") or {}
        tokens = int(usage.get("total_tokens") or 0) or (len(data) // 4)  # no usage: ~4 characters per token
        self._charged(calls, tokens, kind)
        return answer


def _field(obj: Any, *path: Any, where: str) -> Any:
    """obj[path[0]][path[1]]...; a missing step raises BackendError naming the field as `a[0].b`."""
    name = ""
    for step in path:
        name += f"[{step}]" if isinstance(step, int) else (f".{step}" if name else step)
        try:
            obj = obj[step]
        except (KeyError, IndexError, TypeError):
            raise BackendError(f"{where}: malformed response: field {name!r} missing") from None
    return obj


def _piece(rest: str, top: dict[str, float]) -> str | None:
    """The longest non-empty returned token that begins `rest`."""
    return max((t for t in top if t and rest.startswith(t)), key=len, default=None)


def _word_logprob(prompt: str, word: str, top: Callable[[str], dict[str, float]], floor: float) -> float:
    """log P(word | prompt) summed over pieces: each the longest top-k token that begins what is left of the word."""
    total, context, rest = 0.0, prompt, word
    for _ in range(_MAX_WORD_PIECES):
        entries = top(context)
        piece = _piece(rest, entries)
        if piece is None:
            return total + floor
        total += float(entries[piece])
        context, rest = context + piece, rest[len(piece) :]
        if not rest:
            return total
    return total + floor


def _answer_word(text: str, words: list[str]) -> int | None:
    """Which label word a free-text answer names: its first word, else the only label word it contains."""
    norm = [w.strip().lower() for w in words]
    tokens = re.findall(r"[\w'-]+", text.lower())
    if tokens and tokens[0] in norm:
        return norm.index(tokens[0])
    found = {i for i, w in enumerate(norm) if w in tokens}
    return found.pop() if len(found) == 1 else None


def _error_detail(err: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(err.read() or b"{}")
        message = body.get("error", {}).get("message") if isinstance(body.get("error"), dict) else body.get("error")
        return str(message or body)[:300]
    except (ValueError, AttributeError):
        return err.reason or "error"


def _read_key(path: str | None) -> str | None:
    if not path:
        return None
    p = Path(path).expanduser()
    if not p.is_file():
        raise PromptTuneError(f"{p}: API key file not found (--api-key-file)")
    key = p.read_text().strip()
    if not key:
        raise PromptTuneError(f"{p}: API key file is empty")
    return key
