"""Stored results: `RunResult` and `RunFailure` (one record per run, as in `results.json`), the
campaign's JSON document, and its output folder (`results.json`, rewritten atomically after every run,
and `report.html`).

Stage 3 of the bench (recipes -> run -> **stored result** -> table/report). No torch or fastai here: the
command line checks the folder and a stored campaign before it loads anything heavy.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .fit import Fit

__all__ = ["FORMAT", "REPORT", "RESULTS", "ConfigMismatch", "OutputExists", "OutputUnwritable", "RunFailure",
           "RunResult", "check_out_dir", "config_diff", "load_results", "normalise", "prepare_out_dir",
           "validate_results", "write_json_atomic"]

RESULTS, REPORT = "results.json", "report.html"
FORMAT = 2  # of results.json; 1 had no "failures", "status" or per-run status


class OutputExists(FileExistsError):
    """The output folder already holds a campaign's results."""


class ConfigMismatch(ValueError):
    """`resume` asked to continue a campaign with another configuration."""


class _JsonRecord:
    """A dataclass that round-trips through `results.json` (unknown keys from other versions are ignored)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class RunResult(_JsonRecord):
    """One fit: its recipe and seed, the accuracies, what it cost, and what its recipe chose (`params`).

    `samples` counts the training samples forwarded, `backpropagated` those whose loss reached the
    gradient (a technique may report fewer through telemetry; else equal), `full_samples` what full
    data would forward in `epochs` epochs, `work` the samples-equivalent forward+backward passes at
    full size (`effilab.bench.fit.work_of`). `peak_mem_mb` is the run's peak of the CUDA allocator on a
    GPU, of the resident set (RSS) on a CPU (`peak_mem_scope` "process" where the peak mark could not be
    reset before the run). With a target accuracy, `time_to_target_s` (wall-clock from the
    start of the fit to the end of the epoch that reached it) and `samples_to_target` (None: never
    reached) and `epochs_run` (fewer than `epochs` when reached early).
    """

    recipe: str
    seed: int
    task: str
    epochs: int
    bs: int
    lr: float
    accuracy: float
    best_accuracy: float
    wall_s: float
    cpu_s: float  # the process's CPU time during the fit: less swayed than wall-clock by a busy machine
    samples: int
    full_samples: int
    steps: int
    peak_rss_mb: float | None
    history: list[dict] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    telemetry: dict = field(default_factory=dict)
    backpropagated: int | None = None
    epochs_run: int | None = None
    peak_mem_mb: float | None = None
    peak_mem_kind: str = "rss"
    throughput: float | None = None  # training samples forwarded per second of the fit's wall-clock
    target_acc: float | None = None
    time_to_target_s: float | None = None
    samples_to_target: int | None = None
    epoch_to_target: int | None = None
    recipe_text: str = ""
    device: str = "cpu"
    status: str = "ok"
    work: float | None = None
    peak_mem_scope: str = "run"
    flops: float | None = None  # training FLOPs (forward+backward, FlopCounterMode; None: not counted)
    train_s: float | None = None  # wall-clock of the training phases (a time budget's measure)

    def __post_init__(self):
        if self.backpropagated is None:
            self.backpropagated = self.samples
        if self.epochs_run is None:
            self.epochs_run = len(self.history) or self.epochs
        if self.peak_mem_mb is None:
            self.peak_mem_mb = self.peak_rss_mb
        if self.throughput is None and self.wall_s:
            self.throughput = self.samples / self.wall_s
        if self.work is None:
            self.work = float(self.samples)

    @classmethod
    def from_fit(cls, fit: Fit, recipe, seed: int, task: str, epochs: int, bs: int, lr: float,
                 target_acc: float | None, device: str) -> RunResult:
        """The stored record of a finished `Fit` of `recipe` (a `Recipe`) with `seed`."""
        sp = fit.spend
        return cls(
            recipe=recipe.name, seed=seed, task=task, epochs=epochs, bs=bs, lr=lr, accuracy=fit.accuracy,
            best_accuracy=fit.best_accuracy, wall_s=sp.wall_s, cpu_s=sp.cpu_s, samples=sp.samples,
            full_samples=sp.full_samples, steps=sp.steps,
            peak_rss_mb=sp.peak_mem_mb if sp.peak_mem_kind == "rss" else None, history=fit.history,
            params=fit.params, telemetry=fit.telemetry, backpropagated=sp.backpropagated,
            epochs_run=len(fit.history), peak_mem_mb=sp.peak_mem_mb, peak_mem_kind=sp.peak_mem_kind,
            throughput=sp.throughput, target_acc=target_acc, time_to_target_s=fit.time_to_target_s,
            samples_to_target=fit.samples_to_target, epoch_to_target=fit.epoch_to_target,
            recipe_text=recipe.text, device=device, work=sp.work, peak_mem_scope=sp.peak_mem_scope,
            flops=sp.flops, train_s=sp.train_s)

    @property
    def samples_frac(self) -> float:
        return self.samples / self.full_samples if self.full_samples else math.nan


@dataclass
class RunFailure(_JsonRecord):
    """A run that raised: which one, the error and its traceback; the campaign went on without it."""

    recipe: str
    seed: int
    task: str
    error_type: str
    error: str
    traceback: str
    wall_s: float
    status: str = "failed"

    @property
    def message(self) -> str:
        """The error on one line (fastai puts the callback's name and a newline before the message)."""
        text = " ".join(self.error.split())
        return f"{self.error_type}: {text}" if text else self.error_type


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


def _jsonable(value):
    """What `json` cannot write on its own (numpy scalars, paths, ...): a number or its text."""
    for cast in (int, float):
        try:
            if not isinstance(value, (list, dict, str)) and cast(value) == value:
                return cast(value)
        except (TypeError, ValueError):
            pass
    return str(value)


def write_json_atomic(path: Path, data: dict) -> None:
    """Write `data` so that a reader (or an interruption) never sees a half-written file: a temporary
    file in the same folder, then `os.replace`. A value json cannot write is stored as its text."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same folder: os.replace is atomic there
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, default=_jsonable)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class OutputUnwritable(OSError):
    """The output folder cannot be made or written to."""


def prepare_out_dir(out) -> Path:
    """Make the output folder and check that a file can be written in it, before any training."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputUnwritable(f"--out {out} is a file, not a folder: choose a folder (it is made if missing)")
    probe = out / f".effilab-write-check.{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputUnwritable(f"cannot write results to {out}: {e.strerror or e}. Choose a writable folder "
                               "with --out") from None
    return out


