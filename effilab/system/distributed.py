"""Distributed data parallel for the fastai Learner, on GPUs and on CPUs (gloo).

**What it does.** `distrib_ctx(learn, ...)` is fastai's `Learner.distrib_ctx` made to work with any
process-group backend: inside the context, `fit` wraps the model in `DistributedDataParallel` (through
accelerate's `Accelerator`) and every loader in a `DistributedDL` that gives each rank a disjoint,
equal-length shard of the epoch. Launch one process per device::

    # train.py, run with: torchrun --nproc_per_node 2 train.py
    from effilab.system import distrib_ctx
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), cbs=InfoBatch(0.5))
    with distrib_ctx(learn):  # cpu=True is implied where there is no GPU
        learn.fit(4)

Outside a distributed launch (`WORLD_SIZE` unset or 1) the context changes nothing.

**Why not fastai's own.** fastai 2.8's `DistributedDL._broadcast` (how rank 0's epoch order reaches
the others) puts its tensor on `.cuda()`, which NCCL needs and a CPU/gloo run does not have. Here
`CPUSafeDistributedDL` broadcasts on the process group's device (the current CUDA device for NCCL, the
CPU otherwise) and `distrib_ctx` installs it through its own trainer callback: fastai is not patched,
`learn.distrib_ctx` keeps fastai's behaviour.

**Accelerate on CPU** (accelerate 1.15, found by reading `accelerate/state.py` and running it):
- `Accelerator()` under `torchrun` on a machine without CUDA selects *no* distributed mode unless
  `cpu=True`; the model is then not wrapped and fastai's trainer fails at the end of `fit`. With
  `cpu=True` it selects `MULTI_CPU` and initialises the process group itself with the `gloo` backend
  (or `mpi` when torch was built with MPI). `distrib_ctx` therefore passes `cpu=True` when CUDA is
  unavailable and `cpu` was not given. An already initialised process group is reused as is.
- `MULTI_CPU` reads `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE` (torchrun sets them) and, if
  `OMP_NUM_THREADS` is unset, sets torch's thread count to physical cores / local processes (with a
  warning); torchrun sets `OMP_NUM_THREADS=1` unless you do.
- `nn.SyncBatchNorm` only runs on accelerators (on CPU its forward raises), so `sync_bn` converts
  BatchNorm layers only when the model is not on the CPU; on CPU each rank normalises with its own
  batch statistics, as plain DDP does.

**Interactions.** Epoch-pruning callbacks (`InfoBatch`, `RandomPrune`) run before the trainer: each
epoch's plan is made on the real loader and this trainer shards it. Their plans must be the same on
every rank: at the start of each fit they take rank 0's `seed` (one built with `seed=None` draws it from
torch's initial seed, which differs between processes).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
from fastai.callback.progress import ProgressCallback
from fastai.distributed import DistributedDL, DistributedTrainer
from fastai.learner import Learner
from fastai.torch_core import num_distrib, rank_distrib
from fastcore.basics import noop
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..core.distributed import collective_device

__all__ = ["CPUSafeDistributedDL", "CPUSafeDistributedTrainer", "collective_device", "distrib_ctx"]


class CPUSafeDistributedDL(DistributedDL):
    """fastai's `DistributedDL` whose epoch-order broadcast runs on any backend (gloo on CPU included).

    Indices travel as int64, so they are exact for any dataset size.
    """

    def _broadcast(self, t, rank):
        t = torch.as_tensor(t, dtype=torch.int64).to(collective_device())
        dist.broadcast(t, rank)
        return t.cpu().tolist()  # sync-ok: once per epoch, the loader needs host indices


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return torch.device("cpu") if p is None else p.device


class CPUSafeDistributedTrainer(DistributedTrainer):
    """fastai's `DistributedTrainer` with `CPUSafeDistributedDL` loaders, `SyncBatchNorm` only where it
    can run."""

    def before_fit(self):
        # fastai's before_fit, except that SyncBatchNorm (which raises on CPU tensors) is used only
        # off the CPU.
        model = self.learn.model
        if self.sync_bn and _model_device(model).type != "cpu":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.learn.model = self.accelerator.prepare(model)
        self.old_dls = list(self.dls)
        self.learn.dls.loaders = [self._wrap_dl(dl) for dl in self.dls]
        if rank_distrib():
            self.learn.logger = noop

    def _wrap_dl(self, dl):
        if isinstance(dl, DistributedDL):
            return dl
        return CPUSafeDistributedDL(dl, device=self.learn.model.device)


def _unwrap(learn: Learner, trainer: CPUSafeDistributedTrainer) -> None:
    # After an exception inside `fit` fastai runs no `after_fit`: put the plain model and loaders back.
    if isinstance(learn.model, DistributedDataParallel):
        learn.model = learn.model.module
    old = getattr(trainer, "old_dls", None)
    if old is not None and any(isinstance(dl, DistributedDL) for dl in learn.dls.loaders):
        learn.dls.loaders = old


@contextmanager
def distrib_ctx(learn: Learner, sync_bn: bool = True, **accelerator_kwargs):
    """Train `learn` with distributed data parallel inside the context (one process per device,
    started by `torchrun`); does nothing in a single process.

    `sync_bn` converts BatchNorm to `SyncBatchNorm` (accelerators only); `accelerator_kwargs` go to
    accelerate's `Accelerator` (`cpu=True` is implied without CUDA). Like fastai's `distrib_ctx`,
    ranks other than 0 show no progress bar and log nothing; both come back when the context ends.
    """
    if num_distrib() <= 1:
        yield learn
        return
    if "cpu" not in accelerator_kwargs and not torch.cuda.is_available():
        accelerator_kwargs["cpu"] = True
    trainer = CPUSafeDistributedTrainer(sync_bn, **accelerator_kwargs)
    progress = [cb for cb in learn.cbs if isinstance(cb, ProgressCallback)] if rank_distrib() else []
    logger = learn.logger
    learn.add_cb(trainer)
    for cb in progress:
        learn.remove_cb(cb)
    try:
        yield learn
    finally:
        learn.remove_cb(trainer)
        _unwrap(learn, trainer)
        learn.logger = logger
        for cb in progress:
            learn.add_cb(cb)
