"""The side-by-side runner: the same model on the same data under several recipes and seeds.

`run(...)` returns one `RunResult` per (recipe, seed); `summarize` aggregates them per recipe and
`format_table` prints the summary. The command line (`python -m effilab bench`) is a thin shell over these.
"""

from __future__ import annotations

import contextlib
import gc
import math
import random
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..callback import EffilabCallback
from .recipes import DEFAULT_RECIPES, Recipe, RunContext, get_recipe, run_order

__all__ = ["RunResult", "SampleCounter", "format_table", "run", "summarize"]


class SampleCounter(EffilabCallback):
    """Counts the training samples forwarded and the optimiser steps taken, whatever the recipe.

    Writes per-epoch counts to telemetry (source `"counter"`, stream `"epoch"`: forwarded, steps and
    running totals). Host-side integers only: batch sizes are shapes, so counting never syncs.
    """

    order = 100  # after the callbacks that may shorten or skip batches
    telemetry_name = "counter"

    def __init__(self):
        self.forwarded = self.steps = 0
        self._epoch_forwarded = self._epoch_steps = 0
        self._cancelled = False

    def before_train(self):
        self._epoch_forwarded = self._epoch_steps = 0

    def before_batch(self):
        self._cancelled = False

    def after_pred(self):
        if self.training:
            from fastai.torch_core import find_bs

            self._epoch_forwarded += find_bs(self.learn.xb)

    def after_cancel_step(self):
        self._cancelled = True  # e.g. gradient accumulation: fastai still fires after_step

    def after_step(self):
        if self.training and not self._cancelled:
            self._epoch_steps += 1

    def after_train(self):
        if not self.training or hasattr(self.learn, "lr_finder"):
            return
        self.forwarded += self._epoch_forwarded
        self.steps += self._epoch_steps
        self.telemetry.record(self.telemetry_name, "epoch", epoch=self.learn.epoch,
                              forwarded=self._epoch_forwarded, steps=self._epoch_steps,
                              forwarded_total=self.forwarded, steps_total=self.steps)

    def state_dict(self) -> dict:
        return {"forwarded": self.forwarded, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.forwarded, self.steps = state["forwarded"], state["steps"]


@dataclass
class RunResult:
    """One fit: its recipe and seed, the accuracies, what it cost, and what its recipe chose (`params`)."""

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
    full_samples: int  # what full data would forward in the same epochs
    steps: int
    peak_rss_mb: float | None
    history: list[dict] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    telemetry: dict = field(default_factory=dict)

    @property
    def samples_frac(self) -> float:
        return self.samples / self.full_samples if self.full_samples else math.nan

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------ measurements


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux: VmHWM) so the next reading covers one run only."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"VmHWM:\s+(\d+)\s+kB", f.read())
        if m:
            return int(m.group(1)) / 1024
    except OSError:
        pass
    # Elsewhere only the process's lifetime peak is known (kB on Linux, bytes on macOS).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


@contextlib.contextmanager
def _seeded(seed: int):
    """fastai's `set_seed(seed, reproducible=True)` for the duration of one run; the caller's random,
    numpy and torch generators and cuDNN flags are put back afterwards."""
    from fastai.torch_core import set_seed

    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if cuda else None,
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    set_seed(seed, reproducible=True)
    try:
        yield
    finally:
        py, np_state, cpu, gpu, det, bench = states
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu)
        if gpu is not None:
            torch.cuda.set_rng_state_all(gpu)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = det, bench


@contextlib.contextmanager
def _num_threads(n: int | None):
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------ runner


def _fit_one(task, recipe: Recipe, ctx: RunContext, device: torch.device) -> RunResult:
    from fastai.callback.progress import ProgressCallback
    from fastai.callback.schedule import fit_one_cycle  # noqa: F401  (adds Learner.fit_one_cycle)
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy

    from ..callback import telemetry_of
    from ..datasets import small_model

    gc.collect()  # the previous run's Learner sits in reference cycles: free it before measuring this one
    with _seeded(ctx.seed):
        dls = task.dataloaders(bs=ctx.bs, seed=ctx.seed, device=device)
        model = small_model(task)
        counter = SampleCounter()
        learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy,
                        cbs=[counter, *recipe.make_callbacks(ctx)])
        learn.remove_cbs([cb for cb in learn.cbs if isinstance(cb, ProgressCallback)])
        full_epoch = len(dls.train) * ctx.bs if dls.train.drop_last else dls.train.n
        per_run_peak = _reset_peak_rss()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        with learn.no_logging():
            learn.fit_one_cycle(ctx.epochs, ctx.lr)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    names = list(learn.recorder.metric_names[1:-1])  # drop "epoch" and "time"
    history = [{"epoch": i, **dict(zip(names, map(float, vals)))} for i, vals in enumerate(learn.recorder.values)]
    accs = [h["accuracy"] for h in history]
    params = dict(ctx.notes)
    if not per_run_peak:
        params["peak_rss_scope"] = "process"
    if device.type == "cuda":
        params["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return RunResult(recipe=recipe.name, seed=ctx.seed, task=task.name, epochs=ctx.epochs, bs=ctx.bs, lr=ctx.lr,
                     accuracy=accs[-1], best_accuracy=max(accs), wall_s=wall, cpu_s=cpu, samples=counter.forwarded,
                     full_samples=full_epoch * ctx.epochs, steps=counter.steps, peak_rss_mb=_peak_rss_mb(),
                     history=history, params=params, telemetry=telemetry_of(learn).to_dict())


def _progress_line(i: int, n: int, r: RunResult) -> str:
    return (f"[{i}/{n}] {r.recipe} seed={r.seed}: acc {r.accuracy:.3f}, {r.samples_frac:.0%} samples, "
            f"{r.wall_s:.1f} s")


