"""Side-by-side benchmarks: recipes, the runner, its summary table and report (`python -m effilab bench`).

What does a technique save on my task, and what does it cost in accuracy?

>>> from effilab import bench
>>> c = bench.run("mnist1d", ["baseline", "infobatch(ratio=0.3)"], seeds=[0, 1], epochs=8,
...               out="runs/ib")  # doctest: +SKIP
>>> print(c.table); c.show()  # doctest: +SKIP

A recipe is components joined by `+`, each `name` or `name(key=value, ...)` (Python literals):
`baseline`, `infobatch(ratio=0.3)+dashboard`, `random-prune(fraction=0.2)`; components are the
built-ins and every technique of `effilab.registry` (see `components()`).
"""

from .._lazy import lazy_attributes
from .recipes import (
    COMPONENTS,
    DEFAULT_FRACTION,
    DEFAULT_RECIPES,
    RECIPES,
    Component,
    ComponentSpec,
    Recipe,
    RecipeError,
    RunContext,
    components,
    get_recipe,
    load_recipes_file,
    parse_components,
    parse_recipe,
    random_prune_fraction,
    register,
    register_component,
)
from .store import ConfigMismatch, OutputExists
from .tasks import TaskError

# The runner imports fastai (seconds): loaded on first use, so the command line answers `--help` and
# usage errors without it.
_RUNNER = ("Campaign", "CampaignInterrupted", "RunFailure", "RunResult", "SampleCounter", "StopAtAccuracy",
           "format_table", "run", "summarize")
_LAZY = {name: "effilab.bench.runner" for name in _RUNNER}
_LAZY.update({name: "effilab.bench.report" for name in ("figures", "report_html", "write_report")})

__all__ = [
    "COMPONENTS",
    "DEFAULT_FRACTION",
    "DEFAULT_RECIPES",
    "RECIPES",
    "Campaign",
    "CampaignInterrupted",
    "Component",
    "ComponentSpec",
    "ConfigMismatch",
    "OutputExists",
    "Recipe",
    "RecipeError",
    "RunContext",
    "RunFailure",
    "RunResult",
    "SampleCounter",
    "StopAtAccuracy",
    "TaskError",
    "components",
    "figures",
    "format_table",
    "get_recipe",
    "load_recipes_file",
    "parse_components",
    "parse_recipe",
    "random_prune_fraction",
    "register",
    "register_component",
    "report_html",
    "run",
    "summarize",
    "write_report",
]

__getattr__, __dir__ = lazy_attributes(__name__, globals(), _LAZY)
