"""What fastai's per-step loss read costs a training step, and what `SyncFreeRecorder` gives back.

The same fit (a 4-layer 512-wide MLP on synthetic data, batch 256, Adam, no validation, no progress bar)
with fastai's default Recorder, which copies the smoothed loss to the host after every step, and with
`SyncFreeRecorder(every=50)`, which keeps it on the device and copies it every 50 steps without
blocking. Arms are interleaved and repeated; reported: the median training time per epoch (wall and
process CPU) and per step (before_batch to after_batch). On a CPU there is no device to wait for: the
two should match (the check that the sync-free path costs nothing). On a GPU the default fit's host
waits for every step's kernels before queueing the next step's; the sync-free one does not.

    python -m benchmarks.sync_free_recorder [--quick] [--repeats N] [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    add_common_args,
    apply_threads,
    machine,
    machine_line,
    median,
    pct,
    skip_validation,
    step_timer,
    table,
    write_json,
)

ARMS = ("fastai Recorder", "SyncFreeRecorder(every=50)")


def _fit(arm: str, device: str, n_batches: int, epochs: int) -> dict:
    import torch
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.torch_core import set_seed
    from fastcore.basics import noop
    from torch import nn

    from effilab.datasets import ArrayDataset
    from effilab.system import SyncFreeRecorder

    set_seed(0)  # the same shuffles in every run
    g = torch.Generator().manual_seed(0)
    n, bs = 256 * n_batches, 256
    x = torch.randn(n, 256, generator=g)
    y = (x[:, :8].sum(1) > 0).long()
    dls = DataLoaders(DataLoader(ArrayDataset(x, y), bs=bs, shuffle=True, drop_last=True),
                      DataLoader(ArrayDataset(x[:bs], y[:bs]), bs=bs), device=device)
    torch.manual_seed(0)
    layers = [nn.Linear(256, 512), nn.ReLU()] + [m for _ in range(3) for m in (nn.Linear(512, 512), nn.ReLU())]
    model = nn.Sequential(*layers, nn.Linear(512, 2))
    timers, record = step_timer()
    cbs = [*timers, skip_validation()] + ([SyncFreeRecorder(every=50)] if arm == ARMS[1] else [])
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), cbs=cbs)
    learn.logger = noop
    with learn.no_bar():
        learn.fit(epochs, 1e-3)
    if device == "cuda":
        torch.cuda.synchronize()
    return {"train": record["train"][1:], "train_cpu": record["train_cpu"][1:], "step": record["step"],
            "final_loss": float(learn.recorder.losses[-1])}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args(argv)
    apply_threads(args)
    import fastai.callback.progress  # noqa: F401  (learn.no_bar)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    n_batches, epochs = (20, 2) if args.quick else (100, 4)
    runs = {arm: [] for arm in ARMS}
    for r in range(args.repeats):
        for arm in (ARMS if r % 2 == 0 else ARMS[::-1]):  # interleaved, order alternating
            runs[arm].append(_fit(arm, device, n_batches, epochs))
    rows, result = [], {}
    base = None
    for arm in ARMS:
        epoch_s = median([t for run in runs[arm] for t in run["train"]])
        epoch_cpu = median([t for run in runs[arm] for t in run["train_cpu"]])
        step_ms = 1e3 * median([t for run in runs[arm] for t in run["step"]])
        base = base or epoch_s
        result[arm] = {"epoch_s": epoch_s, "epoch_cpu_s": epoch_cpu, "step_ms": step_ms,
                       "final_loss": [run["final_loss"] for run in runs[arm]]}
        rows.append([arm, f"{epoch_s:.3f}", f"{epoch_cpu:.3f}", f"{step_ms:.2f}", pct(epoch_s / base - 1)])
    assert len({tuple(v["final_loss"]) for v in result.values()}) == 1, "the two arms must record the same losses"
    out = {"device": device, "n_batches": n_batches, "epochs": epochs, "repeats": args.repeats, "arms": result}
    path = write_json("sync_free_recorder" + ("_quick" if args.quick else ""), out)
    print(table(["recorder", "epoch s (median)", "epoch CPU s", "step ms (median)", "vs fastai"], rows))
    print(f"\n{n_batches} steps/epoch, {epochs} epochs (the first untimed), {args.repeats} repeats on {device}; "
          f"{machine_line(machine())}\n-> {path}")
    return out


if __name__ == "__main__":
    main()
