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

**FSDP2** (`distrib_ctx(learn, fsdp=True)`): `torch.distributed.fsdp.fully_shard` on a one-dimensional
device mesh instead of DDP. It runs on CPUs with gloo (torch 2.14: sharded DTensor parameters, fastai's
optimizers stepping on them, the full state dict gathered at the end), so the two-rank tests exercise it;
on a CPU it only shows the semantics (same results as DDP), not the memory it saves on GPUs.

**Interactions.** Epoch-pruning callbacks (`InfoBatch`, `RandomPrune`) run before the trainer: each
epoch's plan is made on the real loader and this trainer shards it. Their plans must be the same on
every rank: at the start of each fit they take rank 0's `seed` (one built with `seed=None` draws it from
torch's initial seed, which differs between processes).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
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

__all__ = ["FSDP_REFUSED", "CPUSafeDistributedDL", "CPUSafeDistributedTrainer", "FSDPTrainer", "collective_device",
           "distrib_ctx"]


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
        _find_unused_parameters(self.learn, self.accelerator)
        self.learn.model = self.accelerator.prepare(model)
        self.old_dls = list(self.dls)
        self.learn.dls.loaders = [self._wrap_dl(dl) for dl in self.dls]
        if rank_distrib():
            self.learn.logger = noop

    def _wrap_dl(self, dl):
        if isinstance(dl, DistributedDL):
            return dl
        return CPUSafeDistributedDL(dl, device=_model_device(self.learn.model))


def _find_unused_parameters(learn: Learner, accelerator) -> None:
    """DDP told to find unused parameters (`find_unused_parameters=True`) when a callback of the Learner leaves
    some parameters without a gradient in some steps (`leaves_parameters_unused`: stochastic depth's dropped
    blocks); without it DDP waits for their gradients and fails at the next step. It costs a walk of the autograd
    graph per step, so only then."""
    if not any(getattr(cb, "leaves_parameters_unused", False) for cb in learn.cbs):
        return
    from accelerate.utils import DistributedDataParallelKwargs

    if accelerator.ddp_handler is None:
        accelerator.ddp_handler = DistributedDataParallelKwargs()
    accelerator.ddp_handler.find_unused_parameters = True


# Callbacks (by class name: the optim package is not imported here) whose state is per parameter and
# assumes whole tensors, which FSDP2 shards across the ranks.
FSDP_REFUSED = {
    "SAM": "it perturbs each parameter along its gradient normalised over the whole model, from whole tensors",
    "LookSAM": "it keeps each parameter's sharpness direction and normalises over the whole model",
    "EMA": "its averaged copy (torch.optim.swa_utils.AveragedModel) copies the model's parameters whole",
    "SWA": "its averaged copy (torch.optim.swa_utils.AveragedModel) copies the model's parameters whole",
    "LAWA": "it keeps whole copies of the last checkpoints' parameters",
    "LambOptimizer": "fastai's Lamb takes each layer's norm, which on a shard is only that shard's",
    "LarsOptimizer": "fastai's Larc takes each layer's norm, which on a shard is only that shard's",
    "FP8Training": "torchao's float8 layers need their own FSDP2 wiring (float8 all-gather, precomputed scales), "
                   "which is not done here: its emulated layers crash a sharded CPU run",
    "RigL": "its masks, ERK densities and drop/regrow top-k are over whole weight tensors, not shards",
    "SET": "its masks, ERK densities and drop/regrow top-k are over whole weight tensors, not shards",
    "DynamicSparse": "its masks, ERK densities and drop/regrow top-k are over whole weight tensors, not shards",
    "WhitenFirstConv": "it writes the first convolution's whole weight from data patches; initialise before sharding",
    "ResidualGates": "it adds gate parameters after the model was sharded; insert them first "
                     "(effilab.core.init.insert_gates) and train without the callback",
    "ModelGrowth": "it inserts and copies blocks mid-fit, which a sharded model cannot take (as under DDP)",
    "ModelWidening": "it resizes layers mid-fit, which a sharded model cannot take (as under DDP)",
}


