"""Large-batch training pieces as callbacks: fastai's LAMB and LARS/LARC optimizers chosen by a callback
(so a recipe component can pick the optimizer), and the linear learning-rate scaling rule."""

from __future__ import annotations

from functools import partial

import torch.distributed as dist
from fastai.callback.schedule import ParamScheduler
from fastai.optimizer import Lamb, Larc, lamb_step, larc_step

from ..callback import EffilabCallback
from ..core.batch_schedule import linear_scaling
from ..core.distributed import is_distributed
from ..registry import register

__all__ = ["LambOptimizer", "LarsOptimizer", "LinearScaling", "UseOptimizer"]


class UseOptimizer(EffilabCallback):
    """Train with the optimizer `opt_func(params, lr, **hypers)` instead of the Learner's own.

    fastai's `fit` creates the optimizer (`learn.create_opt()`) *before* the callbacks' `before_fit`, and
    only when the Learner has none. So this callback sets `learn.opt_func` when it joins the Learner
    (`after_create`: the first `fit` and `learn.load(..., with_opt=True)` then build this optimizer) and,
    at `before_fit`, re-creates the optimizer if it is of another kind (a callback added later, or passed
    to `fit(cbs=...)`), carrying over the learning rate `fit` set. The Learner keeps the new `opt_func`
    after a fit that ends; a fit interrupted (an error, Ctrl-C, `CancelFitException`) puts the Learner's
    former `opt_func` and optimizer back.
    """

    order = -20  # before everything that reads the optimizer in before_fit
    telemetry_name = "optimizer"
    opt_name = "optimizer"

    def __init__(self, opt_func, step_marker, **hypers):
        self.opt_func = partial(opt_func, **hypers) if hypers else opt_func
        self.step_marker, self.hypers = step_marker, hypers
        self._former = None  # (opt_func, opt) this fit replaced

    def after_create(self):
        self.learn.opt_func = self.opt_func

    def _is_ours(self) -> bool:
        opt = self.learn.opt
        # getattr: a wrapped PyTorch optimizer (fastai's OptimWrapper, e.g. schedule-free) has no step callbacks
        return opt is not None and any(cb is self.step_marker or getattr(cb, "func", None) is self.step_marker
                                       for cb in getattr(opt, "cbs", ()))

    def before_fit(self):
        self._former = None
        if not self._is_ours():
            self._former = (self.learn.opt_func, self.learn.opt)
        self.learn.opt_func = self.opt_func
        if self.learn.opt is not None and not self._is_ours():
            lrs = [h["lr"] for h in self.learn.opt.hypers]
            self.learn.create_opt()
            self.learn.opt.set_hyper("lr", lrs)
            if self.learn.wd is not None:
                self.learn.opt.set_hypers(wd=self.learn.wd)
        self.telemetry.set_meta(self.telemetry_name, name=self.opt_name,
                                hypers={k: v for k, v in self.hypers.items() if isinstance(v, (int, float, bool))})

    def after_fit(self):
        self._former = None

    def after_cancel_fit(self):
        if self._former is not None:
            self.learn.opt_func, self.learn.opt = self._former
            self._former = None


class LambOptimizer(UseOptimizer):
    """LAMB: Adam with a layer-wise trust ratio, for large batches (fastai's `Lamb`).

    **What it does.** Replaces the Learner's optimizer (Adam by default) with fastai's `Lamb` for the fit
    (see `UseOptimizer` for how: the Learner's `opt_func` is set when the callback joins it).

    **Paper.** You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes",
    ICLR 2020 (arXiv 1904.00962).

    **Defaults.** fastai's: `mom=0.9`, `sqr_mom=0.99`, `eps=1e-5`, `wd=0` (decoupled). Use with the linear
    scaling rule / warm-up of `effilab.core.batch_schedule.scaled_lr_and_warmup` or `LinearScaling`.

    **Use.** `Learner(dls, model, cbs=LambOptimizer(wd=0.01))`; recipes: `lamb(wd=0.01)`.

    **Interactions.** fastai's `lamb_step` reads the trust ratio back to the host for each parameter
    tensor at every step (a sync per tensor on GPUs): a cost of fastai's implementation. One optimizer
    callback per Learner.

    **Telemetry.** Source `"optimizer"`, meta: the optimizer's name and hyper-parameters.
    """

    opt_name = "lamb"

    def __init__(self, mom: float = 0.9, sqr_mom: float = 0.99, eps: float = 1e-5, wd: float = 0.0):
        _check_hypers(mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd)
        super().__init__(Lamb, lamb_step, mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd)


