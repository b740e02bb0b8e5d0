"""Soft-prompt methods: one file each, registered by decorator."""

from . import bayesprompt, deep_prompt, dept, ept, iapt, manual, p_tuning, prefix_tuning, prompt_tuning  # noqa: F401  (registers the methods)
from .base import InitContext, SoftPromptMethod

__all__ = ["InitContext", "SoftPromptMethod"]
