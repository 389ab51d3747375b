"""Budgeted training at equal spend: the schedules at three budgets, and every data-centric saving technique
against its budget-matched baseline and with its savings re-invested, on MNIST-1D and real Fashion-MNIST.

Per task and seed (same initial weights and data order for every run of a seed):

* **Schedules.** `learn.fit_budget(Budget(f * E * N, "samples"), lr, schedule=s)` for f in `--fractions`
  (25/50/100% of E epochs) and s in one-cycle, flat-cos (fastai's flat then cosine), linear decay to zero,
  REX and WSD (5% warm-up, 1-sqrt cooldown over the last 20%); and one-cycle planned for all E epochs but
  stopped at f ("budget-unaware").
* **Techniques.** Each with `fit_one_cycle(E, lr)` and its defaults; its spend is measured, then
  - `baseline@<technique>`: the plain recipe given exactly that spend (`fit_budget(Budget(spend, unit))`,
    one-cycle over it, so its schedule ends on the budget);
  - `<technique>+reinvest`: the technique given the full baseline's spend (it trains more epochs).
  The unit is samples forwarded for the techniques that drop samples. Selective Backprop forwards every
  sample (its selection pass) and backpropagates half, and progressive resizing forwards every sample
  at fewer pixels: their unit is training FLOPs (forward + backward, `FlopCounterMode`), the selection
  forward counted too.

Validation runs once, after each fit (the final accuracy; not in the spend). The paired comparison is over
seeds: the mean and std of (technique - matched baseline), how many seeds the technique won, and a paired
t-test's p (scipy; with 3 seeds only large, steady differences reach p < 0.05).

    python -m benchmarks.budgeted [--quick] [--tasks mnist1d fashion-mnist] [--seeds 0 1 2]

One task alone writes `benchmarks/out/budgeted_<task>.json` (the two tasks can run as two processes).
"""

from __future__ import annotations

import argparse
import math
import time

from benchmarks.common import (
    add_common_args,
    apply_threads,
    machine,
    machine_line,
    make_learner,
    mean_std,
    skip_validation,
    table,
    write_json,
)

SCHEDULES = ("one_cycle", "flat_cos", "linear_decay", "rex", "wsd")
# name -> (budget unit, images only); every technique with its defaults, except importance sampling's draws
TECHNIQUES = {
    "infobatch": ("samples", False),
    "random_prune": ("samples", False),
    "static_prune": ("samples", False),
    "easy_to_hard": ("samples", False),
    "selective_backprop": ("flops", False),
    "selective_backprop(stale)": ("samples", False),
    "importance_sampling(draws=0.7)": ("samples", False),
    "progressive_resize": ("flops", True),
}
TASKS = {  # task -> (loader kwargs, epochs, CNN width, learning rate)
    "mnist1d": ({"n_samples": 10_000}, 5, None, 1e-2),  # 8k train, 2k valid; the MLP
    "fashion-mnist": ({"subset": 6_000}, 4, 8, 1e-2),  # 6k train, 2k of the test split; the CNN at width 8
}
VALID = 2_000


def _forward_flops(model, xb) -> int:
    """FLOPs of the forward alone (Selective Backprop's selection pass), on the meta device."""
    import torch
    from torch.func import functional_call
    from torch.utils.flop_counter import FlopCounterMode

    def meta(t):
        return torch.empty(t.shape, dtype=t.dtype, device="meta")

    state = {k: meta(v) for k, v in [*model.named_parameters(), *model.named_buffers()]}
    with torch.no_grad(), torch.random.fork_rng(devices=[]), FlopCounterMode(display=False) as counter:
        functional_call(model, state, tuple(meta(x) for x in xb))
    return int(counter.get_total_flops())


