"""Budget-aware learning-rate schedules as fastai callbacks that own the learning rate: linear decay to zero,
REX and warmup-stable-decay, each a function of p (`pct_train`, the budget's progress under `Budget`)."""

from __future__ import annotations

import numpy as np
from fastai.callback.schedule import ParamScheduler

from ..callback import EffilabCallback
from ..core.budget import LrSchedule
from ..registry import register

__all__ = ["SCHEDULES", "BudgetSchedule", "LinearDecay", "REX", "WSD"]


def _check_lr(lr):
    if lr is None:
        return None
    values = list(lr) if isinstance(lr, (list, tuple)) else [lr]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v <= 0:
            raise ValueError(f"lr must be a positive finite number (or one per parameter group), got {lr!r}")
    return lr


def _find_peak(learn) -> np.ndarray:
    """The peak learning rate of the running fit, per parameter group: that of its `ParamScheduler`'s "lr"
    schedule (`fit_one_cycle(n, lr_max)`'s `lr_max`), else the rate `fit` set."""
    n_groups = len(learn.opt.hypers)
    for cb in learn.cbs:
        if isinstance(cb, ParamScheduler) and "lr" in cb.scheds:
            values = np.array([np.broadcast_to(np.asarray(cb.scheds["lr"](p), dtype=float), (n_groups,))
                               for p in np.linspace(0, 1, 1001)])
            return values.max(0)
    return np.array([h["lr"] for h in learn.opt.hypers], dtype=float)


class BudgetSchedule(EffilabCallback):
    """What the budget schedules share: the learning rate of each training step is `peak * shape(p)` with p
    the Learner's `pct_train` (the budget's progress when a `Budget` drives it, else the fraction of the fit).

    **Owning the learning rate.** It runs after fastai's `ParamScheduler` (order 65 > 60) and sets the
    learning rate in `before_batch` after it: with `fit_one_cycle` (as `effilab bench` fits) the one-cycle
    learning rate is overridden, its momentum cycle is kept. The peak is `lr` when given, else the peak of
    the fit's own learning-rate schedule (`fit_one_cycle(n, lr_max)`'s `lr_max`), else the rate `fit` set;
    one per parameter group (discriminative rates scale together). Inactive in `lr_find`.

    **Telemetry.** Source `"schedule"`: meta `planned["lr"]` (the curve over p, first parameter group) and
    stream `"step"` {iter, pct, lr} at each epoch's start and end; source `telemetry_name`, stream `"epoch"`
    {fit, epoch, pct, lr}.
    """

    order = 65  # after fastai's ParamScheduler (60): this callback has the last word on the learning rate
    shape = "linear_decay"
    telemetry_name = "budget_schedule"

    def __init__(self, lr=None, warmup: float = 0.0, final: float = 0.0, **shape_kwargs):
        self.lr = _check_lr(lr)
        self.schedule = LrSchedule(self.shape, 1.0, warmup, final, **shape_kwargs)
        self.fit_count = 0
        self._peak = None  # per parameter group, while a fit trains

    def before_fit(self):
        self._peak = None  # also fired by validate(): the peak is found when training starts

    def before_train(self):
        if hasattr(self.learn, "lr_finder"):
            return
        if self._peak is None:
            self._peak = self._find_peak()
            grid = np.linspace(0, 1, 101)  # sync-ok: NumPy, once per fit
            values = [float(self._peak[0] * self.schedule.multiplier(p)) for p in grid]  # sync-ok: host floats
            curve = {"pct": grid.tolist(), "value": values}  # sync-ok: NumPy
            tel = self.telemetry
            tel.set_meta("schedule", planned=tel.meta("schedule").get("planned", {}) | {"lr": curve})
        self._set_lr()
        self._record_step()

    def _find_peak(self) -> np.ndarray:
        n_groups = len(self.learn.opt.hypers)
        if self.lr is not None:
            return np.broadcast_to(np.asarray(self.lr, dtype=float), (n_groups,)).copy()
        return _find_peak(self.learn)

    def _set_lr(self):
        lr = self._peak * self.schedule.multiplier(self.learn.pct_train)
        self.learn.opt.set_hyper("lr", lr if len(lr) > 1 else float(lr[0]))

    def before_batch(self):
        if self._peak is not None and self.training:
            self._set_lr()

    def after_train(self):
        if self._peak is None:
            return
        self._record_step()
        self.telemetry.record(self.telemetry_name, "epoch", fit=self.fit_count, epoch=self.learn.epoch,
                              pct=float(self.learn.pct_train), lr=float(self.learn.opt.hypers[0]["lr"]))

    def after_fit(self):
        if self._peak is not None:
            self.fit_count += 1
        self._peak = None

    after_cancel_fit = after_fit

    def _record_step(self):
        self.telemetry.record("schedule", "step", iter=self.learn.train_iter, pct=float(self.learn.pct_train),
                              lr=float(self.learn.opt.hypers[0]["lr"]))

    def state_dict(self) -> dict:
        return {"fit_count": self.fit_count}

    def load_state_dict(self, state: dict) -> None:
        self.fit_count = state["fit_count"]


