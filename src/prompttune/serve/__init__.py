"""`prompttune serve`: many learned prompts over one frozen backbone, mixed in one batch, behind an
OpenAI-compatible HTTP API."""

from .app import PromptServer, RunningServer, read_api_keys
from .config import ServeConfig

__all__ = ["PromptServer", "RunningServer", "ServeConfig", "read_api_keys"]
