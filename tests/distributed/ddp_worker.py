"""One rank of a two-process DDP test (gloo, CPU), started by `torchrun` from test_ddp.py.

    torchrun --nproc_per_node 2 tests/distributed/ddp_worker.py SCENARIO OUT_DIR

Each rank writes what it saw to OUT_DIR/SCENARIO_rank{R}.pt; the test compares the ranks' files.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from effilab.core.distributed import end_worker_process
from effilab.core.infobatch import IndexedDataset, InfoBatchPruner, InfoBatchSampler, ScoreTable

BIG = 2**24


def _blobs(n: int, d: int, classes: int):
    # Same data on every rank: its own generator, not the (per-rank) global one.
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(classes, d, generator=g) * 2.0
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, d, generator=g)
    return x, y


def plain(rank: int, world: int) -> dict:
    """InfoBatchPruner + InfoBatchSampler + DistributedDataParallel in a plain PyTorch loop."""
    n, epochs = 301, 4  # odd n: the shards need one padding sample
    x, y = _blobs(n, 8, 2)
    pruner = InfoBatchPruner(n, num_epochs=epochs, ratio=0.5, delta=0.75, seed=123)
    sampler = InfoBatchSampler(pruner)
    loader = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=32, sampler=sampler)
    torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    out = {"epochs": []}
    for _ in range(epochs):
        n_batches = len(loader)  # plans the epoch (and merges the previous epoch's scores)
        plan = pruner.plan
        rec = {"epoch": plan.epoch, "n_batches": n_batches, "plan": plan.indices.tolist(),
               "weights": plan.weights.clone(), "threshold": float(plan.threshold),
               "scores_start": pruner.table.scores.clone()}
        idxs, losses = [], []
        for idx, (xb, yb) in loader:
            per_sample = F.cross_entropy(model(xb), yb, reduction="none")
            loss = pruner.weighted_loss(per_sample, idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            idxs.append(idx)
            losses.append(per_sample.detach())
        rec["shard"] = torch.cat(idxs).tolist()
        rec["losses"] = torch.cat(losses)
        rec["touched"] = pruner.table.touched.nonzero().squeeze(1).tolist()  # before the merge
        out["epochs"].append(rec)
    pruner.table.sync()
    out["scores_end"] = pruner.table.scores.clone()
    out["params"] = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    return out


def fastai(rank: int, world: int) -> dict:
    """A fastai Learner with InfoBatch(0.5) under effilab.system.distrib_ctx."""
    from fastai.callback.core import Callback
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader as FastaiDL
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy

    from effilab.data import InfoBatch
    from effilab.system import CPUSafeDistributedDL, distrib_ctx

    class Spy(Callback):
        """Records each training epoch's plan and the dataset indices this rank forwarded."""

        order = 50

        def __init__(self, ib):
            self.ib = ib

        def before_fit(self):
            self.plans, self.shards, self.loader_types = [], [], []

        def before_train(self):
            self.plans.append(self.ib.plan.indices.tolist())
            self.shards.append([])
            self.loader_types.append(type(self.learn.dl).__name__)
            assert isinstance(self.learn.dl, CPUSafeDistributedDL)

        def after_batch(self):
            if self.training:
                self.shards[-1] += self.ib.plan_dl.batch_idx.tolist()

    x, y = _blobs(1000, 10, 3)
    x, y, xv, yv = x[:800], y[:800], x[800:], y[800:]
    train = FastaiDL(TensorDataset(x, y), bs=32, shuffle=True, drop_last=False, device="cpu")
    valid = FastaiDL(TensorDataset(xv, yv), bs=64, device="cpu")
    # Seeded per rank, as launch scripts often do: InfoBatch(seed=None) then draws a different seed on
    # each rank, and the model starts from different weights; the trainer must reconcile both.
    torch.manual_seed(1000 + rank)
    model = nn.Sequential(nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3))
    ib = InfoBatch(0.5)
    spy = Spy(ib)
    learn = Learner(DataLoaders(train, valid, device="cpu"), model, loss_func=CrossEntropyLossFlat(),
                    metrics=accuracy, cbs=[ib, spy], lr=3e-3)
    seed_before = ib.seed
    with distrib_ctx(learn, cpu=True):
        in_ctx = [type(cb).__name__ for cb in learn.cbs]
        learn.fit(4)
    tele = learn.telemetry
    out = {
        "seed_before": seed_before, "seed_after": ib.seed, "in_ctx": in_ctx,
        "cbs_after": [type(cb).__name__ for cb in learn.cbs],
        "model_after": type(learn.model).__name__,
        "loaders_after": [type(dl).__name__ for dl in learn.dls.loaders],
        "epoch_records": tele.records("infobatch", "epoch"),
        "sample_records": tele.records("infobatch", "samples"),
        "plans": spy.plans, "shards": spy.shards, "loader_types": spy.loader_types,
        "recorder": [list(map(float, v)) for v in learn.recorder.values],
        "scores": ib.pruner.table.scores.clone(),
        "params": {k: v.detach().clone() for k, v in learn.model.state_dict().items()},
    }

    class Boom(Callback):
        def after_batch(self):
            if self.training and self.iter == 1:
                raise RuntimeError("boom")

    # fastai runs no after_fit after an exception: the context must still unwrap model and loaders.
    try:
        with distrib_ctx(learn, cpu=True):
            learn.fit(1, cbs=Boom())
    except RuntimeError as e:
        out["crash"] = str(e)
    out["crash_model"] = type(learn.model).__name__
    out["crash_loaders"] = [type(dl).__name__ for dl in learn.dls.loaders]
    out["crash_cbs"] = [type(cb).__name__ for cb in learn.cbs]
    return out


