"""Every notebook under tutorials/ and notebooks/ runs end to end at its quick setting.

Convention: each notebook has one cell tagged `parameters` that sets `QUICK = False`; the test runs it with
papermill and `QUICK=True`. The notebooks assert their own claims, so a claim that stops holding fails
here with the cell's traceback.
"""

from __future__ import annotations

import ast
import json
import os
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIRS = ("tutorials", "notebooks")
NOTEBOOKS = sorted(p for d in NOTEBOOK_DIRS for p in (ROOT / d).rglob("*.ipynb")
                   if ".ipynb_checkpoints" not in p.parts)
QUICK_PARAMETERS = {"QUICK": True}
MAX_EXECUTED_BYTES = 2 * 1024 * 1024
CELL_TIMEOUT_S = 600

notebook_params = pytest.mark.parametrize("path", NOTEBOOKS, ids=[str(p.relative_to(ROOT)) for p in NOTEBOOKS])


def _read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


@pytest.fixture(scope="session")
def kernel_env(tmp_path_factory):
    """A `python3` kernelspec that runs this interpreter with the checkout on PYTHONPATH, found first.

    papermill starts the first `python3` kernelspec on the Jupyter path; a user- or system-level one could
    point at another Python. JUPYTER_PATH comes before every other kernel folder.
    """
    jupyter_dir = tmp_path_factory.mktemp("jupyter")
    spec_dir = jupyter_dir / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    # One OpenMP thread unless told otherwise: on a busy 2-core machine torch's spinning threads made a
    # training step ~20x slower than one thread (measured: 230-400 ms vs 12-20 ms), idle they gain < 2x.
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (effilab tests)",
        "language": "python",
        "env": {"PYTHONPATH": pythonpath, "OMP_NUM_THREADS": threads},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", os.pathsep.join(p for p in (str(jupyter_dir), os.environ.get("JUPYTER_PATH", ""))
                                                  if p))
        yield spec


def test_kernel_runs_this_python_and_this_checkout(kernel_env):
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3")
    try:
        out = []
        code = "import sys, effilab; print(sys.executable); print(effilab.__file__)"
        reply = kc.execute_interactive(code, timeout=120, output_hook=lambda msg: out.append(
            msg["content"].get("text", "") if msg["msg_type"] == "stream" else ""))
        assert reply["content"]["status"] == "ok", reply["content"]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    executable, effilab_file = "".join(out).split()
    assert Path(executable).resolve() == Path(sys.executable).resolve()
    assert Path(effilab_file).resolve() == (ROOT / "effilab" / "__init__.py").resolve()


def test_notebooks_found():
    assert any(p.is_relative_to(ROOT / "tutorials") for p in NOTEBOOKS), "no tutorial notebook collected"


@notebook_params
def test_parameters_cell_defines_quick(path):
    nb = _read(path)
    cells = [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{path.name}: expected one cell tagged 'parameters', found {len(cells)}"
    tree = ast.parse(cells[0].source)
    quick = [node.value for node in tree.body if isinstance(node, ast.Assign)
             and any(isinstance(t, ast.Name) and t.id == "QUICK" for t in node.targets)]
    assert len(quick) == 1 and isinstance(quick[0], ast.Constant) and quick[0].value is False, \
        f"{path.name}: the parameters cell must set `QUICK = False` (the tests pass QUICK=True)"


@notebook_params
def test_committed_without_outputs(path):
    nb = _read(path)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
             and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: cells {dirty} have outputs or execution counts; clear them before committing"


@pytest.mark.slow
@notebook_params
def test_notebook_runs_quick(path, kernel_env, tmp_path):
    import papermill
    from papermill.exceptions import PapermillExecutionError

    out = tmp_path / path.name
    error = None
    try:
        papermill.execute_notebook(
            str(path), str(out), parameters=QUICK_PARAMETERS, kernel_name="python3", cwd=str(tmp_path),
            progress_bar=False, store_widget_state=False, execution_timeout=CELL_TIMEOUT_S)
    except PapermillExecutionError as e:
        error = e
    if error is not None:
        # Its text is the failing cell's traceback (shown alone, without papermill's frames); the executed
        # notebook holds the outputs of the cells before it.
        pytest.fail(f"{path.relative_to(ROOT)} failed (executed copy: {out}):{error}", pytrace=False)
    executed = _read(out)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and "QUICK = True" in injected[0].source
    size = out.stat().st_size
    assert size < MAX_EXECUTED_BYTES, f"{path.name}: executed notebook is {size / 1e6:.1f} MB"
