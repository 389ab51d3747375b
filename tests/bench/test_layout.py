"""The bench's modules form one direction of flow: recipes -> run -> stored result -> table/report ->
campaign. No module imports one of a later stage (at the top or inside a function), so there is no
cycle, and the early stages load without torch, fastai or plotly where the command line needs them."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "effilab" / "bench"
# Each module's stage; a module may import its own stage's modules or earlier ones.
STAGES = {"tasks": 0, "regularisation": 0, "recipes": 0, "fit": 1, "distributed": 1, "store": 2, "table": 3,
          "report": 4, "campaign": 5}


def _bench_imports(path: Path) -> set[str]:
    """The effilab.bench modules that `path` imports, anywhere in the file (TYPE_CHECKING blocks too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y / from . import x
                found.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
            elif node.level == 0 and (node.module or "").startswith("effilab.bench."):
                found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[2] for a in node.names if a.name.startswith("effilab.bench."))
    return found


def test_every_module_has_a_stage():
    modules = {p.stem for p in BENCH.glob("*.py")} - {"__init__"}
    assert modules == set(STAGES), "give each new module of effilab/bench a stage in STAGES"


@pytest.mark.parametrize("module", sorted(STAGES))
def test_no_module_imports_a_later_stage(module):
    imported = _bench_imports(BENCH / f"{module}.py")
    later = sorted(m for m in imported if STAGES.get(m, -1) > STAGES[module])
    assert not later, f"effilab/bench/{module}.py (stage {STAGES[module]}) imports later stage(s): {later}"
    assert module not in imported


def test_the_checker_sees_a_later_import(tmp_path):
    # The test above would pass on a file it cannot read: here it must flag a late, indented import.
    p = tmp_path / "recipes.py"
    p.write_text("def f():\n    from .campaign import run\n    from effilab.bench.store import RunResult\n")
    assert _bench_imports(p) == {"campaign", "store"}


def test_recipes_table_and_store_load_without_torch():
    code = ("import sys; import effilab.bench.recipes, effilab.bench.store, effilab.bench.table, "
            "effilab.bench.tasks; print(sorted(m for m in ('torch', 'fastai', 'plotly') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
