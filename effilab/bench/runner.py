"""The side-by-side runner: the same model on the same data under several recipes and seeds.

`run(...)` trains one model per (recipe, seed) and returns a `Campaign`: the `RunResult`s, the runs
that failed, a per-recipe summary (`summarize`) and its table (`format_table`). Given an output folder
it rewrites `results.json` after every run and writes `report.html` at the end (also after Ctrl-C or a
failed run), and `resume=True` continues a campaign with the runs it lacks. The command line
(`python -m effilab bench`) is a thin shell over this.
"""

from __future__ import annotations

import contextlib
import gc
import math
import platform
import random
import re
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastai.callback.core import Callback, CancelFitException

from ..callback import EffilabCallback
from . import store as S
from .recipes import DEFAULT_RECIPES, Recipe, RunContext, get_recipe, resolve_campaign, run_order
from .tasks import MODELS, TaskError, load_task

__all__ = ["Campaign", "CampaignInterrupted", "RunFailure", "RunResult", "SampleCounter", "StopAtAccuracy",
           "format_table", "make_model", "run", "summarize", "table_rows"]


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


class StopAtAccuracy(Callback):
    """Ends the fit after the first epoch whose validation accuracy reaches `target` (time-to-accuracy),
    noting when: the epoch, the host clock and the training samples forwarded so far (`counter`)."""

    order = 200  # after every callback's after_epoch (the Recorder's log, telemetry writers)

    def __init__(self, target: float, counter: SampleCounter | None = None, metric: str = "accuracy"):
        self.target, self.counter, self.metric = target, counter, metric
        self.reached: dict | None = None

    def before_fit(self):
        self.reached = None

    def after_epoch(self):
        if self.reached is not None or hasattr(self.learn, "lr_finder"):
            return
        rec = self.learn.recorder
        value = dict(zip(rec.metric_names[1:-1], rec.values[-1])).get(self.metric) if rec.values else None
        if value is not None and float(value) >= self.target:
            self.reached = {"epoch": self.learn.epoch, "clock": time.perf_counter(), "value": float(value),
                            "samples": self.counter.forwarded if self.counter is not None else None}
            raise CancelFitException


class _EpochHook(Callback):
    order = 190  # before StopAtAccuracy, which may end the fit in the same event

    def __init__(self, on_epoch: Callable[[int], None]):
        self.on_epoch = on_epoch

    def after_epoch(self):
        self.on_epoch(self.learn.epoch + 1)


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
    data would forward in `epochs` epochs. `peak_mem_mb` is the CUDA allocator's peak on a GPU, the
    process's peak RSS on a CPU. With a target accuracy, `time_to_target_s` (wall-clock from the
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

    def __post_init__(self):
        if self.backpropagated is None:
            self.backpropagated = self.samples
        if self.epochs_run is None:
            self.epochs_run = len(self.history) or self.epochs
        if self.peak_mem_mb is None:
            self.peak_mem_mb = self.peak_rss_mb
        if self.throughput is None and self.wall_s:
            self.throughput = self.samples / self.wall_s

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


class CampaignInterrupted(KeyboardInterrupt):
    """Ctrl-C during `run`: the finished runs are saved (with an output folder) and in `.campaign`."""

    def __init__(self, campaign: Campaign):
        super().__init__("campaign interrupted")
        self.campaign = campaign


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


def _backpropagated(telemetry: Mapping) -> int | None:
    """Samples whose loss was backpropagated, as a technique reports them (any source, stream
    "samples": the last `backpropagated_total`, else the sum of `backpropagated`); None if none does.
    With several reporting sources, the smallest count (each one only removes samples)."""
    found = None
    for streams in telemetry.get("records", {}).values():
        recs = streams.get("samples", [])
        totals = [r["backpropagated_total"] for r in recs if "backpropagated_total" in r]
        parts = [r["backpropagated"] for r in recs if "backpropagated" in r]
        value = totals[-1] if totals else sum(parts) if parts else None
        if value is not None:
            found = int(value) if found is None else min(found, int(value))
    return found


