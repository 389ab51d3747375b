"""launcher: several training processes started from a notebook cell, through Accelerate's `notebook_launcher`."""

from __future__ import annotations

import functools
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["available_devices", "launch"]


def available_devices() -> tuple[int, str]:
    """How many processes this machine can give a device each: GPUs where CUDA is available, else CPU cores
    (those this process may run on). Asks without initialising CUDA."""
    if torch.cuda.is_available():
        return torch.cuda.device_count(), "GPUs"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores, "CPU cores"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _saving_result(fn: Callable, out: Path) -> Callable:
    """`fn`, run in one process of the launch, saving what it returns where the launching process reads it."""

    @functools.wraps(fn)
    def run(*args):
        torch.save(fn(*args), out / f"rank{os.environ['RANK']}.pt")
    return run


def launch(fn: Callable, *args, num_processes: int = 2, mixed_precision: str = "no", port: int | None = None) -> list:
    """Run `fn(*args)` in `num_processes` processes, one per GPU (or, without CUDA, on CPU cores with the
    gloo backend), from a notebook cell; return what each process returned, in rank order.

    Over Hugging Face Accelerate's `notebook_launcher`, which forks the notebook's process, so `fn` and
    what it uses need not be importable or picklable. Inside `fn`, build the Learner and train it within
    `effilab.system.distrib_ctx(learn)`::

        def train():
            learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), cbs=InfoBatch(0.5, seed=0))
            with distrib_ctx(learn):
                learn.fit(4)
            return learn.recorder.values

        values_per_rank = launch(train, num_processes=2)

    Forked processes cannot use a CUDA context made before the fork: call `launch` before anything in the
    notebook touches CUDA (creating CUDA tensors, moving a model to the GPU, and importing
    `fastai.vision.all` on a GPU machine all do). `launch` checks this first and says what to do.
    """
    if not callable(fn):
        raise TypeError(f"fn must be the training function to run in each process, got {fn!r}")
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise TypeError(f"num_processes must be a positive int, got {num_processes!r}")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536):
        raise TypeError(f"port must be None (a free port is chosen) or a TCP port number, got {port!r}")
    if torch.cuda.is_initialized():
        raise RuntimeError(
            "launch: CUDA is already initialised in this process, and the processes launch() forks cannot use "
            "it ('Cannot re-initialize CUDA in forked subprocess'). Something in the notebook touched CUDA "
            "before: a tensor or model moved to the GPU, torch.cuda calls, or `from fastai.vision.all import *` "
            "on a GPU machine. Restart the kernel and call launch() before any of that: import fastai's "
            "submodules you need (fastai.learner, fastai.data.core, ...) and create the Learner inside the "
            "training function; or run the training as a script with `torchrun --nproc_per_node N`.")
    available, what = available_devices()
    if num_processes > available:
        raise ValueError(f"num_processes={num_processes} is more than the {available} {what} this machine has: "
                         f"use num_processes <= {available} (one process per {what[:-1]})")
    if num_processes == 1:
        return [fn(*args)]
    from accelerate import notebook_launcher  # imports torch.distributed's launcher: only when launching

    with tempfile.TemporaryDirectory(prefix="effilab-launch-") as tmp:
        out = Path(tmp)
        notebook_launcher(_saving_result(fn, out), args, num_processes=num_processes, mixed_precision=mixed_precision,
                          use_port=str(port or _free_port()))
        return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(num_processes)]
