"""Heads: verbalizer (label words), classifier (PTEC), generation (text targets)."""

from . import (  # noqa: F401  (registers the heads)
    classifier,
    generation,
    knowledgeable,
    label_generation,
    soft_verbalizer,
    verbalizer,
)
from .base import Head

__all__ = ["Head"]
