"""The README's quickstarts run as written (only the data size and epochs are shrunk)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_has_both_quickstarts():
    assert len(SNIPPETS) == 2 and "InfoBatch(" in SNIPPETS[0] and "InfoBatchSampler" in SNIPPETS[1]


@pytest.mark.parametrize("i", range(len(SNIPPETS)))
def test_quickstart_runs(i, capsys):
    code = SNIPPETS[i].replace("n_samples=4000", "n_samples=1000")
    scope: dict = {}
    exec(compile(code, f"README.md snippet {i}", "exec"), scope)
    if i == 0:
        assert "forwarded" in capsys.readouterr().out
        assert scope["samples"]["forwarded_total"] < scope["samples"]["full_total"]
    else:
        assert scope["pruner"].plan.epoch == scope["epochs"] - 1


def test_readme_says_how_to_open_the_tutorials_and_install():
    assert "source scripts/env.sh && jupyter lab tutorials/" in README
    assert "jupyter lab --allow-root tutorials/" in README
    assert "pip install -e ." in README


def test_every_notebook_the_readme_links_exists_and_every_tutorial_is_listed():
    linked = set(re.findall(r"\]\(((?:tutorials|notebooks)/[\w.]+\.ipynb)\)", README))
    assert linked and all((ROOT / p).is_file() for p in linked), linked
    tutorials = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tutorials").glob("*.ipynb")}
    assert tutorials <= linked, f"list these tutorials in the README: {sorted(tutorials - linked)}"
