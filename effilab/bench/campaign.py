"""A campaign: the same model on the same data under several recipes and seeds, end to end.

`run(...)` checks everything it is given, then trains one model per (recipe, seed) (`fit.fit_one`),
stores each finished run at once (`store`: `results.json`, rewritten atomically after every run), and
at the end summarises (`table`) and reports (`report`). It returns a `Campaign`: the `RunResult`s, the
runs that failed, the summary and its table. The command line (`python -m effilab bench`) is a thin
shell over it.

The last stage of the bench: recipes -> run -> stored result -> table/report -> **campaign**. Nothing
that comes after a run (the summary, the table, the report) can keep its result from being written.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import store as S
from .distributed import check_nproc, fit_distributed
from .fit import check_device, fit_one, make_model, num_threads
from .recipes import (
    DEFAULT_RECIPES,
    NothingToMatch,
    Recipe,
    RunContext,
    add_matched_baselines,
    budget_plan,
    check_budget_unit,
    check_budgets,
    check_fits_model,
    check_fits_task,
    get_recipe,
    resolve_campaign,
    run_order,
)
from .store import RunFailure, RunResult
from .table import format_table, html_table, summarize
from .tasks import MODELS, TaskError, load_task, model_needs_images

__all__ = ["Campaign", "CampaignInterrupted", "run"]


# Components that measure a run and change nothing in it. What they cost (telemetry writers, a drawing
# budget, a profiler's trace) is in every run of a campaign or in none, so that differences between the
# runs come from the techniques only. Not `sync_free_recorder`: it replaces fastai's Recorder to save
# host syncs, a technique whose effect is what a comparison measures.
MEASURING = ("dashboard", "system_monitor", "fit_recorder", "profiler")


def same_measuring(recipes: Sequence[Recipe]) -> list[Recipe]:
    """Each recipe with every measuring component (`MEASURING`) that a recipe of the campaign has, added
    with the first such recipe's arguments where it lacks it."""
    found: dict = {}
    for recipe in recipes:
        for spec in recipe.components:
            if spec.key in MEASURING:
                found.setdefault(spec.key, spec)
    out = []
    for recipe in recipes:
        have = {spec.key for spec in recipe.components}
        missing = tuple(spec for key, spec in found.items() if key not in have)
        out.append(replace(recipe, components=recipe.components + missing) if missing else recipe)
    return out


class CampaignInterrupted(KeyboardInterrupt):
    """Ctrl-C during `run`: the finished runs are saved (with an output folder) and in `.campaign`."""

    def __init__(self, campaign: Campaign):
        super().__init__("campaign interrupted")
        self.campaign = campaign


class Campaign(Sequence):
    """What `run` returns: the finished runs (iterate, index, `len`), `failures`, `summary`, `table`,
    the `config` that produced them, `figures()`, `show()` (in a notebook, where it also renders as
    its HTML table) and, with an output folder, `results_path` and `report_path`. `write_errors` lists
    what could not be written (a full disk, a folder that became read-only): the runs are still here."""

    def __init__(self, config: dict, results: Iterable[RunResult] = (), failures: Iterable[RunFailure] = (),
                 out=None, env: dict | None = None, status: str = "running", total_s: float = 0.0,
                 skipped: Iterable[Mapping] = ()):
        self.config, self.env = config, env or {}
        self.results, self.failures = list(results), list(failures)
        self.skipped = [dict(s) for s in skipped]  # budget-matched baselines not run: {recipe, seed, reason}
        self.out = None if out is None else Path(out)
        self.status, self.total_s = status, total_s
        self.write_errors: list[str] = []

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

        data = {"format": S.FORMAT, "effilab_version": __version__, "status": self.status,
                "config": self.config, "env": self.env, "total_s": self.total_s,
                "runs": [r.to_dict() for r in self.results], "failures": [f.to_dict() for f in self.failures],
                "skipped": self.skipped, "summary": [], "table": ""}
        try:  # a view of the runs: an error here must not keep the runs from being written
            data["summary"] = self.summary
            data["table"] = format_table(data["summary"])
        except Exception as e:
            data["summary_error"] = f"{type(e).__name__}: {e}"
        return data

    @classmethod
    def from_dict(cls, data: Mapping, out=None) -> Campaign:
        runs = [RunResult.from_dict(r) for r in data.get("runs", []) if r.get("status", "ok") == "ok"]
        failures = [RunFailure.from_dict(f) for f in data.get("failures", [])]
        return cls(dict(data["config"]), runs, failures, out, dict(data.get("env", {})),
                   data.get("status", ""), data.get("total_s", 0.0), data.get("skipped", []))

    @classmethod
    def load(cls, out) -> Campaign:
        """The campaign saved in folder `out` (its `results.json`)."""
        return cls.from_dict(S.load_results(out), out)

    def save(self) -> None:
        """Write `results.json` (atomically); an `OSError` is raised to the caller."""
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

        display(HTML(self._repr_html_()))
        for name, fig in self.figures().items():
            display(figure_bundle(fig, text=f"effilab bench: {name}"), raw=True)

    def _repr_html_(self) -> str:
        return html_table(self.to_dict())

    def __repr__(self) -> str:
        return (f"Campaign({self.config.get('task')!r}, recipes={self.recipes}, runs={len(self.results)}, "
                f"failures={len(self.failures)}, status={self.status!r})")