def _forwarded(telemetry: Mapping) -> int | None:
    """Samples forwarded as techniques report them (stream "samples": the last `forwarded_total`), the
    largest over sources: a technique that forwards some samples twice or before the Learner's own
    forward (Selective Backprop's selection pass) counts what the Learner's counter cannot see."""
    totals = [recs[-1]["forwarded_total"] for streams in telemetry.get("records", {}).values()
              if (recs := [r for r in streams.get("samples", []) if "forwarded_total" in r])]
    return max(totals) if totals else None


def _cuda_peak_from_telemetry(telemetry: Mapping) -> float | None:
    # SystemMonitor resets CUDA's peak statistic at each epoch: its per-epoch peaks cover what ours lost.
    recs = telemetry.get("records", {}).get("system", {}).get("epoch", [])
    peaks = [r["cuda_peak_mb"] for r in recs if r.get("cuda_peak_mb") is not None]
    return max(peaks) if peaks else None


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


def _cnn_needs_images(task) -> str:
    return (f"model 'cnn' needs image inputs (channels, height, width); task {task.name!r} has inputs of "
            f"shape {tuple(task.input_shape)}: use --model mlp or small")


def make_model(task, model: str = "small", width: int | None = None) -> torch.nn.Module:
    """`small`: `effilab.datasets.small_model(task, width)`; `mlp`: its MLP on flattened inputs (images
    too); `cnn`: its CNN (image tasks only)."""
    from types import SimpleNamespace

    from ..datasets import small_model

    shape = tuple(task.input_shape)
    if model == "small":
        return small_model(task, width)
    if model == "mlp":
        flat = SimpleNamespace(input_shape=(int(np.prod(shape)),), n_classes=task.n_classes)
        return small_model(flat, width)
    if model == "cnn":
        if len(shape) != 3:
            raise ValueError(_cnn_needs_images(task))
        return small_model(task, width)
    raise ValueError(f"unknown model {model!r}; models: {', '.join(MODELS)}")


# ------------------------------------------------------------------------------------------ one run


def _fit_one(task, recipe: Recipe, ctx: RunContext, device: torch.device, model: str, width: int | None,
             target_acc: float | None, on_epoch: Callable[[int], None] | None) -> RunResult:
    from fastai.callback.progress import ProgressCallback
    from fastai.callback.schedule import fit_one_cycle  # noqa: F401  (adds Learner.fit_one_cycle)
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy

    from ..callback import telemetry_of

    gc.collect()  # the previous run's Learner sits in reference cycles: free it before measuring this one
    with _seeded(ctx.seed):
        dls = task.dataloaders(bs=ctx.bs, seed=ctx.seed, device=device)
        net = make_model(task, model, width)
        counter = SampleCounter()
        extra: list[Callback] = [] if on_epoch is None else [_EpochHook(on_epoch)]
        stopper = StopAtAccuracy(target_acc, counter) if target_acc is not None else None
        if stopper is not None:
            extra.append(stopper)
        learn = Learner(dls, net, loss_func=CrossEntropyLossFlat(), metrics=accuracy,
                        cbs=[counter, *recipe.make_callbacks(ctx), *extra])
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
    history = [{"epoch": i, **dict(zip(names, map(float, vals)))}
               for i, vals in enumerate(learn.recorder.values)]
    if not history:
        raise RuntimeError("the fit ended before its first epoch did")
    accs = [h["accuracy"] for h in history]
    params = dict(ctx.notes)
    if not per_run_peak:
        params["peak_rss_scope"] = "process"
    tel = telemetry_of(learn).to_dict()
    peak_rss = _peak_rss_mb()
    peak_mem, kind = peak_rss, "rss"
    if device.type == "cuda":
        peaks = [torch.cuda.max_memory_allocated(device) / 2**20, _cuda_peak_from_telemetry(tel)]
        peak_mem, kind = max(p for p in peaks if p is not None), "cuda"
    reached = stopper.reached if stopper is not None else None
    forwarded = max(counter.forwarded, _forwarded(tel) or 0)
    return RunResult(
        recipe=recipe.name, seed=ctx.seed, task=task.name, epochs=ctx.epochs, bs=ctx.bs, lr=ctx.lr,
        accuracy=accs[-1], best_accuracy=max(accs), wall_s=wall, cpu_s=cpu, samples=forwarded,
        full_samples=full_epoch * ctx.epochs, steps=counter.steps, peak_rss_mb=peak_rss, history=history,
        params=params, telemetry=tel, backpropagated=_backpropagated(tel), epochs_run=len(history),
        peak_mem_mb=peak_mem, peak_mem_kind=kind, throughput=forwarded / wall if wall > 0 else None,
        target_acc=target_acc, time_to_target_s=None if reached is None else reached["clock"] - start,
        samples_to_target=None if reached is None else reached["samples"],
        epoch_to_target=None if reached is None else reached["epoch"], recipe_text=recipe.text,
        device=device.type)


