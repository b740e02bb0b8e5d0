"""Single source of truth for what can be named in a config: plain dicts filled by decorators."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from .errors import PromptTuneError

T = TypeVar("T")

METHODS: dict[str, type] = {}
HEADS: dict[str, type] = {}
BACKBONES: dict[str, type] = {}
OPTIMIZERS: dict[str, type] = {}  # discrete prompt optimisers (prompttune.discrete)


def _register(table: dict[str, type], what: str) -> Callable[[str], Callable[[T], T]]:
    def decorator_for(name: str) -> Callable[[T], T]:
        def decorator(cls: T) -> T:
            if name in table and table[name] is not cls:
                raise ValueError(f"{what} {name!r} registered twice")
            table[name] = cls  # type: ignore[assignment]
            cls.name = name  # type: ignore[attr-defined]
            return cls

        return decorator

    return decorator_for


register_method = _register(METHODS, "method")
register_head = _register(HEADS, "head")
register_backbone = _register(BACKBONES, "backbone")
register_optimizer = _register(OPTIMIZERS, "optimizer")


def lookup(table: dict[str, type], name: str, what: str) -> type:
    """Return table[name] or raise a PromptTuneError listing the valid names."""
    _ensure_loaded()
    if name not in table:
        raise PromptTuneError(f"unknown {what} {name!r}; expected one of: {', '.join(sorted(table))}")
    return table[name]


def _ensure_loaded() -> None:
    # Importing the packages runs their decorators; done lazily so `import prompttune` stays light.
    from . import backbones, heads, methods  # noqa: F401
    from .discrete import load_optimizers

    load_optimizers()