# ------------------------------------------------------------------------------------------ progress


def _run_line(i: int, n: int, r: RunResult) -> str:
    line = (f"[{i}/{n}] {r.recipe} seed={r.seed}: acc {r.accuracy:.3f} (best {r.best_accuracy:.3f}), "
            f"{r.samples_frac:.0%} samples, {r.steps} steps, {r.wall_s:.1f} s ({r.cpu_s:.1f} s CPU)")
    budget = (r.params or {}).get("budget")
    if budget:
        of = f" of {budget['matched_to']}" if budget.get("matched_to") else ""
        line += f", on a budget of {budget['amount']:,.4g} {budget['unit']} ({budget['kind']}{of})"
    if r.target_acc is not None:
        if r.time_to_target_s is None:
            line += f", {r.target_acc:.0%} not reached"
        else:
            line += (f", {r.target_acc:.0%} reached at epoch {r.epoch_to_target + 1} in "
                     f"{r.time_to_target_s:.1f} s")
    return line


def _skipped_line(i: int, n: int, s: Mapping) -> str:
    return f"[{i}/{n}] {s['recipe']} seed={s['seed']}: not run: {s['reason']}"


def _failure_line(i: int, n: int, f: RunFailure) -> str:
    return f"[{i}/{n}] {f.recipe} seed={f.seed}: FAILED after {f.wall_s:.1f} s: {f.message}"


def _in_kernel() -> bool:
    ip = sys.modules.get("IPython")
    shell = ip.get_ipython() if ip is not None and hasattr(ip, "get_ipython") else None
    return shell is not None and hasattr(shell, "kernel")


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _Progress:
    """One line per finished run, and a fastprogress bar over all the campaign's epochs (a terminal's on
    stdout, a notebook's HTML one; cleared when the campaign ends). `mode`: "auto", "bar", "lines",
    "notebook", None, or a callable that receives the lines (no bar)."""

    def __init__(self, mode, total: int, done: int, epochs: int):
        self.total, self.done, self.epochs = total, done, epochs
        self.sink: Callable[[str], None] | None = None
        self.pb = None
        self.label, self.mode = "", None
        if callable(mode):
            self.sink = mode
            return
        if mode in (None, False, "none"):
            return
        if mode == "auto":
            mode = "notebook" if _in_kernel() else "bar" if _isatty(sys.stdout) else "lines"
        if mode not in ("bar", "lines", "notebook"):
            raise ValueError(f"progress must be 'auto', 'bar', 'lines', 'notebook', None or a callable, got {mode!r}")
        self.sink = lambda line: print(line, flush=True)
        self.mode = mode

    def begin(self) -> None:
        """Show the bar (after the lines that introduce the campaign)."""
        if self.mode in ("bar", "notebook"):
            from fastprogress.fastprogress import ConsoleProgressBar, NBProgressBar

            bar = NBProgressBar if self.mode == "notebook" else ConsoleProgressBar
            n = max(self.total * self.epochs, 1)
            self.pb = bar(range(n), total=n, leave=False)
            self.pb.update(0)

    def _update(self, epoch: int) -> None:
        if self.pb is not None and self.pb.last_v is not None:
            self.pb.comment = f"{self.done}/{self.total} runs | {self.label} epoch {epoch}/{self.epochs}"
            self.pb.update(min(self.done * self.epochs + epoch, self.pb.total - 1))

    def start_run(self, recipe: str, seed: int) -> None:
        self.label = f"{recipe} seed={seed}"
        self._update(0)

    def on_epoch(self, epoch: int) -> None:
        self._update(epoch)

    def _clear_line(self) -> None:
        # fastprogress's terminal bar is a line without a newline: blank it before printing ours.
        if self.pb is not None and hasattr(self.pb, "max_len") and _isatty(sys.stdout):
            print("\r" + " " * self.pb.max_len + "\r", end="", flush=True)

    def finish_run(self, line: str) -> None:
        self.done += 1
        self._clear_line()
        if self.sink is not None:
            self.sink(line)

    def close(self) -> None:
        if self.pb is not None and self.pb.last_v is not None:
            self.pb.on_iter_end()  # leave=False: the bar is cleared
        self.pb = None