def run(task="mnist1d", recipes: Iterable[str | Recipe] = DEFAULT_RECIPES, seeds: Sequence[int] = (0,),
        epochs: int = 10, bs: int = 128, lr: float = 1e-2, *, task_kwargs: Mapping[str, Any] | None = None,
        device=None, options: Mapping[str, Any] | None = None, threads: int | None = None,
        progress: Callable[[str], None] | None = print) -> list[RunResult]:
    """Train `small_model(task)` with `fit_one_cycle(epochs, lr)` under each recipe and seed.

    `task` is a name from `effilab.datasets.TASKS` (loaded once with `task_kwargs`) or a `TaskData`.
    Runs go seed by seed; within a seed, a recipe that reads another (random-prune reads infobatch)
    runs after it. Each run is seeded with fastai's `set_seed(seed, reproducible=True)` (the caller's
    RNG states are restored afterwards), so the same seed and recipe give the same sample counts and,
    on CPU, the same accuracy. `options` reach the recipes' factories (e.g. `fraction`); `threads` sets
    torch's CPU threads for the duration. Returns the results in the order they ran.

    >>> results = run("mnist1d", ["baseline", "infobatch"], seeds=[0, 1], epochs=8)  # doctest: +SKIP
    >>> print(format_table(summarize(results)))  # doctest: +SKIP
    """
    from ..datasets import TaskData, get_task

    recipe_objs = [get_recipe(r) for r in recipes]
    names = [r.name for r in recipe_objs]
    if len(set(names)) != len(names):
        raise ValueError(f"each recipe may appear once, got {names}")
    if not recipe_objs or not seeds:
        raise ValueError("need at least one recipe and one seed")
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if not isinstance(task, TaskData):
        task = get_task(task, **dict(task_kwargs or {}))
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    ordered = run_order(recipe_objs)
    total = len(ordered) * len(seeds)
    results: list[RunResult] = []
    with _num_threads(threads):
        for seed in seeds:
            peers: dict[str, RunResult] = {}
            for recipe in ordered:
                ctx = RunContext(task=task, seed=int(seed), epochs=epochs, bs=bs, lr=lr, n_train=len(task.train),
                                 peers=dict(peers), options=dict(options or {}))
                result = _fit_one(task, recipe, ctx, device)
                peers[recipe.name] = result
                results.append(result)
                if progress is not None:
                    progress(_progress_line(len(results), total, result))
    return results


# ------------------------------------------------------------------------------------- aggregation


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def summarize(results: Iterable[RunResult], reference: str = "baseline") -> list[dict]:
    """Per recipe (in first-seen order): mean and std over seeds, and samples and wall-clock as a
    fraction of the `reference` recipe's means (samples: of the full-data count when it is absent)."""
    by_recipe: dict[str, list[RunResult]] = {}
    for r in results:
        by_recipe.setdefault(r.recipe, []).append(r)
    rows = []
    for name, rs in by_recipe.items():
        acc, acc_std = _mean_std([r.accuracy for r in rs])
        best, best_std = _mean_std([r.best_accuracy for r in rs])
        wall, wall_std = _mean_std([r.wall_s for r in rs])
        cpu, cpu_std = _mean_std([r.cpu_s for r in rs])
        rows.append({
            "recipe": name, "n_runs": len(rs), "seeds": [r.seed for r in rs],
            "accuracy_mean": acc, "accuracy_std": acc_std, "best_accuracy_mean": best, "best_accuracy_std": best_std,
            "wall_s_mean": wall, "wall_s_std": wall_std, "cpu_s_mean": cpu, "cpu_s_std": cpu_std,
            "samples_mean": statistics.fmean(r.samples for r in rs),
            "full_samples_mean": statistics.fmean(r.full_samples for r in rs),
            "steps_mean": statistics.fmean(r.steps for r in rs),
            "peak_rss_mb_max": max((r.peak_rss_mb for r in rs if r.peak_rss_mb is not None), default=None),
        })
    ref = next((row for row in rows if row["recipe"] == reference), None)
    for row in rows:
        row["samples_vs"] = reference if ref else "full data"
        row["samples_frac"] = row["samples_mean"] / (ref["samples_mean"] if ref else row["full_samples_mean"])
        row["wall_frac"] = row["wall_s_mean"] / ref["wall_s_mean"] if ref else None
        row["cpu_frac"] = row["cpu_s_mean"] / ref["cpu_s_mean"] if ref else None
    return rows


def format_table(summary: list[dict]) -> str:
    """A markdown table: recipe | accuracy | samples forwarded | wall-clock | CPU time | steps."""
    vs = summary[0]["samples_vs"] if summary else "baseline"
    time_vs = vs if vs != "full data" else "baseline"
    header = ["recipe", "accuracy % (mean ± std)", f"samples forwarded (% of {vs})",
              f"wall-clock s (% of {time_vs})", f"CPU s (% of {time_vs})", "steps"]
    pct = lambda frac: "—" if frac is None else f"{frac:.0%}"
    lines = []
    for row in summary:
        lines.append([
            row["recipe"],
            f"{100 * row['accuracy_mean']:.2f} ± {100 * row['accuracy_std']:.2f}",
            f"{round(row['samples_mean']):,} ({row['samples_frac']:.1%})",
            f"{row['wall_s_mean']:.1f} ± {row['wall_s_std']:.1f} ({pct(row['wall_frac'])})",
            f"{row['cpu_s_mean']:.1f} ± {row['cpu_s_std']:.1f} ({pct(row['cpu_frac'])})",
            f"{round(row['steps_mean']):,}",
        ])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [fmt(line) for line in lines]
    return "\n".join(out)