def spend_counter(selection_pass: bool = False):
    """A callback counting what a training fit spent: samples forwarded by the training step (as `Budget`
    counts them), their forward + backward FLOPs, and with `selection_pass` the forward of every fetched
    batch before Selective Backprop shrinks it."""
    from fastai.callback.core import Callback
    from fastai.torch_core import find_bs, get_model

    from effilab.core.budget import step_flops

    class Spend(Callback):
        order = -6  # before_batch before Selective Backprop (-5) shrinks the batch

        def __init__(self):
            self.samples = self.train_flops = self.selection_flops = 0
            self._cache = {}

        def _flops(self, kind, xb):
            key = (kind, *(tuple(x.shape) for x in xb))
            if key not in self._cache:
                model = get_model(self.learn.model)
                self._cache[key] = step_flops(model, xb) if kind == "step" else _forward_flops(model, xb)
            return self._cache[key]

        def before_batch(self):
            if self.training and selection_pass and not hasattr(self.learn, "lr_finder"):
                self.selection_flops += self._flops("forward", self.learn.xb)

        def after_pred(self):
            if self.training:
                self.samples += find_bs(self.learn.xb)
                self.train_flops += self._flops("step", self.learn.xb)

        @property
        def flops(self):
            return self.train_flops + self.selection_flops

    return Spend()


def _technique(name: str):
    from effilab import (
        EasyToHard,
        ImportanceSampling,
        InfoBatch,
        ProgressiveResize,
        RandomPrune,
        SelectiveBackprop,
        StaticPrune,
    )

    return {"infobatch": InfoBatch, "random_prune": RandomPrune, "static_prune": StaticPrune,
            "easy_to_hard": EasyToHard, "selective_backprop": SelectiveBackprop,
            "selective_backprop(stale)": lambda: SelectiveBackprop(stale=True),
            "importance_sampling(draws=0.7)": lambda: ImportanceSampling(draws=0.7),
            "progressive_resize": ProgressiveResize}[name]()


def _fit(task, setting, seed, *, cbs=(), budget=None, schedule="one_cycle", n_epoch=None, stop_at=None,
         selection_pass=False) -> dict:
    """One fit; returns accuracy, spend and times. `stop_at`: samples after which a one-cycle fit planned
    for all its epochs is cut (budget-unaware)."""
    from fastai.callback.core import Callback, CancelFitException
    from fastai.callback.progress import ProgressCallback
    from fastai.metrics import accuracy

    spend = spend_counter(selection_pass)
    extra = [spend, skip_validation()]
    if stop_at is not None:
        class StopAt(Callback):
            order = 99

            def after_batch(self):
                if self.training and spend.samples >= stop_at:
                    raise CancelFitException

        extra.append(StopAt())
    learn = make_learner(task, setting["bs"], seed, metrics=[accuracy], width=setting["width"])
    learn.remove_cb(ProgressCallback)
    learn.logger = lambda *a, **k: None
    epochs = n_epoch or setting["epochs"]
    t0, c0 = time.perf_counter(), time.process_time()
    if budget is not None:
        learn.fit_budget(budget, setting["lr"], schedule=schedule, n_epoch=n_epoch, cbs=[*cbs, *extra],
                         min_fraction=1.0)
    else:
        learn.fit_one_cycle(epochs, setting["lr"], cbs=[*cbs, *extra])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    epochs_run = learn.epoch + 1
    acc = float(learn.validate()[1])
    return {"accuracy": acc, "samples": spend.samples, "flops": spend.flops, "train_flops": spend.train_flops,
            "wall_s": wall, "cpu_s": cpu, "epochs_run": epochs_run,
            "budget_spent": None if budget is None else budget.spent,
            "stopped_by_budget": None if budget is None else budget.stopped_by_budget}


