"""Shared pieces of the benchmarks: timing, a per-step timing callback, machine facts, tables, JSON."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

OUT_DIR = Path(__file__).resolve().parent / "out"


def add_common_args(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="smoke run (under a minute on an idle machine)")
    # One thread by default: on a shared 2-core machine, a second OpenMP thread that gets descheduled
    # stalls every op at its barrier (medians 100x slower were seen under load); one thread is steady.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")


def apply_threads(args) -> None:
    torch.set_num_threads(args.threads)


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    xs = [float(x) for x in xs]
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 1,
               clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds per call of `fn`, `repeats` times after `warmup` untimed calls. `clock=time.process_time`
    gives this process's CPU time, which other processes on the same cores barely move."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return times


def machine() -> dict:
    """What the numbers were measured on; the load average says how busy the shared machine was."""
    import fastai

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "torch": torch.__version__,
        "fastai": fastai.__version__,
        "python": platform.python_version(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def machine_line(m: dict) -> str:
    dev = "CUDA" if m["cuda"] else "no GPU"
    return (f"{m['cpu']}, {m['cpu_count']} cores ({m['torch_threads']} torch threads), {dev}; "
            f"torch {m['torch']}, fastai {m['fastai']}, Python {m['python']}")


def write_json(name: str, payload: dict) -> Path:
    """Write `payload` (plus the command line and the machine) to benchmarks/out/<name>.json."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{name}.json"
    full = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S")} | payload
    path.write_text(json.dumps(full, indent=1))
    return path


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; floats are printed as given (format them before)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def step_timer():
    """Two fastai callbacks sharing one record: the first runs before every other `before_batch`, the
    second after every other `after_batch`, so a step's time covers the forward, the loss (and whatever
    a technique does in it), the backward, the optimizer and all callbacks' batch events.

    Returns `(callbacks, record)`. `record` holds lists: per step, `step` (seconds) and `step_cpu`
    (this process's CPU seconds); `iter`, the seconds between consecutive step starts (a step plus
    fetching the next batch); per epoch, `train` and `train_cpu` (the training phase, planning and
    loader included), `start` (from the phase's start to its first step: per-epoch setup such as a
    technique's planning and the first batch), and the `batches` and `samples` forwarded.
    CPU time barely moves when other processes share the cores (wall time does), and with one torch
    thread it is what an idle machine's wall time would be.
    """
    from fastai.callback.core import Callback
    from fastai.torch_core import find_bs

    keys = ("step", "step_cpu", "iter", "train", "train_cpu", "batches", "samples", "start")
    record = {k: [] for k in keys}
    state = {"t0": None, "c0": None, "prev": None, "train0": None, "ctrain0": None, "n": 0, "samples": 0}

    class _StepStart(Callback):
        order = -1000

        def before_train(self):
            state["prev"], state["n"], state["samples"] = None, 0, 0
            state["train0"], state["ctrain0"] = time.perf_counter(), time.process_time()

        def before_batch(self):
            if not self.training:
                return
            now = time.perf_counter()
            if state["prev"] is not None:
                record["iter"].append(now - state["prev"])
            else:
                record["start"].append(now - state["train0"])
            state["t0"] = state["prev"] = now
            state["c0"] = time.process_time()

    class _StepEnd(Callback):
        order = 1000

        def after_batch(self):
            if self.training and state["t0"] is not None:
                record["step"].append(time.perf_counter() - state["t0"])
                record["step_cpu"].append(time.process_time() - state["c0"])
                state["t0"] = None
                state["n"] += 1
                state["samples"] += find_bs(self.learn.yb)

        def after_train(self):
            record["train"].append(time.perf_counter() - state["train0"])
            record["train_cpu"].append(time.process_time() - state["ctrain0"])
            record["batches"].append(state["n"])
            record["samples"].append(state["samples"])

    return [_StepStart(), _StepEnd()], record


def skip_validation(keep_last: bool = False):
    """A callback that skips the validation phase (of every epoch but the last with `keep_last`):
    what is timed is training, and the final accuracy is still measured."""
    from fastai.callback.core import Callback, CancelValidException

    class _SkipValidation(Callback):
        def before_validate(self):
            if not (keep_last and self.learn.epoch == self.learn.n_epoch - 1):
                raise CancelValidException()

    return _SkipValidation()


def pct(x: float, digits: int = 1) -> str:
    return f"{100 * x:+.{digits}f}%"


def make_learner(task, bs: int, seed: int, cbs=(), metrics=(), width: int | None = None):
    """A fastai Learner on `task` with effilab's `small_model`, seeded: same seed, same init and batches."""
    import fastai.callback.progress  # noqa: F401  (adds `learn.no_bar()`)
    import fastai.callback.schedule  # noqa: F401  (adds `learn.fit_one_cycle()`)
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.torch_core import set_seed

    from effilab.datasets import small_model

    set_seed(seed)
    dls = task.dataloaders(bs=bs, seed=seed)
    return Learner(dls, small_model(task, width), loss_func=CrossEntropyLossFlat(), metrics=list(metrics),
                   cbs=list(cbs))


# `--quick`: every recipe once, on a few batches (seconds per recipe on a CPU).
QUICK_CAMPAIGN = {"task_kwargs": {"subset": 1024}, "epochs": 3, "seeds": [0], "width": 8}


