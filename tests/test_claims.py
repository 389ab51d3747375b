"""No prose calls a technique lossless on its own authority: "lossless" is a paper's claim, attributed."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A sentence may say "lossless" when it names the paper (its title, its claim) or denies it here.
ATTRIBUTED = re.compile(r"paper|Lossless Training Speed Up|not\*?\*? lossless|reports? ", re.IGNORECASE)
UNHEDGED = re.compile(r"lossless|no loss|without loss", re.IGNORECASE)


def _texts():
    for path in sorted((ROOT / "effilab").rglob("*.py")):
        yield path, path.read_text()
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        yield path, path.read_text()
    for path in sorted([*(ROOT / "tutorials").glob("*.ipynb"), *(ROOT / "notebooks").glob("*.ipynb")]):
        cells = json.loads(path.read_text())["cells"]
        yield path, "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")


def _sentences(text: str):
    # Sentences end at a full stop, a colon or a blank line; docstring and comment wrapping is undone.
    flat = re.sub(r"\n\s*(#\s*)?", " ", re.sub(r"\n\s*\n", " ¶ ", text))
    return re.split(r"(?<=[.:;])\s+|¶", flat)


def test_lossless_only_as_an_attributed_claim():
    bad = [f"{path.relative_to(ROOT)}: {s.strip()[:160]}" for path, text in _texts()
           for s in _sentences(text) if UNHEDGED.search(s) and not ATTRIBUTED.search(s)]
    assert not bad, "unattributed 'lossless' claims:\n" + "\n".join(bad)


def test_the_checker_sees_an_unattributed_claim():
    text = "InfoBatch: lossless training speed-up by unbiased dynamic data pruning.\n\nMore."
    assert any(UNHEDGED.search(s) and not ATTRIBUTED.search(s) for s in _sentences(text))


@pytest.mark.parametrize("name", ["infobatch", "random_prune", "static_prune", "progressive_resize"])
def test_list_line_of_a_card_makes_no_lossless_claim(name):
    from effilab.bench.recipes import components

    card = components()[name].card()
    assert card and not UNHEDGED.search(card), card
