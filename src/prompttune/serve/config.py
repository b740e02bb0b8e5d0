"""`ServeConfig`: every knob of `prompttune serve`, shared by Python and the CLI (flags come from the docstrings)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import PromptTuneError


@dataclass
class ServeConfig:
    """Limits, batching and network settings of the prompt server."""

    host: str = "127.0.0.1"
    """Address to bind; loopback unless told otherwise (use 0.0.0.0 only behind a firewall or with an API key)."""
    port: int = 8000
    """TCP port (0 picks a free one)."""
    api_key_file: str | None = None
    """File holding the bearer API key(s), one per line; every endpoint but /health then requires one."""
    prompt_dirs: list[str] = field(default_factory=list)
    """Directories POST /v1/prompts may load artifacts from (default: the parent folders of the startup prompts)."""
    max_batch_size: int = 32
    """Most rows in one forward pass (classification rows plus decoding sequences)."""
    batch_wait_ms: float = 5.0
    """How long an idle engine waits for more requests before it runs a batch."""
    max_queue: int = 256
    """Requests waiting for a batch slot; one more is answered 429."""
    max_body_bytes: int = 1 << 20
    """Largest request body in bytes (413 beyond)."""
    max_input_tokens: int = 2048
    """Longest prompt in tokens after the template is applied (also capped by the model's context)."""
    max_new_tokens: int = 512
    """Largest `max_tokens` a request may ask for."""
    default_max_tokens: int = 16
    """`max_tokens` of a completion request that gives none (OpenAI's default)."""
    max_logprobs: int = 100
    """Largest `logprobs` (completions) / `top_logprobs` (chat) a request may ask for."""
    max_inputs: int = 64
    """Most prompts or texts in one request (`prompt` list, `n`, classify `input` list)."""
    mix_prompts: bool = True
    """Batch requests for different prompts together; off serves one prompt per batch (the benchmark baseline)."""
    timeout_graceful_shutdown: float = 30.0
    """Seconds a shutdown waits for in-flight requests to finish."""

    def __post_init__(self) -> None:
        positive = ("max_batch_size", "max_queue", "max_body_bytes", "max_input_tokens", "max_new_tokens", "max_inputs")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise PromptTuneError(f"serve config field {name!r}: expected a positive integer, got {value!r}")
        if not 0 <= self.port < 65536:
            raise PromptTuneError(f"serve config field 'port': expected 0..65535, got {self.port!r}")
        if self.batch_wait_ms < 0:
            raise PromptTuneError(f"serve config field 'batch_wait_ms': expected >= 0, got {self.batch_wait_ms!r}")
        if not 0 < self.default_max_tokens <= self.max_new_tokens:
            raise PromptTuneError(
                f"serve config field 'default_max_tokens': expected 1..max_new_tokens ({self.max_new_tokens}), "
                f"got {self.default_max_tokens!r}"
            )
        if self.max_logprobs < 0:
            raise PromptTuneError(f"serve config field 'max_logprobs': expected >= 0, got {self.max_logprobs!r}")
