"""The budget clock as a fastai callback: p = spent / budget drives `pct_train` (so every fastai schedule
follows the budget) and ends the fit when the budget is spent; `learn.fit_budget(...)` is the convenience."""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
from fastai.basics import patch
from fastai.callback.core import CancelFitException, CancelTrainException
from fastai.learner import Learner
from fastai.torch_core import find_bs, get_model

from ..callback import EffilabCallback
from ..core.budget import BudgetClock, StepFlops, check_amount, check_unit, epochs_for_budget
from ..core.distributed import is_distributed
from ..registry import register

__all__ = ["Budget", "budget_of", "fit_budget", "progress_of"]

_HOST_GROUP: dict = {}


def _host_group():
    """A process group whose collectives take CPU tensors: the default one for gloo, a gloo group beside
    NCCL (created once, on every rank), so the per-step reduction of host counters never touches the device."""
    backend = str(dist.get_backend()).lower()
    if "gloo" in backend:
        return None
    if "group" not in _HOST_GROUP:
        _HOST_GROUP["group"] = dist.new_group(backend="gloo")
    return _HOST_GROUP["group"]


def budget_of(learn: Learner) -> Budget | None:
    """The Learner's `Budget` callback, or None."""
    return next((cb for cb in learn.cbs if isinstance(cb, Budget)), None)


def progress_of(learn: Learner) -> float:
    """Progress of the running fit in [0, 1]: the budget's p when a `Budget` drives it, else fastai's
    `pct_train`. Techniques with schedules of their own (per epoch) should read this, not `epoch / n_epoch`."""
    return float(getattr(learn, "pct_train", 0.0))


def _extra_pass_samples(learn) -> int:
    """Samples given an extra forward + backward so far by the Learner's callbacks (`extra_pass_samples`, a
    host count: SAM's second pass)."""
    return sum(getattr(cb, "extra_pass_samples", 0) for cb in learn.cbs)


