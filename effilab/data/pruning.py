"""Per-epoch data pruning for the fastai Learner: a training DataLoader that follows an epoch plan, the
callback base that InfoBatch and the Random* baseline share, and the weighted loss of plans with
per-sample weights (InfoBatch, importance sampling, static pruning)."""

from __future__ import annotations

import warnings
from operator import attrgetter

import torch
from fastai.data.core import TfmdDL
from fastai.data.load import DataLoader, _FakeLoader
from fastai.torch_core import find_bs
from fastcore.xtras import chunked

from ..callback import EffilabCallback, per_sample_loss_parts
from ..core.distributed import all_reduce_sum, broadcast_from_rank0
from ..core.infobatch import EpochPlan, ScoreTable

__all__ = ["EpochPruningCallback", "PlanDL", "ScoredPlanCallback", "WeightedLoss", "WeightedPlanCallback"]


def _unwrap_distributed(dl):
    # fastai's DistributedDL (and effilab's subclass) wrap the real loader in `.dl`; the plan is made on
    # the real one and the distributed wrapper then shards the plan.
    try:
        from fastai.distributed import DistributedDL
    except ImportError:
        return dl
    return dl.dl if isinstance(dl, DistributedDL) else dl


class PlanDL(TfmdDL):
    """The training loader of one epoch: `dl`'s items at `indices`, in that order, with `dl`'s
    transforms, workers and device.

    Each batch travels from the workers with its sample indices; they are taken off in the main
    process (`batch_idx`, on the batch's device) before the Learner sees the batch, so the batch keeps
    its usual structure.
    """

    def __init__(self, dl: DataLoader, indices: list[int]):
        self.dl, self.idxs, self.n = dl, indices, len(indices)
        self.bs, self.drop_last, self.dataset, fake, self.num_workers, self.offs, self.pin_memory = attrgetter(
            "bs", "drop_last", "dataset", "fake_l", "num_workers", "offs", "pin_memory")(dl)
        self.device = dl.device
        self.batch_idx: torch.Tensor | None = None
        self.fake_l = _FakeLoader(self, fake.pin_memory, fake.num_workers, fake.timeout,
                                  persistent_workers=fake.persistent_workers,
                                  pin_memory_device=fake.pin_memory_device)
        self.fake_l.generator = fake.generator  # a seeded loader keeps its worker seeds off the global RNG

    def get_idxs(self):
        return self.idxs

    def randomize(self):
        pass  # the plan is already shuffled by its own generator

    def before_iter(self):
        self.dl.before_iter()

    def after_iter(self):
        self.dl.after_iter()

    def create_batches(self, samps):
        items = ((s, self.dl.do_item(s)) for s in samps)
        for chunk in chunked((it for it in items if it[1] is not None), self.bs, self.drop_last):
            idx, chunk_items = zip(*chunk)
            yield self.dl.do_batch(list(chunk_items)), torch.tensor(idx)

    def after_batch(self, b):
        b, self.batch_idx = b
        return self.dl.after_batch(b)

    def to_detach(self, b, cpu=True, gather=True):
        return self.dl.to_detach(b, cpu, gather)