# ------------------------------------------------------------------------------------------ campaign


def _env(threads: int | None, device) -> dict:
    import fastai
    import torch

    from .. import __version__

    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count()
    env = {"effilab": __version__, "torch": torch.__version__, "fastai": fastai.__version__,
           "python": platform.python_version(), "platform": platform.platform(), "threads": threads,
           "cpu_count": cpus}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_settings(seeds, epochs, bs, lr, target_acc, model, threads, width) -> None:
    if not seeds:
        raise ValueError("need at least one seed")
    if not all(_is_int(s) for s in seeds):
        raise ValueError(f"seeds must be integers, got {list(seeds)}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"each seed may appear once, got {list(seeds)}")
    if not (_is_int(epochs) and epochs >= 1 and _is_int(bs) and bs >= 1):
        raise ValueError(f"epochs and bs must be positive integers, got {epochs!r} and {bs!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if target_acc is not None and (isinstance(target_acc, bool) or not isinstance(target_acc, (int, float))
                                   or not 0.0 < target_acc <= 1.0):
        raise ValueError(f"target_acc is a validation accuracy in (0, 1], got {target_acc!r}")
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; models: {', '.join(MODELS)}")
    for name, value in (("threads", threads), ("width", width)):
        if value is not None and not (_is_int(value) and value >= 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_task(task, bs: int, model: str) -> None:
    why = model_needs_images(model, task)
    if why is not None:  # fails now rather than in every run
        raise TaskError(why)
    if len(task.train) < bs:  # drop_last: not one batch, no sample forwarded
        raise TaskError(f"task {task.name!r} has {len(task.train)} training samples, fewer than one batch "
                        f"(bs={bs}): no sample would be trained on. Use more samples (--n-samples) or a "
                        "smaller --bs")
    if len(task.valid) == 0:
        raise TaskError(f"task {task.name!r} has no validation samples: use more samples (--n-samples)")


def _write(campaign: Campaign, what: str, write: Callable[[], Any]) -> None:
    """Run `write`; an error is noted in `campaign.write_errors` and said at once, not raised: the runs
    stay in memory and the campaign goes on."""
    try:
        write()
    except Exception as e:
        message = f"could not write {what}: {type(e).__name__}: {e}"
        if message not in campaign.write_errors:
            campaign.write_errors.append(message)
            print(f"effilab bench: {message}", file=sys.stderr, flush=True)


def run(task="mnist1d", recipes: Iterable[str | Recipe | Mapping] = DEFAULT_RECIPES,
        seeds: Sequence[int] = (0,), epochs: int = 10, bs: int = 128, lr: float = 1e-2, *,
        task_kwargs: Mapping[str, Any] | None = None, model: str = "small", width: int | None = None,
        target_acc: float | None = None, device=None, options: Mapping[str, Any] | None = None,
        threads: int | None = None, progress: Any = "auto", out=None, resume: bool = False,
        overwrite: bool = False, report: bool = True, budget: str | None = None,
        matched: bool = False, nproc: int = 1) -> Campaign:
    """Train `make_model(task, model, width)` with `fit_one_cycle(epochs, lr)` under each recipe and seed.

    `task`: a task name (`effilab.bench.tasks`: mnist1d, digits, fashion-mnist, mnist, cifar10,
    pysource, or "folder:PATH"; loaded with `task_kwargs`) or a `TaskData`. `recipes`: recipe strings
    ("infobatch(ratio=0.3)+dashboard"), `Recipe`s or {name, components} mappings. Runs go seed by seed;
    within a seed, a recipe that reads another (random pruning matched to InfoBatch) runs after it.
    Each run is seeded with fastai's `set_seed(seed, reproducible=True)` (the caller's RNG states are
    restored afterwards): the same seed and recipe give the same sample counts and, on CPU, the same
    accuracy. `target_acc`: stop each fit after the epoch whose validation accuracy reaches it and
    record the time and samples it took.

    `budget` ("samples", "steps", "flops" or "time"; None: equal epochs) gives every recipe the baseline
    recipe's full-epoch spend of the same seed as its budget (`effilab.budget.Budget` under one-cycle). In
    both modes, with `matched=True` (the command line's default) and a recipe named "baseline", each other
    recipe (but those with `reinvest`) is followed by its budget-matched baseline `baseline@<name>`: the
    baseline given exactly what that recipe's run of the same seed spent, in the unit where it saved
    (samples, FLOPs, steps); not run (listed in `Campaign.skipped`) when it saved nothing.

    `options` reach the recipes (`fraction`: random pruning's when nothing is matched); `threads` sets
    torch's CPU threads for the duration. `nproc` > 1: each run trains on
    that many processes under `torchrun` (DDP, see `effilab.bench.distributed`).

    Every setting, the device, the task's size and each recipe's fit to the task are checked before any
    training (`ValueError`, `TaskError`, `RecipeError`). A run that raises is recorded as a `RunFailure`
    (error and traceback) and the campaign goes on. With `out` (a folder, checked to be writable first),
    `results.json` is rewritten after every run and `report.html` written at the end, also after a
    failure or Ctrl-C (then `CampaignInterrupted` is raised, holding the campaign); what cannot be
    written is listed in `Campaign.write_errors`, the runs are kept. An `out` that holds results is
    refused unless `resume` (continue: only the missing or failed runs are run, a failure's record kept
    until its run is retried; the configuration must be the same) or `overwrite`.

    >>> c = run("mnist1d", ["baseline", "infobatch(ratio=0.3)"], seeds=[0, 1], epochs=8)  # doctest: +SKIP
    >>> print(c.table)  # doctest: +SKIP
    """
    from ..datasets import TaskData

    seeds = list(seeds)
    _check_settings(seeds, epochs, bs, lr, target_acc, model, threads, width)
    check_budget_unit(budget)
    recipe_objs = same_measuring(resolve_campaign(add_matched_baselines([get_recipe(r) for r in recipes],
                                                                        budget, matched)))
    if not recipe_objs:
        raise ValueError("need at least one recipe")
    options = dict(options or {})
    if budget is not None:
        options["budget"] = budget
    device = check_device(device)
    check_nproc(nproc)
    if isinstance(task, TaskData):
        task_spec, kwargs = task.name, None
    else:
        task_spec, kwargs = str(task), dict(task_kwargs or {})
    config = {"task": task_spec, "task_kwargs": kwargs, "recipes": [r.to_config() for r in recipe_objs],
              "seeds": seeds, "epochs": epochs, "bs": bs, "lr": float(lr), "model": model, "width": width,
              "target_acc": target_acc, "fraction": options.get("fraction"), "device": device.type}
    if budget is not None:  # absent without one: campaigns stored before budgets resume unchanged
        config["budget"] = budget
    if matched:  # absent without: campaigns stored before matched baselines resume unchanged
        config["matched"] = True
    if nproc > 1:  # only then: campaigns stored before the option existed still resume
        config["nproc"] = nproc

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
    _check_task(task, bs, model)
    check_fits_task(recipe_objs, task)
    import torch

    with torch.random.fork_rng(devices=[]):  # one model as the runs build it, for the techniques' checks
        check_fits_model(recipe_objs, make_model(task, model, width), model, task)
    check_budgets(recipe_objs, budget, epochs, len(task.train), bs)
    if out is not None:
        S.prepare_out_dir(out)  # the last check: made and writable, or a clear error before any training

    campaign = Campaign(config, out=out, env=_env(threads, device))
    if stored is not None:
        done = Campaign.from_dict(stored)
        campaign.results, campaign.failures = done.results, done.failures  # failures stay until retried
        campaign.skipped, campaign.total_s = done.skipped, done.total_s
    finished = {(r.recipe, r.seed) for r in campaign.results} | {(s["recipe"], s["seed"]) for s in campaign.skipped}
    plan = [(seed, recipe) for seed in seeds for recipe in run_order(recipe_objs)]
    todo = [(seed, recipe) for seed, recipe in plan if (recipe.name, seed) not in finished]
    bar = _Progress(progress, len(plan), len(plan) - len(todo), epochs)
    if bar.sink is not None:
        target = "" if target_acc is None else f", stop at {target_acc:.0%} accuracy"
        spend = "" if budget is None else f" (their {budget}: every recipe's budget)"
        bar.sink(f"effilab bench: {task!r}; recipes {', '.join(r.name for r in recipe_objs)}; seeds "
                 f"{' '.join(map(str, seeds))}; {epochs} epochs{spend}{target}, bs {bs}, lr {lr}, model {model}, "
                 f"{device.type}" + ("" if out is None else f"; results in {out}"))
        if stored is not None:
            bar.sink(f"resuming {out}: {len(plan) - len(todo)} of {len(plan)} runs done, {len(todo)} to go")
    bar.begin()
    started = time.perf_counter()
    previous_s = campaign.total_s
    interrupted = False
    try:
        with num_threads(threads):
            for seed, recipe in todo:
                peers = {r.recipe: r for r in campaign.results if r.seed == seed}
                ctx = RunContext(task=task, seed=seed, epochs=epochs, bs=bs, lr=lr, n_train=len(task.train),
                                 peers=peers, options=options)
                bar.start_run(recipe.name, seed)
                t0 = time.perf_counter()
                try:
                    if nproc > 1:
                        budget_plan(recipe, ctx)  # a matched baseline with nothing to match: skipped here
                        fit = fit_distributed(task, recipe, ctx, device, model, width, target_acc, nproc, threads)
                    else:
                        fit = fit_one(task, recipe, ctx, device, model, width, target_acc, bar.on_epoch)
                    record = RunResult.from_fit(fit, recipe, seed, task.name, epochs, bs, lr, target_acc,
                                                device.type)
                except NothingToMatch as e:
                    campaign.skipped.append({"recipe": recipe.name, "seed": seed, "reason": str(e)})
                    campaign.failures = [f for f in campaign.failures
                                         if (f.recipe, f.seed) != (recipe.name, seed)]
                    if out is not None:
                        _write(campaign, S.RESULTS, campaign.save)
                    bar.finish_run(_skipped_line(bar.done + 1, bar.total, campaign.skipped[-1]))
                    continue
                except Exception as e:  # the campaign goes on; KeyboardInterrupt ends it below
                    record = RunFailure(recipe.name, seed, task.name, type(e).__name__, str(e),
                                        traceback.format_exc(), time.perf_counter() - t0)
                # A retried run replaces the failure record it had.
                campaign.failures = [f for f in campaign.failures if (f.recipe, f.seed) != (recipe.name, seed)]
                if isinstance(record, RunFailure):
                    campaign.failures.append(record)
                    line = _failure_line(bar.done + 1, bar.total, record)
                else:
                    campaign.results.append(record)
                    line = _run_line(bar.done + 1, bar.total, record)
                campaign.total_s = previous_s + time.perf_counter() - started
                if out is not None:
                    _write(campaign, S.RESULTS, campaign.save)
                try:
                    bar.finish_run(line)
                except Exception:  # a line that cannot be printed loses nothing: the run is stored
                    pass
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        campaign.total_s = previous_s + time.perf_counter() - started
        campaign.status = "interrupted" if interrupted else "failed" if campaign.failures else "complete"
        if out is not None:
            _write(campaign, S.RESULTS, campaign.save)  # first: the runs, whatever comes next
            if report:
                _write(campaign, S.REPORT, campaign.save_report)
    if interrupted:
        raise CampaignInterrupted(campaign)
    return campaign
