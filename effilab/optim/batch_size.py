"""Batch-size schedule as a fastai callback: the training loader's batch size grows at chosen points of
the fit instead of the learning rate decaying."""

from __future__ import annotations

from fastai.callback.schedule import ParamScheduler

from ..callback import EffilabCallback
from ..core.batch_schedule import HoldPeak, batch_size_at, batch_sizes, check_batch_schedule, planned_curve
from ..data.pruning import _unwrap_distributed
from ..registry import register

__all__ = ["BatchSizeSchedule", "hold_lr_peak"]


def hold_lr_peak(learn) -> bool:
    """Make the `lr` schedule of the Learner's `ParamScheduler` (e.g. `fit_one_cycle`'s) stay at its peak
    after the warm-up instead of annealing; True if there was one to change."""
    changed = False
    for cb in learn.cbs:
        if isinstance(cb, ParamScheduler) and "lr" in cb.scheds and not isinstance(cb.scheds["lr"], HoldPeak):
            cb.scheds["lr"] = HoldPeak(cb.scheds["lr"])
            changed = True
    return changed


class BatchSizeSchedule(EffilabCallback):
    """Batch-size schedule: grow the batch size during the fit instead of decaying the learning rate.

    **What it does.** Sets the training loader's batch size at the start of every epoch: the loader's own
    `bs` until the first milestone, then `factor` times larger at each milestone (or `sizes[i]` in
    phase i). A milestone `m` (a fraction of the fit) takes effect at the first epoch that starts at or
    after it (`epoch / n_epoch >= m`; under an `effilab.budget.Budget`, the budget's progress at the epoch's
    start). Every sample is still seen once per epoch; an epoch with a k times
    larger batch takes k times fewer optimizer steps. The validation loader is left alone, and the
    loader's batch size is restored after the fit.

    **Paper.** Smith, Kindermans, Ying & Le, "Don't Decay the Learning Rate, Increase the Batch Size",
    ICLR 2018 (arXiv 1711.00489): the noise scale of SGD is ~ lr * N / bs, so multiplying the batch size by
    k where a step schedule would divide the learning rate by k follows the same curve in epochs with
    fewer parameter updates. Their comparison: batch-size schedule with a *constant* learning rate vs the
    learning-rate decay schedule at a fixed batch size.

    **Defaults.** `milestones=(0.5, 0.75)`, `factor=2`: a step-decay-like schedule (x2 at half, x4 at
    three quarters of the fit). `hold_lr=False`; `hold_lr=True` turns the learning-rate schedule of the
    fit (`fit_one_cycle`'s) into warm-up then flat at its peak, so the batch size does the decaying
    (plain `fit(n, lr)` already has a flat learning rate).

    **Use.** `learn.fit(n, lr, cbs=BatchSizeSchedule())`, or `fit_one_cycle` with `hold_lr=True`.
    The learning-rate schedule is a function of fastai's `pct_train`, which advances by `1 / n_epoch` per
    epoch whatever its number of steps: the schedules stay in epochs, as in the paper.

    **Interactions.** Runs before the pruning callbacks (which then plan batches of the new size) and the
    distributed trainer (each rank's batch is `bs`; the global batch is `bs * world_size`). A size that
    leaves no batch with the loader's `drop_last` is an error. `LinearScaling` reads the batch size at
    the start of the fit only. Inactive in `lr_find`.

    **Telemetry.** Source `"batch_size_schedule"`, stream `"epoch"`: batch size, optimizer steps and
    batches per epoch. Source `"schedule"`: the planned batch size (meta `planned["bs"]`) and the actual
    one at the start and end of each epoch (stream `"step"`, key `"bs"`), drawn in the dashboard's
    Schedules panel.
    """

    order = -6  # before pruning (-5) and fastai's DistributedTrainer (11) build their loaders from it
    telemetry_name = "batch_size_schedule"

    def __init__(self, milestones=(0.5, 0.75), factor: float | None = None, sizes=None, hold_lr: bool = False):
        check_batch_schedule(milestones, factor, sizes)
        self.milestones = tuple(milestones)
        self.factor = 2.0 if factor is None and sizes is None else factor
        self.sizes = None if sizes is None else tuple(sizes)
        self.hold_lr = bool(hold_lr)
        self.fit_count = 0
        self.base_bs: int | None = None  # the loader's own batch size, while a fit runs
        self.bs: int | None = None
        self._changed: list = []  # the loaders whose batch size this fit sets

    def before_fit(self):
        if self.hold_lr and not hasattr(self.learn, "lr_finder"):
            hold_lr_peak(self.learn)

    def before_train(self):
        if hasattr(self.learn, "lr_finder"):
            return
        wrapper = self.learn.dls.train
        dl = _unwrap_distributed(wrapper)  # under DDP: the real loader inside fastai's DistributedDL
        n_epoch = self.learn.n_epoch
        if self.base_bs is None:  # the first trained epoch of this fit
            self.base_bs = dl.bs
            self._changed = list({id(d): d for d in (wrapper, dl)}.values())
            planned = batch_sizes(n_epoch, self.base_bs, self.milestones, self.factor, self.sizes)
            n = getattr(dl, "n", None)
            if dl.drop_last and n is not None and max(planned) > n:
                raise ValueError(f"BatchSizeSchedule: batch size {max(planned)} is larger than the {n} training "
                                 "samples, and the training loader drops the last partial batch: no batch left")
            tel = self.telemetry
            tel.set_meta(self.telemetry_name, planned=planned, milestones=list(self.milestones))
            tel.set_meta("schedule", planned=tel.meta("schedule").get("planned", {}) | {"bs": planned_curve(planned)})
        from ..budget.clock import budget_of

        budget = budget_of(self.learn)
        if budget is not None:  # a budgeted fit: the milestones are fractions of its progress at this epoch's start
            self.bs = batch_size_at(budget.progress, 1, self.base_bs, self.milestones, self.factor, self.sizes)
        else:
            self.bs = batch_size_at(self.learn.epoch, n_epoch, self.base_bs, self.milestones, self.factor, self.sizes)
        for d in self._changed:  # DistributedDL batches its shard with its own copy of `bs`
            d.bs = self.bs
        self.steps = self.cancelled = 0
        self._record_step()

    def after_step(self):
        if self.bs is not None:
            self.steps += 1

    def after_cancel_step(self):
        if self.bs is not None:
            self.cancelled += 1

    def after_train(self):
        if self.bs is None:
            return
        self._record_step()
        self.telemetry.record(self.telemetry_name, "epoch", fit=self.fit_count, epoch=self.learn.epoch, bs=self.bs,
                              steps=self.steps - self.cancelled, batches=self.steps)

    def after_fit(self):
        if self.base_bs is not None:
            self._restore_bs()
            self.fit_count += 1

    def after_cancel_fit(self):
        self.after_fit()  # on any interruption too: the loaders get their batch size back

    def _restore_bs(self):
        for d in self._changed:
            d.bs = self.base_bs
        self.base_bs = self.bs = None
        self._changed = []

    def _record_step(self):
        self.telemetry.record("schedule", "step", iter=self.learn.train_iter, pct=float(self.learn.pct_train),
                              bs=self.bs)

    def state_dict(self) -> dict:
        return {"fit_count": self.fit_count}

    def load_state_dict(self, state: dict) -> None:
        self.fit_count = state["fit_count"]


register("batch_size_schedule", lambda: BatchSizeSchedule(milestones=(0.5,), factor=2), "optim", stateful=True)
