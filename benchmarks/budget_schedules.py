"""Budget-aware schedules at equal budgets on MNIST-1D: one-cycle, linear decay to zero, REX, WSD (1-sqrt
cooldown) and schedule-free AdamW, each given the same number of training samples.

Each run: `learn.fit_budget(Budget(fraction * epochs * n_train, "samples"), lr, schedule=...)` with the
small MLP, seeds 0..n-1; the table gives the final validation accuracy (mean +- std) per schedule and
budget, and the training time the budget charged (the first step, imports and warm-up, excluded). The
budgets are fractions of `--epochs` full epochs.

    python -m benchmarks.budget_schedules [--quick] [--epochs 8] [--fractions 0.25 1] [--seeds 3]
"""

from __future__ import annotations

import argparse

from benchmarks.common import (
    add_common_args,
    apply_threads,
    machine,
    machine_line,
    make_learner,
    mean_std,
    table,
    write_json,
)

SCHEDULES = ("one_cycle", "linear_decay", "rex", "wsd", "schedule_free")


def _run(task, schedule: str, amount: int, seed: int, bs: int, lr: float) -> dict:
    from fastai.callback.progress import ProgressCallback
    from fastai.metrics import accuracy

    from effilab.budget import Budget

    budget = Budget(amount, "samples")
    learn = make_learner(task, bs, seed, metrics=[accuracy])
    learn.remove_cb(ProgressCallback)
    learn.logger = lambda *a, **k: None
    learn.fit_budget(budget, lr, schedule=schedule, min_fraction=1.0)
    fit = learn.telemetry.records("budget", "fit")[-1]
    return {"schedule": schedule, "amount": amount, "seed": seed, "spent": budget.spent,
            "accuracy": float(learn.recorder.values[-1][-1]), "train_s": fit["train_s"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--epochs", type=int, default=8, help="the full budget, in epochs")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 1.0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n-samples", type=int, default=10_000)
    parser.add_argument("--bs", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES))
    args = parser.parse_args(argv)
    apply_threads(args)
    from effilab.datasets import mnist1d

    if args.quick:
        args.epochs, args.fractions, args.seeds, args.n_samples = 2, [0.5], 1, 2000
    task = mnist1d(n_samples=args.n_samples)
    n_train = len(task.train) // args.bs * args.bs  # the training loader drops the last partial batch
    runs = []
    for frac in args.fractions:
        amount = round(frac * args.epochs * n_train)
        for schedule in args.schedules:
            for seed in range(args.seeds):
                runs.append(_run(task, schedule, amount, seed, args.bs, args.lr) | {"fraction": frac})
    rows = []
    for frac in args.fractions:
        for schedule in args.schedules:
            rs = [r for r in runs if r["fraction"] == frac and r["schedule"] == schedule]
            acc_m, acc_s = mean_std([r["accuracy"] for r in rs])
            t_m, _ = mean_std([r["train_s"] for r in rs])
            rows.append([f"{frac:g} x {args.epochs} epochs", schedule, f"{rs[0]['amount']:,}",
                         f"{100 * acc_m:.2f} +- {100 * acc_s:.2f}", f"{t_m:.1f}"])
    print(machine_line(machine()))
    print(table(["budget", "schedule", "samples", "accuracy %", "train s"], rows))
    print(f"wrote {write_json('budget_schedules', {'runs': runs, 'args': vars(args)})}")


if __name__ == "__main__":
    main()
