"""Text-in/text-out LLM backends for discrete prompt search: local transformers, llama.cpp, OpenAI-compatible HTTP."""

from .base import BackendConfig, BackendError, Budget, BudgetExhausted, LLMBackend, load_backend

__all__ = ["BackendConfig", "BackendError", "Budget", "BudgetExhausted", "LLMBackend", "load_backend"]