def bigindex(rank: int, world: int) -> dict:
    """Score-table merge and index broadcast with indices that float32 cannot represent."""
    from effilab.system.distributed import CPUSafeDistributedDL

    table = ScoreTable(BIG + 10, momentum=0.5)  # EMA mode also tracks `seen`; first losses are taken as is
    if rank == 0:
        table.update(torch.tensor([BIG + 3, BIG + 9]), torch.tensor([3.25, 1.5]))
    else:
        table.update(torch.tensor([BIG + 7, BIG + 9]), torch.tensor([7.5, 2.5]))
    table.sync()
    changed = (table.scores != 1.0).nonzero().squeeze(1)
    mine = [BIG + 7, BIG + 3, BIG + 9, 5] if rank == 0 else [0, 1, 2, 3]
    return {
        "n": table.scores.numel(), "changed": changed.tolist(), "values": table.scores[changed].tolist(),
        "seen": table.seen.nonzero().squeeze(1).tolist(),
        # `_broadcast` does not use the loader's state: rank 0's list must reach every rank exactly.
        "broadcast": CPUSafeDistributedDL._broadcast(None, mine, 0),
    }


def techniques(rank: int, world: int) -> dict:
    """Every stateful registered technique, one after the other, in a two-epoch fit under distrib_ctx."""
    from effilab.registry import all_techniques
    from effilab.system import distrib_ctx
    from tests.conftest import make_learner

    out = {}
    for name, tech in sorted(all_techniques().items()):
        if not tech.stateful:
            continue
        cb = tech.make()
        learn = make_learner([cb], n=384, task=tech.task)
        with distrib_ctx(learn, cpu=True):
            learn.fit(3, 1e-2)
        tele = learn.telemetry
        out[name] = {
            "telemetry": {s: tele.records(s, "epoch") for s in tele.sources},
            "state": cb.state_dict(),
            "params": {k: v.detach().clone() for k, v in learn.model.state_dict().items()},
        }
    return out


