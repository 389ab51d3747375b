"""A campaign's output folder: `results.json` (rewritten atomically after every run) and `report.html`.

No torch or fastai here: the command line checks the folder before it loads anything heavy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["FORMAT", "REPORT", "RESULTS", "ConfigMismatch", "OutputExists", "check_out_dir", "config_diff",
           "load_results", "normalise", "write_json_atomic"]

RESULTS, REPORT = "results.json", "report.html"
FORMAT = 2  # of results.json; 1 had no "failures", "status" or per-run status


class OutputExists(FileExistsError):
    """The output folder already holds a campaign's results."""


class ConfigMismatch(ValueError):
    """`resume` asked to continue a campaign with another configuration."""


def normalise(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists, keys strings), for comparisons."""
    return json.loads(json.dumps(value))


def config_diff(stored: dict, given: dict) -> list[str]:
    """Human-readable differences between two campaign configurations (empty when they match)."""
    stored, given = normalise(stored), normalise(given)
    out = []
    for key in sorted(set(stored) | set(given)):
        a, b = stored.get(key, "<absent>"), given.get(key, "<absent>")
        if a != b:
            out.append(f"{key}: {a!r} in the results, {b!r} now")
    return out


def write_json_atomic(path: Path, data: dict) -> None:
    """Write `data` so that a reader (or an interruption) never sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same folder: os.replace is atomic there
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_results(out) -> dict:
    path = Path(out) / RESULTS
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"nothing to resume: {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not a readable results file ({e})") from None
    if not isinstance(data, dict) or "config" not in data or "runs" not in data:
        raise ValueError(f"{path} is not an effilab bench results file")
    return data


def check_out_dir(out, resume: bool = False, overwrite: bool = False) -> dict | None:
    """Refuse to write over a campaign's results unless told to; returns the stored results to resume."""
    out = Path(out)
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other")
    if resume:
        return load_results(out)
    existing = [name for name in (RESULTS, REPORT) if (out / name).exists()]
    if existing and not overwrite:
        raise OutputExists(f"{out} already holds results ({', '.join(existing)}): continue that campaign "
                           f"with --resume {out}, replace it with --overwrite, or choose another --out")
    return None