class FSDPTrainer(CPUSafeDistributedTrainer):
    """Fully sharded data parallel (FSDP2, `torch.distributed.fsdp.fully_shard`) instead of DDP: each rank
    keeps a shard of every parameter, gradient and optimiser state, and gathers whole parameters only
    around a unit's forward and backward. `blocks`: module classes to shard as units of their own
    (bottom-up, e.g. a transformer block); the root module is always one."""

    def __init__(self, blocks: tuple[type, ...] = (), **accelerator_kwargs):
        super().__init__(False, **accelerator_kwargs)  # no SyncBatchNorm: FSDP2 shards the module as it is
        self.blocks = blocks

    def before_fit(self):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        learn, model = self.learn, self.learn.model
        opt = learn.opt
        # fastai's own flags ("do_wd", "force_train") are set anew by `create_opt`; statistics would be lost.
        if opt is not None and any(set(st) - {"do_wd", "force_train"} for st in opt.state.values()):
            raise ValueError("FSDP2 replaces the model's parameters by sharded ones, and this Learner's optimizer "
                             "already holds state for the old ones: start the fit with a fresh optimizer "
                             "(`learn.fit(..., reset_opt=True)` or `learn.opt = None` before the context)")
        # The architecture without storage, to hand back a plain model (with the trained weights) at the end.
        self.plain = copy.deepcopy(model).to("meta")
        mesh = init_device_mesh(_model_device(model).type, (num_distrib(),))
        for module in reversed(list(model.modules())):
            if module is not model and isinstance(module, self.blocks):
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        # fastai built the optimizer on the parameters fully_shard has just replaced: build it again on the
        # sharded ones, with the hyper-parameters `fit` set.
        if opt is not None:
            hypers = [dict(h) for h in opt.hypers]
            learn.create_opt()
            for new, old in zip(learn.opt.hypers, hypers):
                new.update(old)
        self.old_dls = list(self.dls)
        self.learn.dls.loaders = [self._wrap_dl(dl) for dl in self.dls]
        if rank_distrib():
            self.learn.logger = noop

    def after_fit(self):
        self.learn.dls.loaders = self.old_dls
        _unshard(self.learn, self)


def _unshard(learn: Learner, trainer: FSDPTrainer) -> None:
    """Give the Learner a plain model with the whole trained weights (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    plain = getattr(trainer, "plain", None)
    if plain is None or not isinstance(learn.model, FSDPModule):
        return
    state = get_model_state_dict(learn.model, options=StateDictOptions(full_state_dict=True))
    plain.load_state_dict(state, assign=True)
    learn.model, trainer.plain = plain, None
    learn.opt = None  # built on the shards: the next fit builds one on the plain parameters


def _unwrap(learn: Learner, trainer: CPUSafeDistributedTrainer) -> None:
    # After an exception inside `fit` fastai runs no `after_fit`: put the plain model and loaders back.
    if isinstance(learn.model, DistributedDataParallel):
        learn.model = learn.model.module
    if isinstance(trainer, FSDPTrainer):
        _unshard(learn, trainer)
    old = getattr(trainer, "old_dls", None)
    if old is not None and any(isinstance(dl, DistributedDL) for dl in learn.dls.loaders):
        learn.dls.loaders = old


def _fsdp_blocks(fsdp) -> tuple[type, ...] | None:
    if fsdp is False or fsdp is None:
        return None
    if fsdp is True:
        return ()
    blocks = tuple(fsdp) if isinstance(fsdp, Iterable) else (fsdp,)
    if not blocks or not all(isinstance(b, type) and issubclass(b, nn.Module) for b in blocks):
        raise TypeError(f"fsdp must be True, False or nn.Module classes to shard as units (e.g. your transformer "
                        f"block), got {fsdp!r}")
    return blocks


@contextmanager
def distrib_ctx(learn: Learner, sync_bn: bool = True, fsdp=False, **accelerator_kwargs):
    """Train `learn` with distributed data parallel inside the context (one process per device,
    started by `torchrun` or `effilab.system.launch`); does nothing in a single process.

    `sync_bn` converts BatchNorm to `SyncBatchNorm` (accelerators only); `accelerator_kwargs` go to
    accelerate's `Accelerator` (`cpu=True` is implied without CUDA). Like fastai's `distrib_ctx`,
    ranks other than 0 show no progress bar and log nothing; both come back when the context ends.

    `fsdp=True` shards the model with FSDP2 (`torch.distributed.fsdp.fully_shard`, gloo on CPUs
    included) instead of replicating it: parameters, gradients and optimiser state take 1/N of the memory
    per rank, at the cost of gathering each unit's parameters around its forward and backward. The root
    module is one unit; `fsdp=(Block, ...)` also makes every submodule of those classes one (bottom-up), so
    that only one block's whole parameters are held at a time. Within the context `learn.model` is the
    sharded module (its state dict holds DTensors); at its end `learn.model` is a plain module with the
    trained weights again, and the optimiser (built on the shards) is dropped: the next fit builds a new one.
    Techniques that keep whole per-parameter state (`FSDP_REFUSED`: SAM, LookSAM, EMA, SWA, LAWA, fastai's
    Lamb and Larc) are refused before anything starts. BatchNorm statistics stay per rank.
    """
    blocks = _fsdp_blocks(fsdp)
    if blocks is not None:
        refused = [f"{type(cb).__name__}: {FSDP_REFUSED[type(cb).__name__]}" for cb in learn.cbs
                   if type(cb).__name__ in FSDP_REFUSED]
        if refused:
            raise ValueError("distrib_ctx(fsdp=...) cannot shard a model that these callbacks hold whole state "
                             "for:\n  " + "\n  ".join(refused) + "\nUse DDP (fsdp=False) with them, or remove them.")
    if num_distrib() <= 1:
        yield learn
        return
    if "cpu" not in accelerator_kwargs and not torch.cuda.is_available():
        accelerator_kwargs["cpu"] = True
    if blocks is not None:
        trainer = FSDPTrainer(blocks, **accelerator_kwargs)
    else:
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