class LinearDecay(BudgetSchedule):
    """Linear decay to zero over the budget: lr(p) = peak * (1 - p).

    **What it does.** Owns the learning rate (see `BudgetSchedule`): after an optional linear warm-up over
    the first `warmup` of the budget it falls linearly to `final * peak` (0 by default) at p = 1, so the
    gradient steps vanish exactly when the budget ends ("budgeted convergence").

    **Paper.** Li, Yumer & Ramanan, "Budgeted Training: Rethinking Deep Neural Network Training Under
    Resource Constraints", ICLR 2020 (arXiv 1905.04753): linear decay to zero, fitted to each budget, was
    robust and high-performing on ImageNet, Kinetics, COCO and Cityscapes at every budget. Defazio et al.
    2023 ("Optimal Linear Decay Learning Rate Schedules") show it is worst-case optimal for the last
    iterate; Bergsma et al. 2025 ("Straight to Zero") find decay to zero beats cosine to 10%.

    **Defaults.** `warmup=0` (the paper's), `final=0`. Use a short `warmup` (0.02-0.05) with Adam at high rates.

    **Measured.** `python -m benchmarks.budget_schedules` (MNIST-1D, 8k training samples, the small MLP,
    fastai's Adam (decoupled weight decay) at lr 1e-2, batches of 128, 3 seeds; budgets of 2 and 8 epochs
    of samples; 2-core CPU) gave validation accuracy % (mean +- std, 2 / 8 epochs): one-cycle 60.1 +- 1.9 /
    75.2 +- 0.9, linear decay 54.1 +- 2.2 / 72.1 +- 1.0, REX 54.8 +- 3.1 / 73.6 +- 0.9, WSD (1-sqrt, 5%
    warm-up, 20% cooldown) 58.7 +- 3.1 / 76.6 +- 1.1, schedule-free AdamW 64.7 +- 0.6 / 76.4 +- 0.8.
    Without a warm-up, at a rate that suits one-cycle's 25% warm-up, linear decay lost 3-6 points to
    one-cycle there: give Adam a short `warmup` and tune the peak per schedule before comparing.

    **Use.** `learn.fit_one_cycle(50, 1e-2, cbs=[Budget(20_000), LinearDecay()])` or
    `learn.fit_budget(Budget(20_000), 1e-2, schedule="linear_decay")`.

    **Saves.** Nothing by itself: it makes a short budget count (compare at equal spend).
    """

    shape = "linear_decay"
    telemetry_name = "linear_decay"


class REX(BudgetSchedule):
    """REX: lr(p) = peak * (1 - p) / (1/2 + (1 - p) / 2), a "reflected exponential" profile.

    **What it does.** Owns the learning rate (see `BudgetSchedule`): stays higher than linear decay for
    longer (0.67 of the peak at p = 0.5, against 0.5) and falls to zero steeply at the end of the budget.

    **Paper.** Chen, Wolfe & Kyrillidis, "REX: Revisiting Budgeted Training with an Improved Schedule",
    MLSys 2022 (arXiv 2107.04197): across 82 settings (image classification, detection, NLP; SGD with
    momentum and Adam) REX had the best average rank at low and at high budgets. Several "REX" schedulers
    in circulation use other curves; this one is tested against the paper's formula.

    **Defaults.** `warmup=0` (the paper's), `final=0`.

    **Measured.** In the `LinearDecay` comparison (MNIST-1D, fastai's Adam at 1e-2, no warm-up) REX was 0.7 and 1.6
    points above linear decay at 2 and 8 epochs of samples, both below one-cycle (with its warm-up).

    **Use.** `learn.fit_budget(Budget(20_000), 1e-2, schedule="rex")`, or `cbs=[Budget(...), REX()]`.

    **Saves.** Nothing by itself (see `LinearDecay`).
    """

    shape = "rex"
    telemetry_name = "rex"


class WSD(BudgetSchedule):
    """WSD, warmup-stable-decay: a warm-up, a constant learning rate, and a cooldown to zero over the last
    `decay` of the budget, linear or 1 - sqrt.

    **What it does.** Owns the learning rate (see `BudgetSchedule`): linear warm-up over the first `warmup`
    of the budget, the peak until p = 1 - `decay`, then the cooldown: `1 - x` ("linear") or `1 - sqrt(x)`
    ("1-sqrt") of the cooldown's fraction x, to 0 at p = 1.

    **Anytime.** Up to its cooldown the curve does not depend on the budget (past the warm-up): a checkpoint
    saved in the stable phase can be finished for any budget by resuming it with the budget that starts the
    cooldown now, `Budget(cooldown_budget(spent, decay), unit)` (`effilab.core.budget.cooldown_budget`;
    the warning about the changed budget says where p jumps). One long run thus yields finished models at
    many budgets (cheap scaling sweeps, continued training).

    **Paper.** Hu et al., "MiniCPM", 2024 (arXiv 2404.06395): a ~10% decay phase was enough, 2.5% was not.
    Hägele et al., "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations", NeurIPS 2024
    (arXiv 2405.18392): constant + cooldown matches cosine, and a 1 - sqrt cooldown beats a linear one.

    **Defaults.** `warmup=0.05`, `decay=0.2` (Hägele et al.'s cooldown length that matched cosine),
    `cooldown="1-sqrt"`.

    **Measured.** In the `LinearDecay` comparison (MNIST-1D, fastai's Adam at 1e-2) WSD was 1.4 points below
    one-cycle at 2 epochs of samples (within the seeds' spread) and 1.4 above it at 8.

    **Use.** `learn.fit_budget(Budget(20_000), 1e-2, schedule="wsd")`, or `cbs=[Budget(...), WSD(decay=0.1)]`.

    **Saves.** Compute across budgets (one trunk, many cooldowns); nothing within one run.
    """

    shape = "wsd"
    telemetry_name = "wsd"

    def __init__(self, lr=None, warmup: float = 0.05, decay: float = 0.2, cooldown: str = "1-sqrt",
                 final: float = 0.0):
        super().__init__(lr, warmup, final, decay=decay, cooldown=cooldown)


# name -> callback class, for `learn.fit_budget(..., schedule=name)`
SCHEDULES = {"linear_decay": LinearDecay, "rex": REX, "wsd": WSD}


register("linear_decay", LinearDecay, "budget")
register("rex", REX, "budget")
register("wsd", WSD, "budget")
