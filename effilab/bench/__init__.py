"""Side-by-side benchmarks: recipes, the runner, its summary table and report (`python -m effilab bench`).

Data flows one way, one job per module, none importing a later stage: `tasks`, `recipes` and
`regularisation` (what to train: data, recipe text, components) -> `fit` (one recipe with one seed, and
what it spent) -> `store` (the stored records, `results.json`) -> `table` and `report` (the summary,
its table, the HTML report) -> `campaign` (`run`: all of it, end to end).

What does a technique save on my task, and what does it cost in accuracy?

>>> from effilab import bench
>>> c = bench.run("mnist1d", ["baseline", "infobatch(ratio=0.3)"], seeds=[0, 1], epochs=8,
...               out="runs/ib")  # doctest: +SKIP
>>> print(c.table); c.show()  # doctest: +SKIP

A recipe is components joined by `+`, each `name` or `name(key=value, ...)` (Python literals):
`baseline`, `infobatch(ratio=0.3)+dashboard`, `random-prune(fraction=0.2)`; components are the
built-ins and every technique of `effilab.registry` (see `components()`).

Is a technique better than training the plain recipe for less? `run(..., matched=True)` (the command
line's default) follows each technique with `baseline@<technique>`: the baseline given exactly what the
technique spent, its one-cycle schedule decayed to the end, and the table says, with a paired test over
seeds, whether the technique beat it. `run(..., budget="samples")` (or steps, flops, time) compares every
recipe at the baseline's spend; `infobatch+reinvest` spends what InfoBatch saved on more epochs.
"""

from .._lazy import lazy_attributes
from .recipes import (
    BUDGET_UNITS,
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
from .store import ConfigMismatch, OutputExists, OutputUnwritable, RunFailure, RunResult
from .table import format_table, html_table, paired_test, summarize
from .tasks import TaskError

# The run stage imports torch and fastai (seconds), the report plotly: loaded on first use, so the command
# line answers `--help` and usage errors without them.
_LAZY = {name: "effilab.bench.campaign" for name in ("Campaign", "CampaignInterrupted", "run")}
_LAZY.update({name: "effilab.bench.fit" for name in ("Fit", "SampleCounter", "Spend", "StopAtAccuracy")})
_LAZY.update({name: "effilab.bench.report" for name in ("figures", "report_html", "write_report")})

__all__ = [
    "BUDGET_UNITS",
    "COMPONENTS",
    "DEFAULT_FRACTION",
    "DEFAULT_RECIPES",
    "RECIPES",
    "Campaign",
    "CampaignInterrupted",
    "Component",
    "ComponentSpec",
    "ConfigMismatch",
    "Fit",
    "OutputExists",
    "OutputUnwritable",
    "Recipe",
    "RecipeError",
    "RunContext",
    "RunFailure",
    "RunResult",
    "SampleCounter",
    "Spend",
    "StopAtAccuracy",
    "TaskError",
    "components",
    "figures",
    "format_table",
    "get_recipe",
    "html_table",
    "load_recipes_file",
    "parse_components",
    "paired_test",
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
