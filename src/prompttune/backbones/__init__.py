"""Frozen backbones behind one protocol (the only package that imports transformers model classes)."""

from . import causal_lm, encoder  # noqa: F401  (registers the kinds)
from .base import Backbone, load_backbone

__all__ = ["Backbone", "load_backbone"]
