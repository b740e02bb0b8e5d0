"""Heads: verbalizer (label words), classifier (PTEC), generation (text targets)."""

from . import classifier, generation, label_generation, verbalizer  # noqa: F401  (registers the heads)
from .base import Head

__all__ = ["Head"]
