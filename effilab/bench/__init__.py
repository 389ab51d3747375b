"""Side-by-side benchmarks: recipes, the runner and its summary table (`python -m effilab bench`).

>>> from effilab import bench
>>> results = bench.run("mnist1d", ["baseline", "infobatch"], seeds=[0, 1], epochs=8)  # doctest: +SKIP
>>> print(bench.format_table(bench.summarize(results)))  # doctest: +SKIP
"""

from importlib import import_module

from .recipes import (
    DEFAULT_FRACTION,
    DEFAULT_RECIPES,
    RECIPES,
    Recipe,
    RunContext,
    get_recipe,
    random_prune_fraction,
    register,
)

# The runner imports fastai (seconds): loaded on first use, so the command line answers `--help` and
# usage errors without it.
_LAZY = {name: "effilab.bench.runner" for name in ("RunResult", "SampleCounter", "format_table", "run",
                                                  "summarize")}

__all__ = [
    "DEFAULT_FRACTION",
    "DEFAULT_RECIPES",
    "RECIPES",
    "Recipe",
    "RunContext",
    "RunResult",
    "SampleCounter",
    "format_table",
    "get_recipe",
    "random_prune_fraction",
    "register",
    "run",
    "summarize",
]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'effilab.bench' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
