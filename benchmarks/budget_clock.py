"""Does a wall-clock budget end on time? `Budget(T, "seconds")` with `fit_one_cycle` on MNIST-1D.

For each budget T and repeat: the training time the budget charged, the training time measured
independently around the training phases (first step and validation excluded, as the budget does), the
error of each against T, the progress p of the last step and its learning rate against the peak (one-cycle's
final value is reached as p -> 1), the steps taken, and the excluded times (first step, validation).

    python -m benchmarks.budget_clock [--quick] [--budgets 5 10 20] [--repeats 3] [--device cuda]
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import (
    add_common_args,
    apply_threads,
    machine,
    machine_line,
    make_learner,
    median,
    table,
    write_json,
)


def _run(task, budget_s: float, seed: int, device, bs: int):
    from fastai.callback.core import Callback
    from fastai.callback.progress import ProgressCallback
    from fastai.metrics import accuracy

    from effilab.budget import Budget

    class Watch(Callback):
        """Independent timing of the training phases (the first step excluded), and the last step's lr and p."""

        order = 1000

        def __init__(self):
            self.w = {"train_s": 0.0, "first": None, "lr": None, "pct": None, "peak": 0.0}

        def before_train(self):
            self.w["t0"] = time.perf_counter()

        def before_batch(self):
            if self.training:
                self.w["pct"] = float(self.learn.pct_train)

        def after_batch(self):
            w = self.w
            if self.training:
                if w["first"] is None:
                    w["first"] = time.perf_counter() - w["t0"]
                w["lr"] = self.opt.hypers[0]["lr"]
                w["peak"] = max(w["peak"], w["lr"])
                w["last"] = time.perf_counter()

        def after_train(self):
            self.w["train_s"] += self.w["last"] - self.w["t0"]

    budget, watch = Budget(budget_s, "seconds"), Watch()
    learn = make_learner(task, bs, seed, cbs=[budget, watch], metrics=[accuracy])
    if device is not None:
        learn.dls.to(device)
        learn.model.to(device)
    learn.remove_cb(ProgressCallback)
    learn.logger = lambda *a, **k: None
    learn.fit_one_cycle(10_000, 1e-2)
    fit = budget.telemetry.records("budget", "fit")[-1]
    w = watch.w
    measured = w["train_s"] - w["first"]
    return {"budget_s": budget_s, "seed": seed, "charged_s": budget.spent, "measured_s": measured,
            "charged_err": budget.spent / budget_s - 1, "measured_err": measured / budget_s - 1,
            "steps": fit["steps"] + 1, "last_p": w["pct"], "last_lr_over_peak": w["lr"] / w["peak"],
            "warmup_s": fit["warmup_s"], "valid_s": fit["valid_s"], "mean_step_s": budget.spent / fit["steps"],
            "accuracy": float(learn.recorder.values[-1][-1])}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--budgets", type=float, nargs="+", default=[5.0, 10.0, 20.0], help="seconds")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bs", type=int, default=64)
    parser.add_argument("--device", default=None, help="e.g. cuda (default: the CPU)")
    args = parser.parse_args(argv)
    apply_threads(args)
    from effilab.datasets import mnist1d

    budgets, repeats = ([2.0], 1) if args.quick else (args.budgets, args.repeats)
    task = mnist1d(n_samples=10_000)
    runs = [_run(task, b, seed, args.device, args.bs) for b in budgets for seed in range(repeats)]
    rows = []
    for b in budgets:
        rs = [r for r in runs if r["budget_s"] == b]

        def med(key, rs=rs):
            return median([r[key] for r in rs])

        rows.append([f"{b:g}", len(rs), f"{med('charged_err'):+.2%}", f"{med('measured_err'):+.2%}",
                     f"{max(abs(r['measured_err']) for r in rs):.2%}", f"{med('mean_step_s') * 1e3:.2f}",
                     f"{med('steps'):.0f}", f"{med('last_p'):.4f}", f"{med('last_lr_over_peak'):.2e}",
                     f"{med('warmup_s'):.3f}", f"{med('valid_s'):.2f}"])
    m = machine()
    print(machine_line(m) + (f"; device {args.device}" if args.device else ""))
    print(table(["budget s", "runs", "charged err (median)", "measured err (median)", "max |measured err|",
                 "step ms", "steps", "last p", "last lr / peak", "first step s (excluded)",
                 "validation s (excluded)"], rows))
    path = write_json("budget_clock", {"runs": runs, "device": args.device or "cpu"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
