"""Every technique registers itself here once; the generic test suite and the recipe runner read it."""

from __future__ import annotations

import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module

__all__ = ["INPUT_KINDS", "TASK_KINDS", "Technique", "TECHNIQUES", "all_techniques", "register"]

# The category packages whose import registers their techniques.
_CATEGORIES = ("effilab.data", "effilab.model", "effilab.optim", "effilab.budget", "effilab.system",
               "effilab.viz")


@dataclass(frozen=True)
class Technique:
    """`make()` returns a fresh callback with small test-friendly settings; `stateful` techniques are
    also checked under two-process DDP and must round-trip their state through checkpoints. `task` names the
    kind of learner the generic suite trains with it: "tabular" (12-dim MLP), "image" (1x16x16 images
    and a CNN) or "sequence" (a character language model). `conflicts` names the techniques it cannot be
    combined with (either side may declare a pair): the later of the two on a Learner refuses to fit with a
    clear error, and the generic suite combines every technique with all the others but those.
    `keeps_model_changes`: the technique changes the model's architecture for good (growth, inserted gates), as
    training changes its weights: a fit it leaves, finished or interrupted, leaves the model as it then was."""

    name: str
    make: Callable
    category: str
    stateful: bool = False
    task: str = "tabular"
    conflicts: tuple[str, ...] = ()
    keeps_model_changes: bool = False
    inputs: tuple[str, ...] = ()

    def conflicts_with(self, other: Technique) -> bool:
        return other.name in self.conflicts or self.name in other.conflicts


TASK_KINDS = ("tabular", "image", "sequence")
INPUT_KINDS = ("flat", "image", "sequence")
TECHNIQUES: dict[str, Technique] = {}


def _origin(make: Callable) -> tuple:
    return getattr(make, "__module__", None), getattr(make, "__qualname__", None)


def register(name: str, make: Callable, category: str, stateful: bool = False, task: str = "tabular",
             conflicts: tuple[str, ...] = (), keeps_model_changes: bool = False, inputs: tuple[str, ...] = ()) -> None:
    # Re-importing the registering module (`importlib.reload`, `%autoreload`) makes a new `make` of the same
    # origin: it replaces the old one. Another module claiming the name is an error.
    if name in TECHNIQUES and _origin(TECHNIQUES[name].make) != _origin(make):
        old = TECHNIQUES[name].make
        raise ValueError(f"technique {name!r} is already registered by {old.__module__}.{old.__qualname__}: "
                         "pick another name")
    if task not in TASK_KINDS:
        raise ValueError(f"technique {name!r}: task must be one of {TASK_KINDS}, got {task!r}")
    if isinstance(conflicts, str) or not all(isinstance(c, str) for c in conflicts):
        raise TypeError(f"technique {name!r}: conflicts must be a tuple of technique names, got {conflicts!r}")
    if isinstance(inputs, str) or not all(i in INPUT_KINDS for i in inputs):
        raise ValueError(f"technique {name!r}: inputs must be a tuple of {INPUT_KINDS}, got {inputs!r}")
    TECHNIQUES[name] = Technique(name, make, category, stateful, task, tuple(conflicts), bool(keeps_model_changes),
                                 tuple(inputs))


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