def run_task(task_name: str, seeds, fractions, techniques, quick: bool) -> list[dict]:
    import torch

    from effilab import datasets
    from effilab.budget import Budget

    kwargs, epochs, width, lr = TASKS[task_name]
    if quick:
        kwargs = {"n_samples": 2_500} if task_name == "mnist1d" else {"subset": 1_024}
        epochs = 2
    task = datasets.mnist1d(**kwargs) if task_name == "mnist1d" else datasets.fashion_mnist(**kwargs, seed=0)
    if len(task.valid) > VALID:  # a fixed part of the test split (its own generator)
        keep = torch.randperm(len(task.valid), generator=torch.Generator().manual_seed(0))[:VALID]
        task.valid = datasets.ArrayDataset(*task.valid[keep])
    setting = {"bs": 128, "epochs": epochs, "width": width, "lr": lr}
    n_train = len(task.train) // setting["bs"] * setting["bs"]  # drop_last
    full_samples = epochs * n_train
    runs = []

    def add(kind, name, seed, res, **extra):
        runs.append({"task": task_name, "kind": kind, "name": name, "seed": seed} | extra | res)
        r = runs[-1]
        print(f"  {task_name} seed {seed} {kind:9} {name:32} acc {100 * r['accuracy']:.2f}%  samples "
              f"{r['samples']:,}  {r['cpu_s']:.1f} s CPU", flush=True)

    for seed in seeds:
        for frac in fractions:
            amount = round(frac * full_samples)
            for s in SCHEDULES:
                add("schedule", s, seed, _fit(task, setting, seed, budget=Budget(amount, "samples"), schedule=s),
                    fraction=frac, unit="samples", amount=amount)
            if frac < 1:
                add("unaware", "one_cycle(stopped)", seed, _fit(task, setting, seed, stop_at=amount),
                    fraction=frac, unit="samples", amount=amount)
        full = next(r for r in runs if r["kind"] == "schedule" and r["name"] == "one_cycle" and r["seed"] == seed
                    and r["fraction"] == 1.0)
        for name in techniques:
            tech_unit, images_only = TECHNIQUES[name]
            if images_only and len(task.input_shape) != 3:
                continue
            sel = name == "selective_backprop"
            tech = _fit(task, setting, seed, cbs=[_technique(name)], selection_pass=sel)
            add("technique", name, seed, tech, unit=tech_unit, amount=None)
            spend = tech[tech_unit]
            add("matched", f"baseline@{name}", seed,
                _fit(task, setting, seed, budget=Budget(spend, tech_unit)), unit=tech_unit, amount=spend,
                fraction=spend / full[tech_unit])
            # Re-invested: the technique's fit ends when its training steps have spent the full baseline's
            # amount (for Selective Backprop the selection forwards are outside the Budget's count: the amount
            # is scaled by the share of its spend its training steps took).
            share = tech["train_flops"] / tech["flops"] if sel else 1.0
            amount = full[tech_unit] * share
            # Epochs enough to spend it. Under a FLOPs budget progressive resizing follows p = spent / budget, which
            # its cheap low-resolution steps move slowly: it needs more epochs than its equal-epoch ratio says.
            n_epoch = math.ceil(epochs * full[tech_unit] / spend * (2.0 if tech_unit == "flops" else 1.1))
            add("reinvest", f"{name}+reinvest", seed,
                _fit(task, setting, seed, cbs=[_technique(name)], budget=Budget(amount, tech_unit), n_epoch=n_epoch,
                     selection_pass=sel), unit=tech_unit, amount=full[tech_unit], fraction=1.0)
    return runs


def _paired(xs, ys):
    """(mean, std) of x - y in points, wins of x, and a paired t-test's p (None below 2 pairs or no spread)."""
    from scipy.stats import ttest_rel

    d = [100 * (x - y) for x, y in zip(xs, ys)]
    m, s = mean_std(d)
    p = float(ttest_rel(xs, ys).pvalue) if len(d) > 1 and s > 0 else None
    return m, s, sum(v > 0 for v in d), p