# ------------------------------------------------------------------------------------------ progress


def _fmt_clock(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


def _run_line(i: int, n: int, r: RunResult) -> str:
    line = (f"[{i}/{n}] {r.recipe} seed={r.seed}: acc {r.accuracy:.3f} (best {r.best_accuracy:.3f}), "
            f"{r.samples_frac:.0%} samples, {r.steps} steps, {r.wall_s:.1f} s ({r.cpu_s:.1f} s CPU)")
    if r.target_acc is not None:
        if r.time_to_target_s is None:
            line += f", {r.target_acc:.0%} not reached"
        else:
            line += (f", {r.target_acc:.0%} reached at epoch {r.epoch_to_target + 1} in "
                     f"{r.time_to_target_s:.1f} s")
    return line


def _failure_line(i: int, n: int, f: RunFailure) -> str:
    return f"[{i}/{n}] {f.recipe} seed={f.seed}: FAILED after {f.wall_s:.1f} s: {f.message}"


class _Progress:
    """One line per finished run; plus, on a terminal, a bar on stderr redrawn after each epoch
    (in a notebook, an HTML bar). `mode`: "auto", "bar", "lines", "notebook", None, or a callable
    that receives the lines."""

    def __init__(self, mode, total: int, done: int, epochs: int):
        self.total, self.done, self.epochs = total, done, epochs
        self.sink: Callable[[str], None] | None = None
        self.bar = self.nb = False
        if callable(mode):
            self.sink = mode
        elif mode not in (None, False, "none"):
            self.sink = lambda line: print(line, flush=True)
            if mode == "auto":
                mode = "notebook" if _in_kernel() else "bar" if _isatty(sys.stderr) else "lines"
            self.bar, self.nb = mode == "bar", mode == "notebook"
            if mode not in ("bar", "lines", "notebook"):
                raise ValueError(f"progress must be 'auto', 'bar', 'lines', 'notebook', None or a callable, "
                                 f"got {mode!r}")
        self.start = time.perf_counter()
        self.label, self.epoch, self.handle, self.ran = "", 0, None, 0

    def _eta(self) -> str:
        done_epochs = self.ran * self.epochs + self.epoch
        left = (self.total - self.done) * self.epochs - self.epoch
        elapsed = time.perf_counter() - self.start
        eta = _fmt_clock(elapsed / done_epochs * left) if done_epochs else "?"
        return f"{_fmt_clock(elapsed)} < {eta}"

    def _draw(self):
        frac = (self.done + self.epoch / max(self.epochs, 1)) / max(self.total, 1)
        text = f"{self.done}/{self.total} runs | {self.label} epoch {self.epoch}/{self.epochs} | "
        text += self._eta()
        if self.bar:
            width, fill = 24, "█" if _can_encode(sys.stderr, "█") else "#"
            filled = int(round(width * frac))
            sys.stderr.write(f"\r\033[K|{fill * filled}{'-' * (width - filled)}| {text}")
            sys.stderr.flush()
        elif self.nb:
            from IPython.display import HTML, display

            html = HTML(f"<div class='effilab-bench-progress'><progress value='{frac:.4f}' max='1' "
                        f"style='width:300px'></progress> {text}</div>")
            if self.handle is None:
                self.handle = display(html, display_id=True)
            else:
                self.handle.update(html)

    def _clear(self):
        if self.bar:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()

    def start_run(self, recipe: str, seed: int):
        self.label, self.epoch = f"{recipe} seed={seed}", 0
        self._draw()

    def on_epoch(self, epoch: int):
        self.epoch = epoch
        self._draw()

    def finish_run(self, line: str):
        self.done, self.ran, self.epoch = self.done + 1, self.ran + 1, 0
        self._clear()
        if self.sink is not None:
            self.sink(line)

    def close(self):
        self._clear()


def _in_kernel() -> bool:
    ip = sys.modules.get("IPython")
    shell = ip.get_ipython() if ip is not None and hasattr(ip, "get_ipython") else None
    return shell is not None and hasattr(shell, "kernel")


def _can_encode(stream, text: str) -> bool:
    try:
        text.encode(getattr(stream, "encoding", None) or "ascii")
        return True
    except (UnicodeEncodeError, LookupError):
        return False


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# ------------------------------------------------------------------------------------------ campaign


def _env(threads: int | None, device: torch.device) -> dict:
    import fastai

    from .. import __version__

    env = {"effilab": __version__, "torch": torch.__version__, "fastai": fastai.__version__,
           "python": platform.python_version(), "platform": platform.platform(), "threads": threads,
           "cpu_count": _cpu_count()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _cpu_count() -> int | None:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


class Campaign(Sequence):
    """What `run` returns: the finished runs (iterate, index, `len`), `failures`, `summary`, `table`,
    the `config` that produced them, `figures()`, `show()` (in a notebook) and, with an output
    folder, `results_path` and `report_path`."""

    def __init__(self, config: dict, results: Iterable[RunResult] = (), failures: Iterable[RunFailure] = (),
                 out=None, env: dict | None = None, status: str = "running", total_s: float = 0.0):
        self.config, self.env = config, env or {}
        self.results, self.failures = list(results), list(failures)
        self.out = None if out is None else Path(out)
        self.status, self.total_s = status, total_s

    # a sequence of RunResult, like the list earlier versions returned
    def __getitem__(self, i):
        return self.results[i]

    def __len__(self) -> int:
        return len(self.results)

    @property
    def recipes(self) -> list[str]:
        return [r["name"] for r in self.config.get("recipes", [])]

    @property
    def summary(self) -> list[dict]:
        return summarize(self.results, failures=self.failures, order=self.recipes,
                         target_acc=self.config.get("target_acc"))

    @property
    def table(self) -> str:
        return format_table(self.summary)

    @property
    def results_path(self) -> Path | None:
        return None if self.out is None else self.out / S.RESULTS

    @property
    def report_path(self) -> Path | None:
        return None if self.out is None else self.out / S.REPORT

    def to_dict(self) -> dict:
        from .. import __version__

        summary = self.summary
        return {"format": S.FORMAT, "effilab_version": __version__, "status": self.status,
                "config": self.config, "env": self.env, "total_s": self.total_s,
                "runs": [r.to_dict() for r in self.results], "failures": [f.to_dict() for f in self.failures],
                "summary": summary, "table": format_table(summary)}

    @classmethod
    def from_dict(cls, data: Mapping, out=None) -> Campaign:
        runs = [RunResult.from_dict(r) for r in data.get("runs", []) if r.get("status", "ok") == "ok"]
        failures = [RunFailure.from_dict(f) for f in data.get("failures", [])]
        return cls(dict(data["config"]), runs, failures, out, dict(data.get("env", {})),
                   data.get("status", ""), data.get("total_s", 0.0))

    @classmethod
    def load(cls, out) -> Campaign:
        """The campaign saved in folder `out` (its `results.json`)."""
        return cls.from_dict(S.load_results(out), out)

    def save(self) -> None:
        if self.out is not None:
            S.write_json_atomic(self.results_path, self.to_dict())

    def figures(self) -> dict:
        """The report's plotly figures by name (see `effilab.bench.report.figures`)."""
        from .report import figures

        return figures(self.to_dict())

    def save_report(self, path=None) -> Path:
        from .report import write_report

        path = Path(path) if path is not None else self.report_path
        if path is None:
            raise ValueError("no output folder: pass a path")
        return write_report(self.to_dict(), path)

    def show(self) -> None:
        """In a notebook: the table and the figures (plotly.js from its CDN: a light notebook)."""
        from IPython.display import HTML, display

        from ..viz.figures import figure_bundle
        from .report import html_table

        display(HTML(html_table(self.to_dict())))
        for name, fig in self.figures().items():
            display(figure_bundle(fig, text=f"effilab bench: {name}"), raw=True)

    def _repr_html_(self) -> str:
        from .report import html_table

        return html_table(self.to_dict())

    def __repr__(self) -> str:
        return (f"Campaign({self.config.get('task')!r}, recipes={self.recipes}, runs={len(self.results)}, "
                f"failures={len(self.failures)}, status={self.status!r})")


def run(task="mnist1d", recipes: Iterable[str | Recipe | Mapping] = DEFAULT_RECIPES,
        seeds: Sequence[int] = (0,), epochs: int = 10, bs: int = 128, lr: float = 1e-2, *,
        task_kwargs: Mapping[str, Any] | None = None, model: str = "small", width: int | None = None,
        target_acc: float | None = None, device=None, options: Mapping[str, Any] | None = None,
        threads: int | None = None, progress: Any = "auto", out=None, resume: bool = False,
        overwrite: bool = False, report: bool = True) -> Campaign:
    """Train `make_model(task, model, width)` with `fit_one_cycle(epochs, lr)` under each recipe and seed.

    `task`: a task name (`effilab.bench.tasks`: mnist1d, digits, fashion-mnist, mnist, cifar10, or
    "folder:PATH"; loaded with `task_kwargs`) or a `TaskData`. `recipes`: recipe strings
    ("infobatch(ratio=0.3)+dashboard"), `Recipe`s or {name, components} mappings. Runs go seed by seed;
    within a seed, a recipe that reads another (random pruning matched to InfoBatch) runs after it.
    Each run is seeded with fastai's `set_seed(seed, reproducible=True)` (the caller's RNG states are
    restored afterwards): the same seed and recipe give the same sample counts and, on CPU, the same
    accuracy. `target_acc`: stop each fit after the epoch whose validation accuracy reaches it and
    record the time and samples it took. `options` reach the recipes (`fraction`: random pruning's
    when nothing is matched); `threads` sets torch's CPU threads for the duration.

    A run that raises is recorded as a `RunFailure` (error and traceback) and the campaign goes on.
    With `out` (a folder), `results.json` is rewritten after every run and `report.html` written at
    the end, also after a failure or Ctrl-C (then `CampaignInterrupted` is raised, holding the
    campaign); an `out` that holds results is refused unless `resume` (continue: only the missing or
    failed runs are run; the configuration must be the same) or `overwrite`.

    >>> c = run("mnist1d", ["baseline", "infobatch(ratio=0.3)"], seeds=[0, 1], epochs=8)  # doctest: +SKIP
    >>> print(c.table)  # doctest: +SKIP
    """
    from ..datasets import TaskData

    if not seeds:
        raise ValueError("need at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"each seed may appear once, got {list(seeds)}")
    if epochs < 1 or bs < 1 or lr <= 0:
        raise ValueError(f"epochs and bs must be positive integers and lr positive, got {epochs}, {bs}, {lr}")
    if target_acc is not None and not 0.0 < target_acc <= 1.0:
        raise ValueError(f"target_acc is a validation accuracy in (0, 1], got {target_acc}")
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; models: {', '.join(MODELS)}")
    recipe_objs = resolve_campaign(get_recipe(r) for r in recipes)
    if not recipe_objs:
        raise ValueError("need at least one recipe")
    options = dict(options or {})
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(task, TaskData):
        task_spec, kwargs = task.name, None
    else:
        task_spec, kwargs = str(task), dict(task_kwargs or {})
    config = {"task": task_spec, "task_kwargs": kwargs, "recipes": [r.to_config() for r in recipe_objs],
              "seeds": [int(s) for s in seeds], "epochs": int(epochs), "bs": int(bs), "lr": float(lr),
              "model": model, "width": width, "target_acc": target_acc,
              "fraction": options.get("fraction"), "device": device.type}

    stored = None
    if out is not None:
        out = Path(out)
        stored = S.check_out_dir(out, resume=resume, overwrite=overwrite)
        if stored is not None:
            diff = S.config_diff(stored["config"], config)
            if diff:
                raise S.ConfigMismatch(f"cannot resume {out}: its campaign was configured otherwise ("
                                       + "; ".join(diff) + "). Resume with the same settings, or start a new "
                                       "campaign in another folder")
    if not isinstance(task, TaskData):
        task = load_task(task_spec, **kwargs)  # before the folder is made: missing data leaves nothing behind
    if model == "cnn" and len(task.input_shape) != 3:  # fails now rather than in every run
        raise TaskError(_cnn_needs_images(task))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)

    campaign = Campaign(config, out=out, env=_env(threads, device))
    if stored is not None:
        done = Campaign.from_dict(stored)
        campaign.results = done.results  # failed runs are tried again
        campaign.total_s = done.total_s
    finished = {(r.recipe, r.seed) for r in campaign.results}
    plan = [(int(seed), recipe) for seed in seeds for recipe in run_order(recipe_objs)]
    todo = [(seed, recipe) for seed, recipe in plan if (recipe.name, seed) not in finished]
    bar = _Progress(progress, len(plan), len(plan) - len(todo), epochs)
    if bar.sink is not None:
        target = "" if target_acc is None else f", stop at {target_acc:.0%} accuracy"
        bar.sink(f"effilab bench: {task!r}; recipes {', '.join(r.name for r in recipe_objs)}; seeds "
                 f"{' '.join(map(str, seeds))}; {epochs} epochs{target}, bs {bs}, lr {lr}, model {model}, "
                 f"{device.type}" + ("" if out is None else f"; results in {out}"))
        if stored is not None:
            bar.sink(f"resuming {out}: {len(plan) - len(todo)} of {len(plan)} runs done, {len(todo)} to go")
    started = time.perf_counter()
    previous_s = campaign.total_s
    interrupted = False
    try:
        with _num_threads(threads):
            for seed, recipe in todo:
                peers = {r.recipe: r for r in campaign.results if r.seed == seed}
                ctx = RunContext(task=task, seed=seed, epochs=epochs, bs=bs, lr=lr, n_train=len(task.train),
                                 peers=peers, options=options)
                bar.start_run(recipe.name, seed)
                t0 = time.perf_counter()
                try:
                    result = _fit_one(task, recipe, ctx, device, model, width, target_acc, bar.on_epoch)
                except Exception as e:  # the campaign goes on; KeyboardInterrupt ends it below
                    failure = RunFailure(recipe.name, seed, task.name, type(e).__name__, str(e),
                                         traceback.format_exc(), time.perf_counter() - t0)
                    campaign.failures.append(failure)
                    bar.finish_run(_failure_line(bar.done + 1, bar.total, failure))
                else:
                    campaign.results.append(result)
                    bar.finish_run(_run_line(bar.done + 1, bar.total, result))
                campaign.total_s = previous_s + time.perf_counter() - started
                campaign.save()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        campaign.total_s = previous_s + time.perf_counter() - started
        campaign.status = "interrupted" if interrupted else "failed" if campaign.failures else "complete"
        if out is not None:
            campaign.save()
            if report:
                campaign.save_report()
    if interrupted:
        raise CampaignInterrupted(campaign)
    return campaign


# ------------------------------------------------------------------------------------- aggregation


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def _ratio(row: dict, ref: dict | None, key: str) -> float | None:
    """`row[key] / ref[key]`, or None when either is missing (no reference, a target never reached)."""
    if ref is None or row.get(key) is None or not ref.get(key):
        return None
    return row[key] / ref[key]


def _reference(rows: list[dict], reference: str) -> dict | None:
    return next((row for row in rows if row["recipe"] == reference and row["n_runs"]), None)


def summarize(results: Iterable[RunResult], reference: str = "baseline", *,
              failures: Iterable[RunFailure] = (), order: Sequence[str] | None = None,
              target_acc: float | None = None) -> list[dict]:
    """Per recipe (in `order`, else first-seen): counts of runs and failures, mean and std over seeds,
    and costs as fractions of the `reference` recipe's means (samples: of full data when it is absent).
    A recipe whose runs all failed has a row with `n_runs` 0 and no measurements."""
    results, failures = list(results), list(failures)
    names = list(order or [])
    for r in [*results, *failures]:
        if r.recipe not in names:
            names.append(r.recipe)
    if target_acc is None:
        target_acc = next((r.target_acc for r in results if r.target_acc is not None), None)
    rows = []
    for name in names:
        rs = [r for r in results if r.recipe == name]
        fs = [f for f in failures if f.recipe == name]
        row: dict[str, Any] = {"recipe": name, "n_runs": len(rs), "n_failed": len(fs),
                               "seeds": [r.seed for r in rs], "failed_seeds": [f.seed for f in fs],
                               "target_acc": target_acc}
        rows.append(row)
        if not rs:
            continue
        for key in ("accuracy", "best_accuracy", "wall_s", "cpu_s", "samples", "backpropagated", "steps",
                    "throughput", "epochs_run"):
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([float(getattr(r, key) or 0.0) for r in rs])
        row["full_samples_mean"] = statistics.fmean(r.full_samples for r in rs)
        row["peak_rss_mb_max"] = max((r.peak_rss_mb for r in rs if r.peak_rss_mb is not None), default=None)
        row["peak_mem_mb_max"] = max((r.peak_mem_mb for r in rs if r.peak_mem_mb is not None), default=None)
        row["peak_mem_kind"] = rs[0].peak_mem_kind
        if target_acc is not None:
            hit = [r for r in rs if r.time_to_target_s is not None]
            row["reached"] = len(hit)
            row["time_to_target_mean"], row["time_to_target_std"] = (
                _mean_std([r.time_to_target_s for r in hit]) if hit else (None, None))
            row["samples_to_target_mean"] = (statistics.fmean(r.samples_to_target for r in hit)
                                             if hit else None)
    ref = _reference(rows, reference)
    for row in rows:
        row["reference"] = reference if ref else None
        row["samples_vs"] = reference if ref else "full data"
        if not row["n_runs"]:
            continue
        full = row["full_samples_mean"]
        row["samples_frac"] = _ratio(row, ref, "samples_mean") if ref else row["samples_mean"] / full
        row["backpropagated_frac"] = (_ratio(row, ref, "backpropagated_mean") if ref
                                      else row["backpropagated_mean"] / full)
        row["steps_frac"] = _ratio(row, ref, "steps_mean")
        row["wall_frac"] = _ratio(row, ref, "wall_s_mean")
        row["cpu_frac"] = _ratio(row, ref, "cpu_s_mean")
        row["accuracy_delta"] = row["accuracy_mean"] - ref["accuracy_mean"] if ref else None
        if target_acc is not None:
            row["time_to_target_frac"] = _ratio(row, ref, "time_to_target_mean")
            row["samples_to_target_frac"] = _ratio(row, ref, "samples_to_target_mean")
    return rows


def _pct(frac: float | None) -> str:
    return "—" if frac is None else f"{frac:.0%}"


def table_rows(summary: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The summary table's header and rows as text cells (the terminal table and the report's)."""
    if not summary:
        return ["recipe"], []
    ref = summary[0].get("reference")
    vs = ref or "full data"
    tvs = ref or "—"
    target = summary[0].get("target_acc")
    # Backpropagated samples get a column only where a technique reported fewer than were forwarded.
    show_bwd = any(r["n_runs"] and round(r["backpropagated_mean"]) != round(r["samples_mean"])
                   for r in summary)
    kind = next((r["peak_mem_kind"] for r in summary if r["n_runs"]), "rss")
    header = ["recipe", "runs", "accuracy % (mean ± std)", "best %", f"Δ acc (pts vs {tvs})",
              f"samples fwd (% of {vs})"]
    if show_bwd:
        header.append(f"samples bwd (% of {vs})")
    header += ["steps", f"wall-clock s (% of {tvs})", f"CPU s (% of {tvs})", "samples/s",
               f"peak MB ({'CUDA' if kind == 'cuda' else 'RSS'})"]
    if target is not None:
        header += [f"time to {100 * target:g}% s (% of {tvs})", f"samples to {100 * target:g}%"]
    rows = []
    for r in summary:
        n = r["n_runs"] + r["n_failed"]
        runs = str(n) if not r["n_failed"] else f"{r['n_runs']}/{n} ({r['n_failed']} failed)"
        if not r["n_runs"]:
            rows.append([r["recipe"], runs] + ["—"] * (len(header) - 2))
            continue
        delta = r.get("accuracy_delta")
        cells = [
            r["recipe"], runs,
            f"{100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std']:.2f}",
            f"{100 * r['best_accuracy_mean']:.2f}",
            "—" if delta is None or r["recipe"] == ref else f"{100 * delta:+.2f}",
            f"{round(r['samples_mean']):,} ({r['samples_frac']:.1%})",
        ]
        if show_bwd:
            cells.append(f"{round(r['backpropagated_mean']):,} ({r['backpropagated_frac']:.1%})")
        mem = r.get("peak_mem_mb_max")
        cells += [
            f"{round(r['steps_mean']):,}",
            f"{r['wall_s_mean']:.1f} ± {r['wall_s_std']:.1f} ({_pct(r['wall_frac'])})",
            f"{r['cpu_s_mean']:.1f} ± {r['cpu_s_std']:.1f} ({_pct(r['cpu_frac'])})",
            f"{r['throughput_mean']:,.0f}",
            "—" if mem is None else f"{mem:,.0f}",
        ]
        if target is not None:
            reached = f"{r['reached']}/{r['n_runs']} reached"
            if r.get("time_to_target_mean") is None:
                cells += [f"never ({reached})", "—"]
            else:
                cells += [f"{r['time_to_target_mean']:.1f} ± {r['time_to_target_std']:.1f} "
                          f"({_pct(r.get('time_to_target_frac'))}; {reached})",
                          f"{round(r['samples_to_target_mean']):,}"]
        rows.append(cells)
    return header, rows


def format_table(summary: list[dict]) -> str:
    """The summary as a markdown table: accuracy, what was forwarded, steps, time, speed, memory."""
    header, rows = table_rows(summary)
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [fmt(row) for row in rows]
    return "\n".join(out)