class EpochPruningCallback(EffilabCallback):
    """Trains each epoch on `make_plan(epoch)`; counts samples; writes per-epoch telemetry.

    Subclasses implement `make_plan`. Runs before fastai's `DistributedTrainer` (which then shards the
    plan) and before `MixUp` (which then wraps the loss). Inactive during `lr_find` and validation.
    """

    order = -5
    telemetry_name = "pruning"

    def __init__(self, delta: float, seed: int | None):
        # Seeded once, from the run's seed unless given: reading torch's initial seed changes nothing.
        self.delta = delta
        self.seed = int(torch.initial_seed() % 2**63) if seed is None else int(seed)
        self.fit_count = 0
        self.forwarded = 0
        self.full_total = 0  # what full data would have forwarded over the same epochs
        self.active = False
        self.plan: EpochPlan | None = None
        self.plan_dl: PlanDL | None = None

    # -- for subclasses
    def make_plan(self, epoch: int) -> EpochPlan:
        raise NotImplementedError

    def setup(self, n_samples: int) -> None:
        """Called before the first epoch of each fit with the size of the training set."""

    # -- events
    def before_fit(self):
        self._deactivate()
        self._trained = False
        self.plan = None

    def before_train(self):
        self._deactivate()
        if hasattr(self.learn, "lr_finder"):
            return
        base = _unwrap_distributed(self.learn.dl)
        if not isinstance(base, DataLoader):
            raise TypeError(f"{type(self).__name__} needs fastai DataLoaders (got a {type(base).__name__} as the "
                            "training loader): build them with DataLoaders.from_dsets / from a DataBlock, or "
                            "use effilab.core's InfoBatchSampler in a plain PyTorch loop")
        if not base.indexed or base.n is None:
            raise TypeError(f"{type(self).__name__} needs an indexable training set with a length (map-style); "
                            f"{type(base.dataset).__name__} is not: it must know which samples it prunes")
        if not self._trained:
            # Every rank must draw the same plans; a seed taken from torch's initial seed differs
            # between processes, so rank 0's wins.
            (self.seed,) = broadcast_from_rank0([self.seed])
            self.setup(base.n)
            self._trained = True
        self.plan = self.make_plan(self.learn.epoch)
        summary = self.plan.summary()
        # What the full-data loader would forward this epoch (it drops the last partial batch too).
        full = len(base) * base.bs if base.drop_last else base.n
        self.telemetry.record(self.telemetry_name, "epoch", fit=self.fit_count, total_epochs=self.learn.n_epoch,
                              n_samples=base.n, full_epoch=full, **summary)
        self.full_total += full
        # A loader that takes a plan as a device tensor (effilab.system.DeviceDataLoader) gathers its batches
        # on the device; any other fastai loader follows it through host indices.
        follow_plan = getattr(base, "follow_plan", None)
        self.plan_dl = self.learn.dl = (follow_plan(self.plan.indices) if follow_plan is not None else
                                        PlanDL(base, self.plan.indices.tolist()))  # sync-ok: once per epoch
        self.epoch_forwarded = 0
        self.active = True

    def after_batch(self):
        if self.active and self.training:
            n = find_bs(self.learn.yb)
            self.epoch_forwarded += n
            self.forwarded += n

    def after_train(self):
        if not self.active:
            return
        # Under DDP each rank forwarded its shard: the telemetry speaks of the whole run.
        (epoch_forwarded,) = all_reduce_sum([self.epoch_forwarded])
        self.forwarded += epoch_forwarded - self.epoch_forwarded
        self.telemetry.record(self.telemetry_name, "samples", fit=self.fit_count, epoch=self.learn.epoch,
                              forwarded=epoch_forwarded, forwarded_total=self.forwarded,
                              full_total=self.full_total)
        self._deactivate()

    def after_cancel_train(self):
        self._deactivate()

    def after_fit(self):
        self._deactivate()
        if self._trained:
            self.fit_count += 1
        self._trained = False

    # -- helpers
    def _deactivate(self):
        self.active = False
        self.plan_dl = None  # never pickle a DataLoader with the Learner

    def _warn(self, msg: str):
        warnings.warn(f"{type(self).__name__}: {msg}", stacklevel=2)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "fit_count": self.fit_count, "forwarded": self.forwarded,
                "full_total": self.full_total}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.fit_count, self.forwarded = state["seed"], state["fit_count"], state["forwarded"]
        self.full_total = state["full_total"]


class WeightedPlanCallback(EpochPruningCallback):
    """An epoch-plan callback whose training loss is weighted per sample (`WeightedLoss`).

    Subclasses implement `weigh(losses, pred, *yb)`, which returns each training batch's loss weights
    (device ops only), and `record(scores)`, which receives once per training batch each sample's loss
    as trained on: its own-label loss, or with fastai's `MixUp`/`CutMix` (which call the loss twice, with
    the partner's labels then the sample's own, and lerp the two) the mixed loss. The reported training
    loss is the weight-normalised mean.
    """

    def __init__(self, delta: float, seed: int | None):
        super().__init__(delta, seed)
        self._wrapper: WeightedLoss | None = None
        self._calls: list | None = None  # this batch's (sums, counts, weights), open from after_pred to after_loss

    def weigh(self, losses: torch.Tensor, pred, *yb) -> torch.Tensor:
        raise NotImplementedError

    def record(self, scores: torch.Tensor) -> None:
        """This training batch's per-sample losses (detached), once per batch."""

    @property
    def weighs_loss(self) -> bool:
        """Whether this fit's training batches go through `weigh` (the loss is wrapped)."""
        return True

    def before_train(self):
        super().before_train()
        if self.active and self.weighs_loss:
            self._unwrap()
            self._wrapper = self.learn.loss_func = WeightedLoss(self.learn.loss_func, self)

    def after_pred(self):
        if self.active and self.training:
            self._calls = []

    def after_loss(self):
        calls, self._calls = self._calls, None
        if calls:
            scores, weights, counts = self._mixed(calls)
            self.record(scores)
            if self._wrapper is not None and self._wrapper.base_reduction == "mean":
                # the weight-normalised mean estimates the full-data loss (kept samples are enriched in hard ones)
                self.learn.loss = ((scores * counts * weights).sum() / (counts * weights).sum()).detach()

    def after_cancel_batch(self):
        self._calls = None

    def _mixed(self, calls):
        """Per-sample (loss trained on, weight, element count) from this batch's loss calls."""
        (sums, counts, weights), *rest = calls
        scores = sums / counts.clamp_min(1)
        if not rest:
            return scores, weights, counts
        from fastai.callback.mixup import MixHandler

        mixer = next((cb for cb in self.learn.cbs if isinstance(cb, MixHandler)), None)
        if mixer is None or len(rest) != 1:
            raise RuntimeError(f"{type(self).__name__}: the loss was called {len(calls)} times in one training batch; "
                               "effilab knows how to combine fastai's MixUp/CutMix's two calls only (partner "
                               "labels, then own labels)")
        own_sums, own_counts, _ = rest[0]
        lam = mixer.lam.to(scores.dtype).reshape(-1) if torch.is_tensor(mixer.lam) else mixer.lam
        return torch.lerp(scores, own_sums / own_counts.clamp_min(1), lam), weights, own_counts

    def _unwrap(self):
        wrapper, lf = self._wrapper, self.learn.loss_func
        if wrapper is None:
            return
        if lf is wrapper:
            self.learn.loss_func = wrapper.loss_func
        else:  # a MixUp/CutMix on top restores its saved loss after this callback's handler: unwrap that one
            for cb in self.learn.cbs:
                if getattr(cb, "old_lf", None) is wrapper:
                    cb.old_lf = wrapper.loss_func
        self._wrapper = None

    def _deactivate(self):
        if getattr(self, "learn", None) is not None:
            self._unwrap()
        self._calls = None
        super()._deactivate()

    def after_cancel_fit(self):
        self._deactivate()


