"""Every technique registers itself here once; the generic test suite and the recipe runner read it."""

from __future__ import annotations

import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module

__all__ = ["Technique", "TECHNIQUES", "all_techniques", "register"]

# The category packages whose import registers their techniques.
_CATEGORIES = ("effilab.data", "effilab.model", "effilab.optim", "effilab.budget", "effilab.system",
               "effilab.viz")


@dataclass(frozen=True)
class Technique:
    """`make()` returns a fresh callback with small test-friendly settings; `stateful` techniques are
    also checked under two-process DDP and must round-trip their state through checkpoints."""

    name: str
    make: Callable
    category: str
    stateful: bool = False


TECHNIQUES: dict[str, Technique] = {}


def register(name: str, make: Callable, category: str, stateful: bool = False) -> None:
    if name in TECHNIQUES and TECHNIQUES[name].make is not make:
        raise ValueError(f"technique {name!r} is already registered")
    TECHNIQUES[name] = Technique(name, make, category, stateful)


def all_techniques() -> dict[str, Technique]:
    """Import every module of every category package (registering its techniques) and return the
    registry. Category packages load their modules lazily, so each module is imported here."""
    for name in _CATEGORIES:
        try:
            pkg = import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # a category without techniques yet is fine; a broken import is not
                raise
            continue
        for module in pkgutil.iter_modules(pkg.__path__):
            import_module(f"{name}.{module.name}")
    return dict(TECHNIQUES)