def fsdp(rank: int, world: int) -> dict:
    """The same fit with InfoBatch under DDP and under FSDP2 (`distrib_ctx(fsdp=...)`), a refusal, a crash."""
    from fastai.callback.core import Callback

    from effilab.data import InfoBatch
    from effilab.optim.averaging import EMA
    from effilab.system import distrib_ctx
    from tests.conftest import make_learner

    class Inside(Callback):
        def before_fit(self):
            self.seen = None

        def after_batch(self):
            if self.training and self.seen is None:
                w = next(self.learn.model.parameters())
                from torch.distributed.fsdp import FSDPModule

                units = sum(isinstance(m, FSDPModule) for m in self.learn.model.modules())
                self.seen = {"model": type(self.learn.model).__name__, "param": type(w).__name__, "units": units,
                             "local_shape": tuple(getattr(w, "to_local", lambda: w)().shape)}

    out = {}
    for kind, option in (("ddp", False), ("fsdp", True), ("fsdp_blocks", (nn.Linear,))):
        ib, inside = InfoBatch(0.5, seed=3), Inside()
        # No BatchNorm: DDP broadcasts rank 0's running statistics, FSDP2 keeps each rank's.
        learn = make_learner([ib, inside], n=384, batchnorm=False)
        with distrib_ctx(learn, fsdp=option):
            learn.fit(3, 1e-2)
        out[kind] = {"inside": inside.seen, "model_after": type(learn.model).__name__,
                     "param_after": type(next(learn.model.parameters())).__name__,
                     "epochs": learn.telemetry.records("infobatch", "epoch"),
                     "values": [list(map(float, v)) for v in learn.recorder.values],
                     "params": {k: v.detach().clone() for k, v in learn.model.state_dict().items()}}
        if kind == "fsdp":
            learn.fit(1, 1e-2)  # after the context: a plain single-process fit on the plain model
            out[kind]["fit_after"] = len(learn.recorder.values)

    try:
        with distrib_ctx(make_learner([EMA(decay=0.9)]), fsdp=True):
            pass
    except ValueError as e:
        out["refused"] = str(e)

    class Boom(Callback):
        def after_batch(self):
            if self.training and self.iter == 1:
                raise RuntimeError("boom")

    learn = make_learner([], n=128, batchnorm=False)
    try:
        with distrib_ctx(learn, fsdp=True):
            learn.fit(1, cbs=Boom())
    except RuntimeError as e:
        out["crash"] = str(e)
    out["crash_model"] = type(learn.model).__name__
    out["crash_loaders"] = [type(dl).__name__ for dl in learn.dls.loaders]
    return out


def fsdp_techniques(rank: int, world: int) -> dict:
    """Every registered technique under `distrib_ctx(fsdp=True)`: refused by name, or a two-epoch fit."""
    from effilab.registry import all_techniques
    from effilab.system import distrib_ctx
    from tests.conftest import make_learner

    out = {}
    for name, tech in sorted(all_techniques().items()):
        cb = tech.make()
        learn = make_learner([cb], n=256, task=tech.task, batchnorm=False)
        try:
            with distrib_ctx(learn, fsdp=True):
                learn.fit(2, 1e-2)
        except ValueError as e:
            out[name] = {"refused": str(e)}
            continue
        tele = learn.telemetry
        out[name] = {"telemetry": {s: tele.records(s, "epoch") for s in tele.sources if s != "system"},
                     "values": [list(map(float, v[:2])) for v in learn.recorder.values],
                     "model_after": type(learn.model).__name__,
                     "params": {k: v.detach().clone() for k, v in learn.model.state_dict().items()}}
    return out


SCENARIOS = {"plain": plain, "fastai": fastai, "bigindex": bigindex, "techniques": techniques, "fsdp": fsdp,
             "fsdp_techniques": fsdp_techniques}


def main() -> None:
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    accelerate_inits = ("fastai", "techniques", "fsdp", "fsdp_techniques")  # accelerate sets those up
    if not dist.is_initialized() and scenario not in accelerate_inits:
        dist.init_process_group("gloo")
    result = SCENARIOS[scenario](int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    result["backend"] = dist.get_backend()
    torch.save(result, out_dir / f"{scenario}_rank{dist.get_rank()}.pt")
    end_worker_process()


if __name__ == "__main__":
    main()
