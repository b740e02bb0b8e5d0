"""Discrete prompt optimisation: text prompts for black-box and white-box LLMs (see `base.py` for the contract)."""

from __future__ import annotations

import importlib
import pkgutil

# Modules of the package that are not optimisers; every other module registers one when imported.
_INFRASTRUCTURE = {"base", "objective", "loop", "checkpoint", "p1", "artifact", "cli", "api"}


def load_optimizers() -> None:
    """Import every optimiser module of this package, which runs its `@register_optimizer` decorator."""
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _INFRASTRUCTURE and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