def tables(runs: list[dict], seeds) -> dict[str, str]:
    out = {}
    for task in dict.fromkeys(r["task"] for r in runs):
        rs = [r for r in runs if r["task"] == task]
        fracs = sorted({r["fraction"] for r in rs if r["kind"] == "schedule"})
        rows = []
        for name in [*SCHEDULES, "one_cycle(stopped)"]:
            cells = []
            for f in fracs:
                accs = [100 * r["accuracy"] for r in rs if r["name"] == name and r.get("fraction") == f
                        and r["kind"] in ("schedule", "unaware")]
                if not accs and name == "one_cycle(stopped)" and f == 1.0:
                    accs = [100 * r["accuracy"] for r in rs if r["name"] == "one_cycle" and r["fraction"] == 1.0]
                m, s = mean_std(accs) if accs else (math.nan, 0)
                cells.append(f"{m:.2f} ± {s:.2f}" if accs else "-")
            rows.append([name, *cells])
        out[f"{task}: schedules"] = table(["schedule", *[f"{100 * f:.0f}% budget" for f in fracs]], rows)

        full = {r["seed"]: r for r in rs if r["name"] == "one_cycle" and r["fraction"] == 1.0}
        rows = []
        for name in TECHNIQUES:
            tech = {r["seed"]: r for r in rs if r["kind"] == "technique" and r["name"] == name}
            if not tech:
                continue
            matched = {r["seed"]: r for r in rs if r["name"] == f"baseline@{name}"}
            reinv = {r["seed"]: r for r in rs if r["name"] == f"{name}+reinvest"}
            ss = sorted(tech)
            unit = tech[ss[0]]["unit"]
            frac, _ = mean_std([tech[s][unit] / full[s][unit] for s in ss])
            acc = [tech[s]["accuracy"] for s in ss]
            m_acc = [matched[s]["accuracy"] for s in ss]
            r_acc = [reinv[s]["accuracy"] for s in ss]
            f_acc = [full[s]["accuracy"] for s in ss]
            d1, s1, w1, p1 = _paired(acc, m_acc)
            d2, s2, w2, p2 = _paired(r_acc, f_acc)
            cpu_t, _ = mean_std([tech[s]["cpu_s"] / full[s]["cpu_s"] for s in ss])
            rows.append([f"`{name}`", unit, f"{100 * frac:.1f}%", f"{cpu_t:.0%}",
                         "{:.2f} ± {:.2f}".format(*mean_std([100 * a for a in acc])),
                         "{:.2f} ± {:.2f}".format(*mean_std([100 * a for a in m_acc])),
                         f"{d1:+.2f} ± {s1:.2f} ({w1}/{len(ss)}{'' if p1 is None else f', p={p1:.2f}'})",
                         "{:.2f} ± {:.2f}".format(*mean_std([100 * a for a in r_acc])),
                         f"{d2:+.2f} ± {s2:.2f} ({w2}/{len(ss)}{'' if p2 is None else f', p={p2:.2f}'})"])
        m, s = mean_std([100 * full[k]["accuracy"] for k in sorted(full)])
        out[f"{task}: techniques (full baseline {m:.2f} ± {s:.2f}%)"] = table(
            ["technique", "unit", "spend (% of full)", "CPU time (% of full)", "technique acc %",
             "baseline@ acc %", "technique − baseline@ (pts; wins; p)", "+reinvest acc %",
             "+reinvest − full baseline (pts; wins; p)"], rows)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--techniques", nargs="+", default=list(TECHNIQUES), choices=list(TECHNIQUES))
    parser.add_argument("--name", default=None, help="the JSON's name under benchmarks/out (default: from the tasks)")
    args = parser.parse_args(argv)
    apply_threads(args)
    if 1.0 not in args.fractions:
        raise SystemExit("--fractions must include 1.0 (the full baseline the techniques are compared with)")
    if args.quick:
        args.seeds, args.fractions = args.seeds[:1], [0.5, 1.0]
        args.techniques = args.techniques[:2] + ["selective_backprop", "progressive_resize"]
    t0, c0 = time.perf_counter(), time.process_time()
    runs = []
    for task in args.tasks:
        runs += run_task(task, args.seeds, args.fractions, args.techniques, args.quick)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = tables(runs, args.seeds)
    print(machine_line(machine()))
    for title, text in out.items():
        print(f"\n### {title}\n\n{text}")
    print(f"\n{len(runs)} fits in {wall:.0f} s wall-clock, {cpu:.0f} s CPU")
    name = "budgeted" + "".join(f"_{t.replace('-', '_')}" for t in args.tasks if len(args.tasks) < len(TASKS))
    name = args.name or name + ("_quick" if args.quick else "")
    print(f"wrote {write_json(name, {'runs': runs, 'tables': out, 'args': vars(args), 'wall_s': wall, 'cpu_s': cpu})}")


if __name__ == "__main__":
    main()
