"""The text-in/text-out backend protocol every discrete optimiser talks to, and the budget they all share.

A backend answers two questions about a language model it may not own the weights of:

- `label_logprobs(prompts, words)`: log P(word | prompt) for each prompt and each label word (the verbalizer), as
  exact as the backend allows (local models: every token of a multi-token word; HTTP APIs: the word's pieces read
  token by token from top-k lists, or a text answer mapped back to a word);
- `generate(prompts)`: text continuations (proposal prompts for OPRO-style optimisers, hints, chat answers).

Every call goes through one `Budget`: LLM calls and tokens are counted where they happen (in the backend), and a
call that would exceed the limit raises `BudgetExhausted` before any request is made, so a search stops cleanly
and keeps what it has scored.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from torch import Tensor

from ..errors import PromptTuneError

T = TypeVar("T")


class BudgetExhausted(PromptTuneError):
    """The call/token budget is spent. `partial` holds whatever the interrupted operation completed."""

    def __init__(self, message: str, partial: list[Any] | None = None):
        super().__init__(message)
        self.partial = partial or []


class BackendError(PromptTuneError):
    """A backend could not answer: bad endpoint, timeout after retries, HTTP error, malformed response."""


@dataclass
class Budget:
    """Counts LLM calls (one prompt scored or one text generated = one call) and tokens (prompt + generated).

    `max_calls`/`max_tokens` of 0 mean unlimited. `held_back` calls are kept out of reach of the search itself (the
    loop reserves them for selecting the best candidate on dev).
    """

    max_calls: int = 0
    max_tokens: int = 0
    calls: int = 0
    tokens: int = 0
    held_back: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def remaining_calls(self) -> int | None:
        """Calls still allowed (None = unlimited)."""
        if not self.max_calls:
            return None
        return max(0, self.max_calls - self.held_back - self.calls)

    def reserve(self, calls: int) -> None:
        """Raise `BudgetExhausted` if `calls` more calls would exceed the call or token limit."""
        left = self.remaining_calls()
        if left is not None and calls > left:
            raise BudgetExhausted(
                f"budget exhausted: {self.calls} of {self.max_calls} LLM calls used"
                + (f" ({self.held_back} held back for dev selection)" if self.held_back else "")
                + f", {calls} more requested"
            )
        if self.max_tokens and self.tokens >= self.max_tokens:
            raise BudgetExhausted(f"token budget exhausted: {self.tokens} of {self.max_tokens} tokens used")

    def add(self, calls: int, tokens: int, kind: str) -> None:
        with self._lock:
            self.calls += calls
            self.tokens += tokens
            self.by_kind[kind] = self.by_kind.get(kind, 0) + calls

    def reset(self) -> None:
        """Zero the counters (a new search on a backend that has served before)."""
        self.calls, self.tokens, self.by_kind = 0, 0, {}

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "tokens": self.tokens, "by_kind": dict(self.by_kind)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls, self.tokens, self.by_kind = state["calls"], state["tokens"], dict(state["by_kind"])


@dataclass
class BackendConfig:
    """Which LLM answers the prompts, and how it is called."""

    backend: str = "hf"
    """`hf` (local transformers model), `llama_cpp` (a GGUF through llama-cpp-python) or `openai` (an
    OpenAI-compatible HTTP endpoint: vLLM, llama.cpp's server, Ollama, `prompttune serve`, hosted APIs)."""
    model: str = "smollm2-135m"
    """Model: an embedded name or path (hf; llama_cpp: a .gguf file or embedded name), or the endpoint's model id."""
    base_url: str | None = None
    """openai: the endpoint, e.g. `http://127.0.0.1:8000/v1`."""
    api_key_file: str | None = None
    """openai: a file holding the API key (keys are never passed on the command line)."""
    scoring: str = "logprobs"
    """openai: `logprobs` (/v1/completions with top-k next-token log-probs) or `text` (/v1/chat/completions; the
    answer text is mapped back to a label word)."""
    top_logprobs: int = 20
    """openai: how many next-token log-probs to request; a label-word piece outside them adds `floor_logprob`."""
    floor_logprob: float = -30.0
    """Log-prob given to a label word the endpoint did not return (not in its top-k, or not the text answer)."""
    timeout: float = 60.0
    """Seconds per request before it is retried."""
    retries: int = 3
    """Retries per request after a timeout, connection error or HTTP 429/5xx (exponential backoff)."""
    backoff: float = 0.5
    """First backoff delay in seconds; doubled after every retry."""
    concurrency: int = 4
    """Requests in flight at once (HTTP); local backends batch instead."""
    batch_size: int = 16
    """Prompts per forward pass (local backends)."""
    prefix_cache: int = 256
    """hf: keys/values of this many prompt beginnings (the text before the searched part) kept for reuse across
    candidates; 0 = off."""
    n_ctx: int = 2048
    """llama_cpp: context length."""
    threads: int = 0
    """llama_cpp: CPU threads (0 = llama.cpp's default)."""

    def __post_init__(self) -> None:
        if self.backend not in ("hf", "llama_cpp", "openai"):
            raise PromptTuneError(f"config field 'backend': expected hf, llama_cpp or openai, got {self.backend!r}")
        if self.scoring not in ("logprobs", "text"):
            raise PromptTuneError(f"config field 'scoring': expected logprobs or text, got {self.scoring!r}")
        for name in ("timeout", "concurrency", "batch_size", "top_logprobs"):
            if getattr(self, name) <= 0:
                raise PromptTuneError(f"config field {name!r}: expected a positive number, got {getattr(self, name)!r}")
        if self.retries < 0:
            raise PromptTuneError(f"config field 'retries': expected a non-negative integer, got {self.retries!r}")


_WORD = re.compile(r"\s*\S+")


class LLMBackend:
    """Base class: the protocol plus shared helpers (word-level pieces, retries, concurrency).

    Subclasses implement `_label_logprobs` and `_generate` and charge the budget through `_charged`.
    """

    kind: ClassVar[str]

    def __init__(self, config: BackendConfig, budget: Budget | None = None):
        self.config = config
        self.budget = budget or Budget()

    # ---- the protocol ----------------------------------------------------------------------------------------
    def label_logprobs(
        self, prompts: Sequence[str], words: Sequence[str], prefixes: Sequence[str] | None = None
    ) -> Tensor:
        """log P(word | prompt) for every prompt and word: (N, W) float32.

        Args:
            prefixes: optionally, a beginning of each prompt that other prompts share (the text before the searched
                part); a backend may reuse its computation. It never changes what is scored.

        Raises:
            BudgetExhausted: the N calls would exceed the budget (nothing is sent).
            BackendError: the model could not be reached or answered malformed data.
        """
        self.budget.reserve(len(prompts))
        return self._label_logprobs(list(prompts), list(words), list(prefixes or [""] * len(prompts)))

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        seed: int = 0,
        chat: bool = False,
    ) -> list[str]:
        """Continuations (or chat answers when `chat`), one per prompt; greedy at temperature 0."""
        self.budget.reserve(len(prompts))
        return self._generate(list(prompts), max_new_tokens, temperature, seed, chat)

    def pieces(self, text: str) -> list[str]:
        """`text` split into units whose concatenation is `text` (tokens for local models, words otherwise)."""
        return _WORD.findall(text) if text.strip() else []

    def vocabulary(self) -> list[str] | None:
        """Strings a token-level optimiser may sample (None: the backend has no tokenizer to offer)."""
        return None

    def describe(self) -> dict[str, Any]:
        """What an artifact records to rebuild this backend (no secrets)."""
        return {"backend": self.kind, "model": self.config.model, "base_url": self.config.base_url}

    def close(self) -> None:
        """Release resources (threads, model handles)."""

    # ---- for subclasses ----------------------------------------------------------------------------------------
    def _label_logprobs(self, prompts: list[str], words: list[str], prefixes: list[str]) -> Tensor:
        raise NotImplementedError

    def _generate(
        self, prompts: list[str], max_new_tokens: int, temperature: float, seed: int, chat: bool
    ) -> list[str]:
        raise NotImplementedError

    def _charged(self, calls: int, tokens: int, kind: str) -> None:
        self.budget.add(calls, tokens, kind)

    def _retrying(self, what: str, fn: Callable[[], T], retriable: Callable[[Exception], bool]) -> T:
        """Run `fn`, retrying retriable failures with exponential backoff; the last failure is re-raised."""
        delay = self.config.backoff
        for attempt in range(self.config.retries + 1):
            try:
                return fn()
            except Exception as err:  # noqa: BLE001 - classified by `retriable`, re-raised below
                if attempt == self.config.retries or not retriable(err):
                    raise
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _parallel(self, fn: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
        """Map `fn` over items with at most `concurrency` in flight; results in input order."""
        if len(items) <= 1 or self.config.concurrency == 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(max_workers=min(self.config.concurrency, len(items))) as pool:
            return list(pool.map(fn, items))


def load_backend(config: BackendConfig, budget: Budget | None = None, **kwargs: Any) -> LLMBackend:
    """Build the backend named by `config.backend` (imports only that backend's dependencies)."""
    if config.backend == "hf":
        from .hf import HFBackend

        return HFBackend(config, budget, **kwargs)
    if config.backend == "llama_cpp":
        from .llama_cpp import LlamaCppBackend

        return LlamaCppBackend(config, budget, **kwargs)
    from .openai_http import OpenAIBackend

    return OpenAIBackend(config, budget, **kwargs)
