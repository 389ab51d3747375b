"""One run on several processes: `effilab bench --nproc N` runs each recipe under `torchrun`.

`fit_distributed(...)` writes what the run needs (task, recipe, run context, settings) to a temporary
folder, starts `torchrun --standalone --nproc_per_node N -m effilab.bench.distributed FOLDER`, and reads
back each rank's `Fit`. Each rank runs `fit_one(..., distributed=True)`: the same Learner, trained inside
`effilab.system.distrib_ctx` (DDP; gloo on CPU cores, NCCL on GPUs), each rank on its shard of every epoch.
The ranks' fits are combined into one: samples forwarded (summed over the ranks inside the fit), steps
and accuracy as every rank has them (DDP steps together; fastai gathers the validation predictions of all
ranks), wall-clock and peak memory the largest, CPU time summed. `--bs` is the batch of each process: N
processes train with N times the batch, and take N times fewer steps.

A technique's own counts come from its telemetry on rank 0: whole-plan counts (InfoBatch, pruning) are
global, per-batch ones (the samples Selective Backprop backpropagates) are rank 0's only.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

__all__ = ["check_nproc", "fit_distributed"]


def check_nproc(nproc) -> None:
    """`nproc` must be a positive int no larger than the GPUs (or, without CUDA, the CPU cores) here."""
    from ..system.launcher import available_devices

    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc must be a positive integer, got {nproc!r}")
    available, what = available_devices()
    if nproc > available:
        raise ValueError(f"--nproc {nproc} is more than the {available} {what} this machine has: use --nproc "
                         f"{available} or fewer (one process per {what[:-1]})")


def _combine(fits: list):
    """One `Fit` from the ranks' fits (rank order)."""
    first = fits[0]
    spends = [f.spend for f in fits]
    peaks = [s.peak_mem_mb for s in spends if s.peak_mem_mb is not None]
    spend = replace(first.spend, wall_s=max(s.wall_s for s in spends), cpu_s=sum(s.cpu_s for s in spends),
                    peak_mem_mb=max(peaks) if peaks else None)
    return replace(first, spend=spend, extra={**first.extra, "nproc": len(fits)})


def fit_distributed(task, recipe, ctx, device: torch.device, model: str, width, target_acc, nproc: int,
                    threads: int | None = None):
    """`fit_one(task, recipe, ctx, device, model, width, target_acc)` on `nproc` processes (see the module)."""
    with tempfile.TemporaryDirectory(prefix="effilab-nproc-") as tmp:
        folder = Path(tmp)
        job = dict(task=task, recipe=recipe, ctx=ctx, device=str(device), model=model, width=width,
                   target_acc=target_acc)
        try:
            (folder / "job.pkl").write_bytes(pickle.dumps(job))
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            raise ValueError(f"recipe {recipe.name!r} cannot run under --nproc: the processes receive it pickled, "
                             f"and {e}. Define its callbacks at module level (importable), not in a notebook "
                             "cell or a lambda") from None
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # the processes import this effilab
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        env["OMP_NUM_THREADS"] = str(threads or 1)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "effilab.bench.distributed", str(folder)]
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        results = [folder / f"rank{r}.pkl" for r in range(nproc)]
        # Every rank wrote its fit before the closing barrier: a process that then aborts while tearing down
        # gloo's threads ("terminate called without an active exception", seen on a loaded machine) lost
        # nothing, and its run is kept.
        if proc.returncode != 0 and not all(p.exists() for p in results):
            raise RuntimeError(f"torchrun with {nproc} processes failed (exit {proc.returncode}):\n"
                               f"{proc.stdout[-4000:]}")
        return _combine([pickle.loads(p.read_bytes()) for p in results])


def _worker(folder: Path) -> None:
    from ..core.distributed import end_worker_process
    from .fit import fit_one

    job = pickle.loads((folder / "job.pkl").read_bytes())
    device = torch.device(job["device"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    fit = fit_one(job["task"], job["recipe"], job["ctx"], device, job["model"], job["width"], job["target_acc"],
                  distributed=True)
    result = folder / f"rank{os.environ['RANK']}.pkl"
    partial = result.with_suffix(".partial")
    partial.write_bytes(pickle.dumps(fit))
    partial.replace(result)  # whole or absent: the launcher keeps a run whose every rank file exists
    end_worker_process()

if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    _worker(Path(sys.argv[1]))