def campaign_main(name: str, doc: str, recipes: Sequence[str], references: Sequence[str] = ("baseline",),
                  argv=None) -> dict:
    """The command line of a recipe-campaign benchmark: parse the options, run `recipe_campaign`."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    add_common_args(parser)
    add_campaign_args(parser)
    args = parser.parse_args(argv)
    apply_threads(args)
    return recipe_campaign(name, recipes, args, references, quick=QUICK_CAMPAIGN)


def add_campaign_args(parser) -> None:
    """Options of the recipe-campaign benchmarks."""
    parser.add_argument("--task", default="fashion-mnist")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--n-samples", type=int, default=None, help="training subset (default: all)")
    parser.add_argument("--width", type=int, default=None, help="the CNN's first-layer channels")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--bs", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--recipes", nargs="+", default=None, help="a subset of the recipes (by name)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the campaign in benchmarks/out/<name>/ with its missing runs")


def recipe_campaign(name: str, recipes: Sequence[str], args, references: Sequence[str] = ("baseline",),
                    quick: dict | None = None) -> dict:
    """Run `recipes` through effilab's bench runner (same model init and data order per seed, the recipes
    of a seed back to back) and print one summary table per reference recipe present.

    Writes the runner's own folder (`benchmarks/out/<name>/`: results.json after every run, report.html)
    and `benchmarks/out/<name>.json` with the tables. `--quick` replaces the setting with `quick`.
    """
    from effilab.bench import format_table, run, summarize

    setting = dict(task_kwargs={"subset": args.n_samples} if args.n_samples else {}, epochs=args.epochs,
                   seeds=args.seeds, width=args.width)
    if args.quick:
        setting.update(quick or {})
        name += "_quick"
    if args.recipes:
        unknown = set(args.recipes) - set(recipes)
        if unknown:
            raise SystemExit(f"unknown recipes {sorted(unknown)}; this benchmark's recipes: {list(recipes)}")
        recipes = [r for r in recipes if r in args.recipes]
    campaign = run(args.task, recipes, bs=args.bs, lr=args.lr, device=args.device, threads=args.threads,
                   out=OUT_DIR / name, overwrite=not args.resume, resume=args.resume, progress="lines", **setting)
    tables = {}
    for ref in references:
        if any(r.recipe == ref for r in campaign.results):
            tables[ref] = format_table(summarize(campaign.results, ref, failures=campaign.failures,
                                                 order=campaign.recipes))
    extra = {"pixels / tokens forwarded": work_table(campaign), "raw vs averaged weights": averaged_table(campaign)}
    tables |= {k: v for k, v in extra.items() if v}
    for ref, text in tables.items():
        print(f"\n### {ref if ref in extra else 'vs ' + ref}\n\n{text}")
    payload = {"setting": {"task": args.task, "bs": args.bs, "lr": args.lr, **setting},
               "device": campaign.results[0].device if campaign.results else None,
               "tables": tables, "summary": campaign.summary,
               "failures": [f.message for f in campaign.failures]}
    print(f"\nwrote {write_json(name, payload)} and {campaign.results_path}")
    return payload


def work_table(campaign) -> str:
    """Per recipe, the work that techniques which shrink each sample (progressive resizing: pixels;
    sequence-length warmup: tokens) report as forwarded, as a share of full size (telemetry stream
    "epoch": `<unit>_forwarded_total` / `<unit>_full_total`); empty when no recipe reports any."""
    shares: dict[str, list[float]] = {}
    for r in campaign.results:
        for streams in r.telemetry.get("records", {}).values():
            last = (streams.get("epoch") or [{}])[-1]
            for key in last:
                unit = key.removesuffix("_forwarded_total")
                if unit != key and last.get(f"{unit}_full_total"):
                    shares.setdefault(f"{r.recipe}|{unit}", []).append(last[key] / last[f"{unit}_full_total"])
    rows = []
    for name, xs in shares.items():
        recipe, unit = name.split("|")
        m, sd = mean_std(xs)
        rows.append([recipe, unit, f"{100 * m:.1f} ± {100 * sd:.1f}%"])
    return table(["recipe", "unit", "forwarded (% of full size)"], rows) if rows else ""


def averaged_table(campaign) -> str:
    """Per recipe that averages weights (telemetry stream "epoch" with `raw_accuracy`): the final
    accuracy of the averaged weights (what the Recorder validated) and of the raw weights."""
    pairs: dict[str, list[tuple[float, float]]] = {}
    for r in campaign.results:
        for streams in r.telemetry.get("records", {}).values():
            last = (streams.get("epoch") or [{}])[-1]
            if "raw_accuracy" in last and "accuracy" in last:
                pairs.setdefault(r.recipe, []).append((last["accuracy"], last["raw_accuracy"]))
    rows = []
    for recipe, xs in pairs.items():
        avg, raw = mean_std([100 * a for a, _ in xs]), mean_std([100 * b for _, b in xs])
        gain = mean_std([100 * (a - b) for a, b in xs])
        rows.append([recipe, f"{avg[0]:.2f} ± {avg[1]:.2f}", f"{raw[0]:.2f} ± {raw[1]:.2f}",
                     f"{gain[0]:+.2f} ± {gain[1]:.2f}"])
    return table(["recipe", "averaged weights acc %", "raw weights acc %", "averaged - raw (pts)"],
                 rows) if rows else ""
