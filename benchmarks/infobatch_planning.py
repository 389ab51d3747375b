"""InfoBatch's own costs, without a model: the per-epoch plan and the per-step score write.

Per epoch: `plan_epoch` over N scores (target: <= 50 ms for N = 1.28 M on CPU), its score histogram
alone, and the host copies the fastai callback takes once per epoch (`summary()` for telemetry,
`indices.tolist()` for the loader). Per step: `ScoreTable.update`, `InfoBatchPruner.weights_of` and
`weighted_loss` at batch size 128 and 256, next to a bare `index_copy_` (the least a score write can
cost), `weights_of` fed with fastai's `TensorBase` losses (what a fastai loss returns), and a host-side
score write like the official package's (indices and losses copied to the host every step; on a
CPU-only machine those copies are free, so this is a lower bound of its GPU cost).

    python -m benchmarks.infobatch_planning [--quick] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch
from fastai.torch_core import TensorBase

from benchmarks.common import (
    add_common_args,
    apply_threads,
    machine,
    machine_line,
    median,
    table,
    time_calls,
    write_json,
)
from effilab.core.infobatch import InfoBatchPruner, ScoreTable, _histogram, plan_epoch


def loss_like_scores(n: int, seed: int = 0) -> torch.Tensor:
    # Per-sample losses are long-tailed: most samples near zero, a few large.
    g = torch.Generator().manual_seed(seed)
    return torch.empty(n).exponential_(1.0, generator=g) ** 2


def per_epoch(n: int, repeats: int) -> dict:
    scores = loss_like_scores(n)
    epochs = iter(range(10**6))  # a new epoch (new random draws) each call, as in training

    def plan():
        return plan_epoch(scores, 0.5, next(epochs), seed=0)

    plan_t, plan_cpu = time_calls(plan, repeats), time_calls(plan, repeats, clock=time.process_time)
    one = plan_epoch(scores, 0.5, 0, seed=0)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[one.indices] = True
    return {"n": n, "kept": one.indices.numel(), "plan_epoch_s": plan_t, "plan_epoch_cpu_s": plan_cpu,
            "histogram_s": time_calls(lambda: _histogram(scores, keep), repeats),
            "summary_s": time_calls(one.summary, repeats),
            "indices_tolist_s": time_calls(one.indices.tolist, repeats)}


def per_call(fn, calls: int, blocks: int) -> list[float]:
    """CPU seconds per call: `blocks` timed blocks of `calls` calls each (one call is microseconds)."""
    return [t / calls for t in time_calls(lambda: [fn() for _ in range(calls)], blocks, 0, time.process_time)]


def per_step(n: int, bs: int, calls: int, blocks: int) -> list[dict]:
    g = torch.Generator().manual_seed(bs)
    # A pool of batches, cycled, so the calls do not touch the same few cache lines every time.
    pool = [(torch.randperm(n, generator=g)[:bs], torch.rand(bs, generator=g)) for _ in range(64)]
    counter = iter(range(10**12))

    def batch():
        return pool[next(counter) % len(pool)]

    table_ = ScoreTable(n)
    pruner = InfoBatchPruner(n, num_epochs=10, ratio=0.5, seed=0)
    pruner.start_epoch(0)
    bare = torch.ones(n)
    host_scores, host_weights = torch.ones(n), pruner.plan.weights.clone()

    def bare_write():
        idx, loss = batch()
        bare.index_copy_(0, idx, loss)

    def official_style():
        # Host-side table, as in the official package: indices and losses come to the host every step
        # (2 device-to-host copies on a GPU), the weights go back to the device.
        idx, loss = batch()
        idx_h = idx.cpu()
        host_scores[idx_h] = loss.detach().cpu()
        return (loss * host_weights[idx_h].to(loss.device)).mean()

    # fastai's losses (`BaseLoss`, e.g. CrossEntropyLossFlat) return a `TensorBase`, a tensor subclass
    # whose every op goes through a Python `__torch_function__`: the same call on such losses.
    fastai_pool = [(i, TensorBase(loss)) for i, loss in pool]

    def weights_of_fastai():
        idx, loss = fastai_pool[next(counter) % len(fastai_pool)]
        return pruner.weights_of(loss, idx)

    ops = {
        "bare index_copy_ (lower bound)": bare_write,
        "ScoreTable.update": lambda: table_.update(*batch()),
        "InfoBatchPruner.weights_of": lambda: pruner.weights_of(*batch()[::-1]),
        "InfoBatchPruner.weighted_loss": lambda: pruner.weighted_loss(*batch()[::-1]),
        "InfoBatchPruner.weights_of, losses as fastai TensorBase": weights_of_fastai,
        "official-style host write + weights (CPU)": official_style,
    }
    for fn in ops.values():
        fn()  # warm-up
    # Round robin (one block of each operation in turn) so that load changes hit all of them alike.
    times = {name: [] for name in ops}
    for _ in range(blocks):
        for name, fn in ops.items():
            times[name] += per_call(fn, calls, 1)
    return [{"bs": bs, "op": name, "s_per_call": t} for name, t in times.items()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    args = p.parse_args(argv)
    apply_threads(args)
    if args.quick:
        ns, repeats, n_step, calls, blocks = [100_000, 1_280_000], 3, 100_000, 200, 3
    else:
        ns, repeats, n_step, calls, blocks = [1_280_000, 10_000_000], 11, 1_280_000, 2000, 11
    t0 = time.perf_counter()
    epoch_rows = [per_epoch(n, repeats) for n in ns]
    step_rows = [row for bs in (128, 256) for row in per_step(n_step, bs, calls, blocks)]
    out = write_json("infobatch_planning" + ("_quick" if args.quick else ""), {
        "repeats": repeats, "calls_per_block": calls, "blocks": blocks, "step_table_n": n_step,
        "per_epoch": epoch_rows, "per_step": step_rows, "elapsed_s": time.perf_counter() - t0})

    def ms(r, key, scale=1e3):
        return f"{scale * median(r[key]):.1f}"

    print(f"Machine: {machine_line(machine())}\n")
    print(f"Per epoch (median of {repeats}, ms):\n")
    print(table(["N scores", "plan_epoch", "plan_epoch (CPU time)", "of which histogram",
                 "summary() (telemetry copy), µs", "indices.tolist() (loader)"],
                [[f"{r['n']:,}", ms(r, "plan_epoch_s"), ms(r, "plan_epoch_cpu_s"), ms(r, "histogram_s"),
                  ms(r, "summary_s", 1e6),
                  ms(r, "indices_tolist_s")] for r in epoch_rows]))
    print(f"\nPer step (score table of {n_step:,}; median of {blocks} blocks of {calls} calls; "
          "CPU µs per call):\n")
    cell = {(r["op"], r["bs"]): f"{1e6 * median(r['s_per_call']):.1f}" for r in step_rows}
    ops = list(dict.fromkeys(r["op"] for r in step_rows))
    print(table(["operation", "bs 128", "bs 256"], [[op, cell[op, 128], cell[op, 256]] for op in ops]))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
