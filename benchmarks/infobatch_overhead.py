"""What the InfoBatch callback costs per step in a fastai loop (target: <= 2% of a step).

Two Learners with the same model, data and seed: one plain, one with `InfoBatch(ratio=0)`. With
ratio 0 nothing is pruned, so both forward the same number of batches, while InfoBatch still does all
of its per-step work (per-sample losses, score writes, weights, its loader) and its per-epoch plan.
Each repeat trains one epoch of each Learner, alternating which goes first (A B, B A, ...); validation
is skipped. Timed with callbacks around every training step (`before_batch` -> `after_batch`), around
step + next batch fetch, and around each epoch's training phase (planning and loader included), in
wall and in CPU time (steadier on a shared machine). Overhead = median over repeats of the paired
ratio InfoBatch / plain - 1. A last table times the loaders alone: the fastai training DataLoader vs
the `PlanDL` that InfoBatch trains from (same samples, built per epoch as the callback does).

    python -m benchmarks.infobatch_overhead [--quick]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import (
    add_common_args,
    apply_threads,
    machine,
    machine_line,
    make_learner,
    median,
    pct,
    skip_validation,
    step_timer,
    table,
    write_json,
)
from effilab.data.infobatch import InfoBatch
from effilab.data.pruning import PlanDL
from effilab.datasets import fashion_mnist, mnist1d

BS = 128
LR = 1e-3  # training progress is irrelevant here; a small LR keeps the runs stable


def tasks(quick: bool) -> dict:
    # (loader, small_model width). Sizes give 100-250 steps per epoch, so a repeat takes seconds. The
    # CNN is the 16-wide one of the end-to-end benchmark: the smaller the model, the larger the share
    # of InfoBatch's fixed per-step cost.
    return {
        "mnist1d, MLP 256": (lambda: mnist1d(n_samples=4_000 if quick else 40_000), None),
        "Fashion-MNIST, CNN 16": (lambda: fashion_mnist(subset=2_560 if quick else 12_800), 16),
    }


def measure(task, repeats: int, width: int | None, seed: int = 0) -> dict:
    arms = {}
    for name, extra in (("plain", []), ("infobatch_r0", [InfoBatch(ratio=0.0, seed=seed)])):
        cbs, rec = step_timer()
        learn = make_learner(task, BS, seed, cbs=[*cbs, skip_validation(), *extra], width=width)
        arms[name] = (learn, rec)
    for learn, rec in arms.values():  # warm-up epoch each, not recorded
        with learn.no_bar(), learn.no_logging():
            learn.fit(1, LR)
        for v in rec.values():
            v.clear()
    per_repeat = {name: [] for name in arms}
    order = list(arms)
    for r in range(repeats):
        for name in (order if r % 2 == 0 else order[::-1]):
            learn, rec = arms[name]
            n_step, n_iter = len(rec["step"]), len(rec["iter"])
            with learn.no_bar(), learn.no_logging():
                learn.fit(1, LR)
            per_repeat[name].append({
                "step_median_s": median(rec["step"][n_step:]),
                "step_cpu_median_s": median(rec["step_cpu"][n_step:]),
                "iter_median_s": median(rec["iter"][n_iter:]), "start_s": rec["start"][-1],
                "train_s": rec["train"][-1], "batches": rec["batches"][-1], "samples": rec["samples"][-1]})
    a, b = per_repeat["plain"], per_repeat["infobatch_r0"]
    assert [x["samples"] for x in a] == [x["samples"] for x in b], "both arms must forward the same samples"
    ratio = {k: median([y[k] / x[k] - 1 for x, y in zip(a, b)])
             for k in ("step_median_s", "step_cpu_median_s", "iter_median_s")}
    ratio["train_per_batch"] = median([(y["train_s"] / y["batches"]) / (x["train_s"] / x["batches"]) - 1
                                       for x, y in zip(a, b)])
    delta = {k: median([y[k] - x[k] for x, y in zip(a, b)]) for k in ("step_median_s", "step_cpu_median_s")}
    return {"n_train": len(task.train), "bs": BS, "repeats": repeats, "per_repeat": per_repeat,
            "overhead": ratio, "step_delta_s": delta["step_median_s"],
            "step_cpu_delta_s": delta["step_cpu_median_s"],
            "loader": loader_times(arms["plain"][0].dls.train, repeats)}


def loader_times(dl, repeats: int) -> dict:
    """Seconds per batch of one pass over `dl` and over a `PlanDL` of all its samples, interleaved."""
    n = dl.n
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))

    def one_pass(make):
        t0 = time.perf_counter()
        k = sum(1 for _ in make())
        return (time.perf_counter() - t0) / k

    times = {"fastai DataLoader": [], "PlanDL": []}
    makers = {"fastai DataLoader": lambda: dl, "PlanDL": lambda: PlanDL(dl, perm.tolist())}
    for r in range(repeats):
        for name in (list(makers) if r % 2 == 0 else list(makers)[::-1]):
            times[name].append(one_pass(makers[name]))
    return times


def loader_row(name: str, times: dict) -> list[str]:
    fa, pl = times["fastai DataLoader"], times["PlanDL"]
    ratio = median([p / f - 1 for f, p in zip(fa, pl)])
    return [name, f"{1e3 * median(fa):.3f}", f"{1e3 * median(pl):.3f}", pct(ratio)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    args = p.parse_args(argv)
    apply_threads(args)
    repeats = 2 if args.quick else 11
    t0 = time.perf_counter()
    results = {name: measure(load(), repeats, width) for name, (load, width) in tasks(args.quick).items()}
    out = write_json("infobatch_overhead" + ("_quick" if args.quick else ""),
                     {"results": results, "elapsed_s": time.perf_counter() - t0})

    def ms(res, arm, key):
        return f"{1e3 * median([r[key] for r in res['per_repeat'][arm]]):.3f}"

    def per_batch(res, arm):
        return f"{1e3 * median([r['train_s'] / r['batches'] for r in res['per_repeat'][arm]]):.3f}"

    print(f"Machine: {machine_line(machine())}\n")
    print(f"bs {BS}; {repeats} interleaved repeats of one epoch per arm; medians, ms unless said\n")
    print(table(
        ["task (train size)", "step CPU: plain", "step CPU: InfoBatch r=0", "Δ step CPU (µs)",
         "overhead (CPU)",
         "step wall: plain", "step wall: InfoBatch r=0", "overhead (wall)", "step+fetch overhead (wall)"],
        [[f"{name} ({res['n_train']:,})", ms(res, "plain", "step_cpu_median_s"),
          ms(res, "infobatch_r0", "step_cpu_median_s"), f"{1e6 * res['step_cpu_delta_s']:.0f}",
          pct(res["overhead"]["step_cpu_median_s"]), ms(res, "plain", "step_median_s"),
          ms(res, "infobatch_r0", "step_median_s"), pct(res["overhead"]["step_median_s"]),
          pct(res["overhead"]["iter_median_s"])]
         for name, res in results.items()]))
    print("\nWhole training phase of an epoch (planning, loader, steps), per batch:\n")
    print(table(
        ["task", "plain", "InfoBatch r=0", "overhead", "epoch setup: plain", "epoch setup: InfoBatch"],
        [[name, per_batch(res, "plain"), per_batch(res, "infobatch_r0"),
          pct(res["overhead"]["train_per_batch"]), ms(res, "plain", "start_s"),
          ms(res, "infobatch_r0", "start_s")]
         for name, res in results.items()]))
    print("\nLoaders alone, one pass over the training set, per batch:\n")
    print(table(
        ["task", "fastai DataLoader", "PlanDL", "PlanDL overhead"],
        [loader_row(name, res["loader"]) for name, res in results.items()]))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
