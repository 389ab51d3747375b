"""The README's techniques table lists every budgeted and system-centric technique, and its layout every folder."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    return re.search(rf"^## {title}\n(.*?)(?=^## )", README, flags=re.S | re.M).group(1)


def test_every_budgeted_and_system_technique_has_a_row_with_its_recipe_name():
    from effilab.registry import all_techniques

    table = _section("Techniques")
    names = [n for n, t in all_techniques().items() if t.category in ("budget", "system")]
    assert {"budget", "schedule_free", "activation_checkpointing", "profiler"} <= set(names)
    missing = [n for n in names if f"`{n}`" not in table]
    assert not missing, f"add rows for {missing}"
    for public in ("fit_budget", "LinearDecay", "REX", "WSD", "DeviceDataLoaders", "distrib_ctx", "launch",
                   "FSDP2", "MFU", "out-of-memory", "memory_snapshot"):
        assert public in table, public
    rows = [line for line in table.splitlines() if line.startswith("| budgeted") or line.startswith("| system")]
    assert len(rows) == 2 and all(line.count("|") == 4 for line in rows)


def test_layout_names_every_package_folder():
    layout = README.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    folders = sorted(p.name for p in (ROOT / "effilab").iterdir() if p.is_dir() and not p.name.startswith("_"))
    missing = [f for f in folders if f"`effilab/{f}`" not in layout]
    assert not missing, f"the Layout section does not mention {missing}"