class ScoredPlanCallback(WeightedPlanCallback):
    """A `WeightedPlanCallback` that keeps every training sample's latest loss (or its EMA with
    `momentum`) in a device-resident `ScoreTable` across epochs and fits: written once per batch in
    `record`, merged across ranks at each epoch end, carried by checkpoints. `scored` says whether the
    table holds losses yet (one training epoch done, in this or an earlier fit)."""

    def __init__(self, delta: float, seed: int | None, momentum: float | None):
        if momentum is not None and not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be None or in [0, 1), got {momentum}")
        super().__init__(delta, seed)
        self.momentum = momentum
        self.table: ScoreTable | None = None
        self.scored = False

    def setup_table(self, n_samples: int) -> None:
        """A fresh table for a new (or resized) training set; else the kept one, on the model's device."""
        device = next(self.learn.model.parameters()).device
        if self.table is not None and self.table.n != n_samples:
            self._warn(f"the training set changed size ({self.table.n} -> {n_samples} samples): "
                       "starting a fresh score table")
            self.table = None
        if self.table is None:
            self.table, self.scored = ScoreTable(n_samples, device, self.momentum), False
        else:
            self.table.to(device)

    def record(self, scores: torch.Tensor) -> None:
        """Write this batch's per-sample losses into the table."""
        self.table.update(self.plan_dl.batch_idx, scores)

    def after_train(self):
        if self.active:
            self.table.sync()  # every rank plans the next epoch from the same scores
            self.scored = True
        super().after_train()

    def state_dict(self) -> dict:
        return super().state_dict() | {"scored": self.scored,
                                       "table": None if self.table is None else self.table.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.scored, table = state["scored"], state["table"]
        self.table = None
        if table is not None:
            self.table = ScoreTable(table["scores"].numel(), table["scores"].device, self.momentum)
            self.table.load_state_dict(table)


class WeightedLoss:
    """The Learner's loss while a `WeightedPlanCallback` trains: per-sample losses -> the callback's
    weights -> the wrapped loss's own reduction, exactly ('mean' over the elements that count, 'sum').

    Behaves like the wrapped loss (same `reduction`, `activation`, `decodes`, `y_int`), so `MixUp`
    and `get_preds` work on top of it. Outside the callback's training batches it is the wrapped loss.
    """

    def __init__(self, loss_func, cb: WeightedPlanCallback):
        self.loss_func, self.cb = loss_func, cb
        self.base_reduction = self.reduction = getattr(loss_func, "reduction", "mean")
        self.y_int = getattr(loss_func, "y_int", False)

    def __call__(self, pred, *yb, **kwargs):
        cb = self.cb
        if not (cb.active and cb.training) or cb.plan_dl is None or cb.plan_dl.batch_idx is None:
            return self.loss_func(pred, *yb, **kwargs)
        sums, counts = per_sample_loss_parts(self.loss_func, pred, *yb, n=cb.plan_dl.batch_idx.numel())
        weights = cb.weigh(sums / counts.clamp_min(1), pred, *yb)
        if cb._calls is not None:  # the batch's own forward (not a second pass such as SAM's)
            cb._calls.append((sums.detach(), counts, weights))
        weighted = sums * weights
        if self.reduction == "sum" or (self.reduction == "none" and self.base_reduction == "sum"):
            return weighted.sum() if self.reduction == "sum" else weighted
        if self.reduction == "mean":
            return weighted.sum() / counts.sum()
        if self.base_reduction == "mean":  # asked for per-sample values (MixUp): their mean is the exact loss
            return weighted * (counts.numel() / counts.sum())
        return weighted / counts.clamp_min(1)

    def activation(self, x):
        return getattr(self.loss_func, "activation", lambda o: o)(x)

    def decodes(self, x):
        return getattr(self.loss_func, "decodes", lambda o: o)(x)