class LarsOptimizer(UseOptimizer):
    """LARS (or LARC): SGD with momentum and a layer-wise learning rate, for large batches (fastai's `Larc`).

    **What it does.** Replaces the Learner's optimizer with fastai's `Larc`: each parameter tensor's step
    is scaled by `trust_coeff * |w| / (|g| + wd * |w| + eps)`; `clip=False` is LARS (the local rate
    multiplies the global one), `clip=True` is LARC (the local rate is capped at the global one).

    **Paper.** You, Gitman & Ginsburg, "Large Batch Training of Convolutional Networks", 2017
    (arXiv 1708.03888).

    **Defaults.** `clip=False` (LARS), fastai's `mom=0.9`, `trust_coeff=0.02`, `eps=1e-8`, `wd=0`.

    **Use.** `Learner(dls, model, cbs=LarsOptimizer())`; recipes: `lars(trust_coeff=0.001)`.

    **Interactions.** As `LambOptimizer` (fastai's `larc_layer_lr` reads norms back per tensor and step).

    **Telemetry.** Source `"optimizer"`, meta: the optimizer's name and hyper-parameters.
    """

    opt_name = "lars"

    def __init__(self, mom: float = 0.9, trust_coeff: float = 0.02, clip: bool = False, eps: float = 1e-8,
                 wd: float = 0.0):
        _check_hypers(mom=mom, eps=eps, wd=wd)
        if not trust_coeff > 0:
            raise ValueError(f"trust_coeff must be > 0, got {trust_coeff!r}")
        self.opt_name = "larc" if clip else "lars"
        super().__init__(Larc, larc_step, mom=mom, trust_coeff=trust_coeff, clip=bool(clip), eps=eps, wd=wd)


def _check_hypers(**hypers):
    for name, v in hypers.items():
        if name in ("mom", "sqr_mom") and not 0 <= v < 1:
            raise ValueError(f"{name} must be in [0, 1), got {v!r}")
        if name == "eps" and not v > 0:
            raise ValueError(f"eps must be > 0, got {v!r}")
        if name == "wd" and not v >= 0:
            raise ValueError(f"wd must be >= 0, got {v!r}")


class _Scaled:
    """A schedule times a constant (picklable)."""

    def __init__(self, sched, scale: float):
        self.sched, self.scale = sched, scale

    def __call__(self, pct):
        return self.sched(pct) * self.scale


class LinearScaling(EffilabCallback):
    """The linear scaling rule: the learning rate given to `fit` is meant for `base_bs`; scale it by the
    actual (global) batch size over `base_bs`.

    **What it does.** At the start of each fit it multiplies the learning rate schedule (`fit_one_cycle`'s,
    or the constant rate of `fit`) by `bs * world_size / base_bs`, with `bs` the training loader's batch
    size at that moment. Warm-up: `fit_one_cycle`'s `pct_start` (see `scaled_lr_and_warmup` for Goyal et
    al.'s 5 warm-up epochs as a fraction of the fit).

    **Paper.** Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", 2017
    (arXiv 1706.02677): lr = 0.1 * bs / 256 for ResNet-50 with SGD, with a gradual warm-up.

    **Defaults.** `base_bs=256` (the paper's reference).

    **Use.** `learn.fit_one_cycle(epochs, 0.1, cbs=LinearScaling(base_bs=256))`; recipes:
    `linear_scaling(base_bs=128)` when the campaign's `--lr` was tuned at batch size 128.

    **Interactions.** Reads the batch size once per fit (a `BatchSizeSchedule` changes it later on purpose:
    that schedule replaces the learning-rate decay). Inactive in `lr_find`.

    **Telemetry.** Source `"linear_scaling"`, stream `"fit"`: batch size, base batch size, scale.
    """

    order = -7  # before BatchSizeSchedule (-6) changes the batch size
    telemetry_name = "linear_scaling"

    def __init__(self, base_bs: int = 256):
        linear_scaling(1.0, base_bs, 1)  # checks base_bs
        self.base_bs = base_bs
        self._pending = self._active = False

    def before_fit(self):
        self._pending = self._active = False
        if hasattr(self.learn, "lr_finder"):
            return
        self._active = True
        world = dist.get_world_size() if is_distributed() else 1
        self.bs = self.learn.dls.train.bs * world
        self.scale = linear_scaling(1.0, self.base_bs, self.bs)
        scheds = [cb for cb in self.learn.cbs if isinstance(cb, ParamScheduler) and "lr" in cb.scheds]
        for cb in scheds:
            if not isinstance(cb.scheds["lr"], _Scaled):
                cb.scheds["lr"] = _Scaled(cb.scheds["lr"], self.scale)
        # Without a scheduler the rate fit set stays for the whole fit: scale it once training starts
        # (validate() fires before_fit too, and must not touch the optimizer).
        self._pending = not scheds

    def before_train(self):
        if not self._active:
            return
        self._active = False  # once per fit
        if self._pending:
            self._pending = False
            self.learn.opt.set_hyper("lr", [h["lr"] * self.scale for h in self.learn.opt.hypers])
        self.telemetry.record(self.telemetry_name, "fit", bs=self.bs, base_bs=self.base_bs, scale=self.scale)


register("lamb", lambda: LambOptimizer(), "optim")
register("lars", lambda: LarsOptimizer(), "optim")
register("linear_scaling", lambda: LinearScaling(base_bs=32), "optim")