# The fields a stored record must have, with their types (bool is no int here).
_REQUIRED = {
    RunResult: {"recipe": str, "seed": int, "accuracy": (int, float), "best_accuracy": (int, float),
                "wall_s": (int, float), "cpu_s": (int, float), "samples": int, "full_samples": int,
                "steps": int, "epochs": int, "bs": int, "lr": (int, float)},
    RunFailure: {"recipe": str, "seed": int, "error_type": str, "error": str},
}
_CONFIG = {"task": str, "recipes": list, "seeds": list, "epochs": int, "bs": int, "lr": (int, float)}


def _check_fields(record, required: Mapping[str, Any], where: str) -> None:
    if not isinstance(record, Mapping):
        raise ValueError(f"{where} is not a table of fields")
    for key, types in required.items():
        value = record.get(key)
        if key not in record:
            raise ValueError(f"{where} lacks {key!r}")
        if isinstance(value, bool) or not isinstance(value, types):
            raise ValueError(f"{where}: {key!r} has the wrong type ({type(value).__name__}: {value!r})")


def validate_results(data: Any, path: Path | str = RESULTS) -> dict:
    """`data` if it is a campaign document (`results.json`'s content) with the fields a resume reads,
    else a `ValueError` that says what is wrong."""
    if not isinstance(data, dict) or "config" not in data or "runs" not in data:
        raise ValueError(f"{path} is not an effilab bench results file")
    try:
        _check_fields(data["config"], _CONFIG, "its config")
        if not isinstance(data["runs"], list) or not isinstance(data.get("failures", []), list):
            raise ValueError("runs and failures must be lists")
        for i, run in enumerate(data["runs"]):
            if not isinstance(run, Mapping) or run.get("status", "ok") == "ok":
                _check_fields(run, _REQUIRED[RunResult], f"run {i + 1}")
        for i, failure in enumerate(data.get("failures", [])):
            _check_fields(failure, _REQUIRED[RunFailure], f"failure {i + 1}")
    except ValueError as e:
        raise ValueError(f"{path} is not a usable effilab bench results file: {e}") from None
    return data


def load_results(out) -> dict:
    """The campaign document stored in folder `out`, checked (`validate_results`)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file: --resume takes the campaign's folder (the one holding {RESULTS})")
    path = out / RESULTS
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"nothing to resume: {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a readable results file ({e})") from None
    return validate_results(data, path)


def check_out_dir(out, resume: bool = False, overwrite: bool = False) -> dict | None:
    """Refuse to write over a campaign's results unless told to; returns the stored results to resume."""
    out = Path(out)
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other")
    if resume:
        return load_results(out)
    if out.exists() and not out.is_dir():
        raise OutputUnwritable(f"--out {out} is a file, not a folder: choose a folder (it is made if missing)")
    existing = [name for name in (RESULTS, REPORT) if (out / name).exists()]
    if existing and not overwrite:
        raise OutputExists(f"{out} already holds results ({', '.join(existing)}): continue that campaign "
                           f"with --resume {out}, replace it with --overwrite, or choose another --out")
    return None