class Budget(EffilabCallback):
    """Budget: train for an amount of one resource; p = spent / budget is fastai's `pct_train`.

    **What it does.** Counts what each training step really spent, in `unit`: `"steps"` (optimiser steps
    taken; a step cancelled by gradient accumulation is not one), `"samples"` (the batch actually forwarded,
    after every callback reshaped it: InfoBatch's shorter epochs, a batch-size schedule, Selective
    Backprop's forward), `"tokens"` (elements of the first input, e.g. a `(batch, seq_len)` token tensor,
    after sequence-length warm-up), `"flops"` (forward + backward FLOPs of the model, counted with
    `torch.utils.flop_counter.FlopCounterMode` on the meta device, again whenever the batch shape or the
    trainable parameters change; a second forward + backward a technique makes in the step, SAM's and
    LookSAM's, is charged too) or `"seconds"` (wall-clock training time). Before each step it sets
    `learn.pct_train = p`, so `fit_one_cycle`, `fit_flat_cos`, any `ParamScheduler` and effilab's schedules
    run over the budget, not over the epochs; when p reaches 1 the fit stops after that step: the epoch's
    training ends there, that epoch is validated and recorded as usual, and the fit ends (the Learner is
    usable, `learn.validate()` works). Pass `fit` an upper bound on the epochs (`epochs_for_budget`, or
    `learn.fit_budget`).

    **Wall-clock budgets** (`"seconds"`, clock `time.perf_counter` unless `clock=` is given) charge the
    time from the start of each epoch's training to the end of each step, less the fit's first step
    (compile and warm-up); validation and what runs between epochs are not charged. All three are
    reported. The fit stops when another step, at the mean step time, would end further past the deadline
    than the current one ends before it: the run ends within half a step of the budget, and since p is the
    elapsed share of the budget the schedules reach their final value there. Measured with
    `python -m benchmarks.budget_clock` (MNIST-1D, small MLP, `fit_one_cycle`, budgets of 5, 10 and 20 s,
    3 runs each, a loaded 2-core CPU, 28-37 ms steps): the training time, timed independently, was within
    0.6% of the budget in every run; the last step ran at p = 0.993-0.999, its learning rate 2e-4 of the
    peak or less. Time is read on the host, after the step was queued: on a GPU the
    Recorder's per-step loss read keeps the host within a step of the device.

    **Paper.** Li, Yumer & Ramanan, "Budgeted Training: Rethinking Deep Neural Network Training Under
    Resource Constraints", ICLR 2020: schedules fitted to the budget beat training to convergence and
    stopping. Kaddour et al., "No Train No Gain", NeurIPS 2023: compare techniques against the baseline
    given the same budget with its schedule decayed to the end. Wall-clock control as in Cramming
    (Geiping & Goldstein 2023) and parameter-golf.

    **Defaults.** `unit="samples"` (machine-independent and counts what pruning saves).

    **Use.** `learn.fit_one_cycle(50, 1e-2, cbs=Budget(40_000, "samples"))` (stops after 40k samples,
    one-cycle over them), or `learn.fit_budget(Budget(30, "seconds"), 1e-2)`. `Budget.spent` and
    `Budget.progress` are readable after the fit; an interrupted fit keeps what it spent. A new fit starts a
    fresh budget; `learn.load_checkpoint(...)` then `fit(..., start_epoch=e)` continues the saved spend
    (a checkpoint of another unit is an error; another amount a warning saying where p jumps).

    **Interactions.** Techniques that schedule by `epoch / n_epoch` (InfoBatch's annealing, SWA's start,
    the batch-size milestones) still read the epoch count: read `progress_of(learn)` to follow the budget.
    Under DDP the budget is global (samples, tokens and FLOPs summed over the ranks, seconds the slowest
    rank's) and every rank stops on the same step: one all-reduce of two host numbers per step, on a gloo
    group (a CPU collective, no device synchronisation); steps need none. Inactive in `lr_find`.

    **Saves.** Nothing by itself: it decides how much is spent, and counts it.

    **Telemetry.** Source `"budget"`: meta {amount, unit}; stream `"epoch"` {fit, epoch, spent, amount,
    unit, progress, steps}; stream `"timing"` (this machine's clock, so not identical across ranks) {fit,
    epoch, train_s, warmup_s, valid_s}; stream `"fit"` (at the end) all of these plus `stopped_by_budget`.
    """

    order = -9  # after TrainEvalCallback (-10) sets pct_train, before the callbacks that reshape batches by it
    telemetry_name = "budget"

    def __init__(self, amount, unit: str = "samples", clock: Callable[[], float] = time.perf_counter):
        check_unit(unit)
        check_amount(amount)
        if not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds (e.g. time.perf_counter), got {clock!r}")
        self.budget = BudgetClock(amount, unit, clock)
        self.fit_count = 0
        self.stopped_by_budget = False  # the last fit ended because the budget was spent
        self._resume = False  # state loaded from a checkpoint: the next fit continues its spend
        self._fitting = False  # a fit is training (not validate(), not lr_find)
        self._stop = False
        self._flops = StepFlops()
        self._extra0 = 0  # extra-pass samples before the current step
        self._reset_times()

    # -- readable
    @property
    def amount(self) -> float:
        return self.budget.amount

    @property
    def unit(self) -> str:
        return self.budget.unit

    @property
    def spent(self) -> float:
        return self.budget.spent

    @property
    def progress(self) -> float:
        return self.budget.progress

    def _reset_times(self):
        self.train_s = self.warmup_s = self.valid_s = 0.0
        self._cost = 0.0
        self._stepped = False
        self._first_step = True
        self._t = None
        self._epoch = -1

    # -- events
    def before_fit(self):
        # also fired by validate() and get_preds(): nothing starts here
        self._fitting = self._stop = False

    def before_epoch(self):
        if self._fitting and self._stop:
            raise CancelFitException  # the budget ended in the last epoch: no more epochs

    def before_train(self):
        if hasattr(self.learn, "lr_finder"):
            return
        if not self._fitting:
            self._start_fit()
        self._epoch = self.learn.epoch
        self._t = self.budget.clock()
        self.learn.pct_train = self.progress

    def _start_fit(self):
        if not self._resume:
            self.budget.spent, self.budget.steps, self.budget.excluded = 0.0, 0, 0.0
        self._resume = False
        self._reset_times()
        self._fitting, self._stop, self.stopped_by_budget = True, False, False
        self.telemetry.set_meta(self.telemetry_name, amount=self.amount, unit=self.unit)
        if self.budget.done:
            warnings.warn(f"Budget: the budget of {self.amount:g} {self.unit} is already spent "
                          f"({self.spent:g}); the fit trains nothing. Start a new budget with a fresh Budget "
                          "or a fit without start_epoch", stacklevel=3)
            self._stop = True
            raise CancelFitException
        self._check_reachable()

    def _check_reachable(self):
        """Warn when the fit's epochs cannot spend the budget (steps, samples, tokens: known per epoch)."""
        if self.unit not in ("steps", "samples") or is_distributed():
            return
        dl = self.learn.dls.train
        n, bs = getattr(dl, "n", None), getattr(dl, "bs", None)
        if not n or not bs:
            return
        epochs_left = self.learn.n_epoch - self.learn.epoch
        per_epoch = (n // bs if dl.drop_last else math.ceil(n / bs)) if self.unit == "steps" else (
            n // bs * bs if dl.drop_last else n)
        if self.spent + epochs_left * per_epoch < self.amount:
            need = epochs_for_budget(self.amount - self.spent, self.unit, n_samples=n, bs=bs, drop_last=dl.drop_last)
            warnings.warn(f"Budget: {epochs_left} epochs of at most {per_epoch} {self.unit} cannot spend the budget "
                          f"of {self.amount:g} {self.unit}: the fit will end at p = "
                          f"{(self.spent + epochs_left * per_epoch) / self.amount:.2f}, its schedules unfinished. "
                          f"Pass at least {self.learn.epoch + need} epochs (the budget ends the fit)", stacklevel=4)

    def before_batch(self):
        if not (self._fitting and self.training):
            return
        if self._stop:
            raise CancelTrainException  # the budget was spent by the previous step
        self.learn.pct_train = self.progress
        self._cost, self._stepped = 0.0, False

    def after_pred(self):
        if not (self._fitting and self.training):
            return
        unit, xb = self.unit, self.learn.xb
        if unit == "samples":
            self._cost = find_bs(xb)
        elif unit == "tokens":
            self._cost = xb[0].numel()
        elif unit == "flops":
            self._cost = self._flops(get_model(self.learn.model), xb)
            if self._cost is None:
                raise RuntimeError(self._flops.failed)
            self._extra0 = _extra_pass_samples(self.learn)

    def after_cancel_step(self):
        self._stepped = None  # fastai fires after_step after a cancelled step too

    def after_step(self):
        if self._stepped is not None:
            self._stepped = True

    def after_batch(self):
        if not (self._fitting and self.training):
            return
        now = self.budget.clock()
        dt, self._t = now - self._t, now
        if self.unit == "steps":
            cost = 1.0 if self._stepped else 0.0
        elif self.unit == "seconds":
            cost = 0.0 if self._first_step else dt
        else:
            cost = float(self._cost)
            if self.unit == "flops":  # the step's extra passes, at the step's FLOPs per sample
                cost *= 1 + (_extra_pass_samples(self.learn) - self._extra0) / max(1, find_bs(self.learn.xb))
        if self._first_step:
            self.warmup_s += dt
        else:
            self.train_s += dt
        if is_distributed() and self.unit != "steps":  # every rank takes the same steps: nothing to reduce
            cost = self._reduce(cost)
        if not (self.unit == "seconds" and self._first_step):
            self.budget.charge(cost)
            if self.unit == "seconds" and self.budget.steps == 1:
                self._check_step_time(cost)
        self._first_step = False
        self.learn.pct_train = self.progress
        if self.budget.done:
            self._stop = self.stopped_by_budget = True

    def _reduce(self, cost: float) -> float:
        """The step's global cost: summed over the ranks; for seconds, the slowest rank's new total spend."""
        group = _host_group()
        if self.unit == "seconds":
            t = torch.tensor([self.spent + cost], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
            return float(t[0]) - self.spent  # sync-ok: a host tensor (gloo), the one read per step
        t = torch.tensor([cost], dtype=torch.float64)
        dist.all_reduce(t, group=group)
        return float(t[0])  # sync-ok: a host tensor (gloo), the one read per step

    def _check_step_time(self, dt: float):
        if dt >= self.amount:
            warnings.warn(f"Budget: the time budget of {self.amount:g} s is smaller than one training step "
                          f"({dt:.3g} s measured): the fit stops after this step. Give it at least ~50 steps' "
                          f"worth ({50 * dt:.3g} s) for its schedules to mean anything", stacklevel=2)
        elif dt > 0.04 * self.amount:
            warnings.warn(f"Budget: the time budget of {self.amount:g} s holds ~{self.amount / dt:.0f} steps of "
                          f"{dt:.3g} s: the fit ends within half a step ({50 * dt / self.amount:.1f}% of the budget)",
                          stacklevel=2)

    def after_train(self):
        if not self._fitting:
            return
        self._t = self.budget.clock()
        if self._stop:
            # A budget stop is not a cancelled epoch: fastai's Recorder (order 50, after us) logs the training loss.
            rec = getattr(self.learn, "recorder", None)
            if rec is not None:
                rec.cancel_train = False

    def before_validate(self):
        if self._fitting:
            self._tv = self.budget.clock()

    def after_validate(self):
        if self._fitting and getattr(self, "_tv", None) is not None:
            self.valid_s += self.budget.clock() - self._tv
            self._tv = None

    def after_epoch(self):
        if self._fitting:
            # the shared counts per epoch; this machine's clock apart (ranks differ in it under DDP)
            self.telemetry.record(self.telemetry_name, "epoch", **self._record(timing=False))
            self.telemetry.record(self.telemetry_name, "timing", fit=self.fit_count, epoch=self._epoch,
                                  train_s=self.train_s, warmup_s=self.warmup_s, valid_s=self.valid_s)

    def after_cancel_fit(self):
        if isinstance(sys.exc_info()[1], CancelFitException):
            return  # a fit ended on purpose (the budget spent, on every rank alike): `after_fit` follows
        self._finish(every_rank=False)  # an error may stop one rank only: no collective

    def after_fit(self):
        self._finish()

    def _finish(self, every_rank: bool = True):
        if not self._fitting:
            return
        self._fitting = False
        excluded = self.warmup_s + self.valid_s
        if every_rank and is_distributed():  # the slowest rank's, as for a time budget's spend: one per fit
            t = torch.tensor([excluded], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_host_group())
            excluded = float(t[0])  # sync-ok: a host tensor (gloo), once per fit
        self.budget.excluded = excluded
        rec = self._record() | {"stopped_by_budget": self.stopped_by_budget}
        self.telemetry.record(self.telemetry_name, "fit", **rec)
        self.fit_count += 1
        if not self.stopped_by_budget and self.learn.epoch + 1 >= self.learn.n_epoch and self.progress < 1:
            warnings.warn(f"Budget: the fit ran its {self.learn.n_epoch} epochs and spent {self.spent:g} of "
                          f"{self.amount:g} {self.unit} (p = {self.progress:.2f}): its schedules did not finish. "
                          "Pass more epochs (the budget ends the fit)", stacklevel=3)

    def _record(self, timing: bool = True) -> dict:
        rec = {"fit": self.fit_count, "epoch": self._epoch, "spent": self.spent, "amount": self.amount,
               "unit": self.unit, "progress": self.progress, "steps": self.budget.steps}
        return rec | ({"train_s": self.train_s, "warmup_s": self.warmup_s, "valid_s": self.valid_s} if timing else {})

    # -- state
    def state_dict(self) -> dict:
        return self.budget.state_dict() | {"fit_count": self.fit_count}

    def load_state_dict(self, state: dict) -> None:
        if state["unit"] != self.unit:
            raise ValueError(f"Budget: the checkpoint's budget is in {state['unit']}, this one in {self.unit}: "
                             f"resume with Budget({state['amount']:g}, {state['unit']!r})")
        if state["amount"] != self.amount:
            warnings.warn(f"Budget: resuming a run budgeted at {state['amount']:g} {self.unit} with a budget of "
                          f"{self.amount:g}: it continues from {state['spent']:g} spent, so p jumps from "
                          f"{min(1, state['spent'] / state['amount']):.3f} to "
                          f"{min(1, state['spent'] / self.amount):.3f} "
                          "and the schedules with it", stacklevel=2)
        self.budget.load_state_dict(state)
        self.fit_count = state["fit_count"]
        self._resume = True


@patch
def fit_budget(self: Learner, budget: Budget, lr=None, schedule: str = "one_cycle", n_epoch: int | None = None,
               cbs=None, min_fraction: float = 0.5, **kwargs):
    """Fit until `budget` (a `Budget`) is spent, with `schedule` over it: "one_cycle" (`fit_one_cycle`),
    "flat_cos" (`fit_flat_cos`), "constant" (`fit`) or a registered budget schedule ("linear_decay",
    "rex", "wsd", "schedule_free": `fit` at `lr` with that callback). `n_epoch` defaults to the epochs that
    can spend a steps/samples budget when a technique forwards as little as `min_fraction` of each epoch
    (1000 for FLOPs and seconds: the budget ends the fit). Other keywords go to the fit method."""
    if not isinstance(budget, Budget):
        raise TypeError(f"budget must be a Budget (e.g. Budget(20_000, 'samples')), got {budget!r}")
    if n_epoch is None:
        dl = self.dls.train
        n, bs = getattr(dl, "n", None), getattr(dl, "bs", None)
        if budget.unit in ("steps", "samples") and n and bs:
            n_epoch = epochs_for_budget(budget.amount, budget.unit, n_samples=n, bs=bs, drop_last=dl.drop_last,
                                        min_fraction=min_fraction)
        else:
            n_epoch = 1000
    cbs = [budget, *([] if cbs is None else cbs if isinstance(cbs, (list, tuple)) else [cbs])]
    if schedule == "one_cycle":
        return self.fit_one_cycle(n_epoch, lr, cbs=cbs, **kwargs)
    if schedule == "flat_cos":
        return self.fit_flat_cos(n_epoch, lr, cbs=cbs, **kwargs)
    if schedule == "constant":
        return self.fit(n_epoch, lr, cbs=cbs, **kwargs)
    from .schedule_free import ScheduleFree
    from .schedules import SCHEDULES

    if schedule == "schedule_free":
        return self.fit(n_epoch, lr, cbs=[*cbs, ScheduleFree()], **kwargs)
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: use one_cycle, flat_cos, constant or one of "
                         f"{', '.join(SCHEDULES)}, schedule_free")
    return self.fit(n_epoch, lr, cbs=[*cbs, SCHEDULES[schedule]()], **kwargs)


# A test-friendly budget: 2.5 epochs of the generic learner (512 samples, batches of 32): a 3- or 4-epoch fit stops
# mid-epoch, and the suite's checkpoint after epoch 1 resumes mid-budget (a 2-epoch fit warns that it cannot spend it).
register("budget", lambda: Budget(1280, "samples"), "budget", stateful=True)
