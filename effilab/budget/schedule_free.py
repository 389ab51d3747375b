"""Schedule-free optimisation (the `schedulefree` package) as a fastai callback that owns the optimizer's
train()/eval() switching, its learning rate and momentum, and the BatchNorm statistics of the evaluated weights."""

from __future__ import annotations

import math
from functools import partial
from itertools import islice

import numpy as np
import schedulefree  # imported with the module (about a second: it loads torch.distributed), not in a timed fit
import torch
from fastai.optimizer import OptimWrapper

from ..callback import EffilabCallback
from ..core.averaging import recompute_bn
from ..data.pruning import _unwrap_distributed
from ..optim.averaging import _rng_untouched
from ..registry import register
from .schedules import _check_lr, _find_peak

__all__ = ["ScheduleFree"]


def _optimizers():
    return {"adamw": schedulefree.AdamWScheduleFree, "sgd": schedulefree.SGDScheduleFree}


class ScheduleFree(EffilabCallback):
    """Schedule-free training: no decay, no stopping time, an average of the iterates evaluated instead.

    **What it does.** Trains with the `schedulefree` package's `AdamWScheduleFree` (or `SGDScheduleFree`,
    `kind="sgd"`), wrapped in fastai's `OptimWrapper`. The optimizer keeps two sequences: gradients are
    taken at y (an interpolation, what the parameters hold while training) and the evaluated weights are
    x, a running average of the z iterates. This callback owns the switching that the package leaves to the
    training loop: `optimizer.train()` (parameters = y) when each epoch's training starts, and
    `optimizer.eval()` (parameters = x) when it ends, so validation, epoch-end checkpoints
    (`save_checkpoint`), and `save`/`export`/`predict` after the fit all see x. Before x is validated its
    BatchNorm statistics are recomputed over the first `bn_batches` training batches (in order, random
    streams untouched; `torch.optim.swa_utils.update_bn`), as the package's README asks. It sets the
    learning rate (a linear warm-up over the first `warmup` of the budget or fit, then constant) and the
    momentum `beta` at each step, after fastai's `ParamScheduler`: `fit_one_cycle`'s learning-rate and
    momentum cycles are overridden (a changing beta would corrupt the x/y conversion).

    **Paper.** Defazio, Yang, Mehta, Mishchenko, Khaled & Cutkosky, "The Road Less Scheduled", NeurIPS
    2024 (arXiv 2405.15682): matches or beats cosine and linear decay without knowing the stopping time;
    Schedule-Free AdamW won the AlgoPerf 2024 self-tuning track. Anytime by construction: x is a finished
    model at every epoch end.

    **Defaults.** `kind="adamw"`, `beta=0.9` (the package's), `warmup=0.05` (the README recommends a
    warm-up), `wd=0`, `bn_batches=50` (the README's ~50 batches). The learning rate is `lr` when given,
    else the peak of the fit's (`fit_one_cycle(n, lr_max)`'s `lr_max`); the package advises 1-10x the usual
    AdamW rate and 10-50x the SGD one: it needs tuning.

    **Measured.** In the `LinearDecay` comparison (MNIST-1D, 8k samples, small MLP, lr 1e-2, 3 seeds)
    schedule-free AdamW reached 64.7 +- 0.6% at 2 epochs of samples (one-cycle 60.1 +- 1.9) and 76.4 +- 0.8%
    at 8 (one-cycle 75.2 +- 0.9), with the 50-batch BatchNorm pass after each epoch (not in the budget; the
    bench's work column counts it as forward-only work).

    **Use.** `Learner(dls, model, cbs=ScheduleFree())` then `learn.fit(...)` or `fit_budget(...,
    schedule="schedule_free")`. Given at `Learner(...)` the optimizer stays on the Learner between fits
    (the next fit continues its state); passed to `fit(cbs=...)` the Learner's own optimizer comes back after
    the fit (the weights stay at x).

    **Interactions.** Replaces the optimizer: not with another optimizer callback (LAMB, LARS, SAM's
    two-step update). Weight averaging (EMA, SWA) of y is redundant with x. Models with several inputs get
    no BatchNorm pass. Inactive in `lr_find`.

    **Saves.** The stopping time: no budget needs to be known in advance (one run, evaluated anytime).

    **Telemetry.** Source `"schedule_free"`, stream `"epoch"` {fit, epoch, lr, beta, bn_samples,
    forward_only_samples} (both the BatchNorm pass's samples; the bench's work column reads the second).
    """

    order = 65  # after fastai's ParamScheduler (60): this callback has the last word on lr and momentum
    telemetry_name = "schedule_free"

    def __init__(self, lr=None, kind: str = "adamw", beta: float = 0.9, warmup: float = 0.05, wd: float = 0.0,
                 bn_batches: int = 50):
        self.lr = _check_lr(lr)
        if kind not in ("adamw", "sgd"):
            raise ValueError(f"kind must be 'adamw' or 'sgd', got {kind!r}")
        for name, v, lo in (("beta", beta, 0.0), ("warmup", warmup, 0.0), ("wd", wd, 0.0)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo:
                raise ValueError(f"{name} must be a finite number >= {lo}, got {v!r}")
        if not beta < 1 or not warmup < 1:
            raise ValueError(f"beta and warmup must be < 1, got beta={beta!r}, warmup={warmup!r}")
        if isinstance(bn_batches, bool) or not isinstance(bn_batches, int) or bn_batches < 0:
            raise ValueError(f"bn_batches must be an integer >= 0, got {bn_batches!r}")
        self.kind, self.beta, self.warmup, self.wd, self.bn_batches = kind, float(beta), float(warmup), wd, bn_batches
        self.fit_count = 0
        self._permanent = False  # given to Learner(...), not to fit(cbs=...)
        self._previous_opt_func = None
        self._peak = None
        self._bn_samples = 0

    def opt_func(self, params, lr, **kwargs):
        opt = _optimizers()[self.kind]
        hypers = {"weight_decay": self.wd} | (
            {"betas": (self.beta, 0.999)} if self.kind == "adamw" else {"momentum": self.beta})
        return OptimWrapper(params, opt=partial(opt, **hypers), lr=lr, **kwargs)

    def _is_ours(self, opt) -> bool:
        return isinstance(opt, OptimWrapper) and isinstance(opt.opt, tuple(_optimizers().values()))

    def _optimizer_mode(self, train: bool) -> None:
        opt = self.learn.opt
        opt.set_hyper("mom", self.beta)  # the conversion between x and y uses the current beta
        opt.opt.train() if train else opt.opt.eval()

    # -- events
    def after_create(self):
        self._permanent = True
        self._previous_opt_func, self.learn.opt_func = self.learn.opt_func, self.opt_func

    def before_fit(self):
        self._peak = None
        opt = self.learn.opt
        if self._is_ours(opt) and opt.opt.param_groups[0]["train_mode"]:
            self._optimizer_mode(False)  # an interrupted fit left y in the model: x is the model

    def before_train(self):
        learn = self.learn
        if hasattr(learn, "lr_finder"):
            if self._is_ours(learn.opt):
                self._optimizer_mode(True)  # lr_find steps the optimizer: it must be in train mode
            return
        if self._peak is None:  # the first trained epoch of this fit
            if not self._is_ours(learn.opt):
                lrs = [h["lr"] for h in learn.opt.hypers]
                if self._previous_opt_func is None:
                    self._previous_opt_func = learn.opt_func
                learn.opt_func = self.opt_func
                learn.create_opt()
                learn.opt.set_hyper("lr", lrs)
            self._peak = self.lr if self.lr is not None else _find_peak(learn)
            self._peak = np.broadcast_to(np.asarray(self._peak, dtype=float), (len(learn.opt.hypers),)).copy()
        self._optimizer_mode(True)
        self._set_hypers()

    def _set_hypers(self):
        p = float(self.learn.pct_train)
        scale = min(1.0, p / self.warmup) if self.warmup else 1.0
        lr = self._peak * scale
        opt = self.learn.opt
        opt.set_hyper("lr", lr if len(lr) > 1 else float(lr[0]))
        opt.set_hyper("mom", self.beta)

    def before_batch(self):
        if self._peak is not None and self.training:
            self._set_hypers()

    def after_train(self):
        if self._peak is None:
            return
        self._optimizer_mode(False)
        self._bn_samples = self._recompute_bn()
        self.telemetry.record(self.telemetry_name, "epoch", fit=self.fit_count, epoch=self.learn.epoch,
                              lr=float(self.learn.opt.hypers[0]["lr"]), beta=self.beta, bn_samples=self._bn_samples,
                              forward_only_samples=self._bn_samples)  # the BatchNorm pass: work, not free

    def _recompute_bn(self) -> int:
        if not self.bn_batches or getattr(self.learn.dls, "n_inp", 1) != 1:
            return 0
        n = 0

        def inputs():
            nonlocal n
            with _rng_untouched():
                dl = _unwrap_distributed(self.learn.dls.train).new(shuffle=False, drop_last=False)
                for b in islice(dl, self.bn_batches):
                    n += len(b[0])
                    yield b[0].as_subclass(torch.Tensor)

        recompute_bn(self.learn.model, inputs())
        return n

    def after_fit(self):
        if self._is_ours(self.learn.opt) and hasattr(self.learn, "lr_finder"):
            self._optimizer_mode(False)
        if self._peak is None:
            return
        self._peak = None
        self.fit_count += 1
        if self._is_ours(self.learn.opt) and self.learn.opt.opt.param_groups[0]["train_mode"]:
            self._optimizer_mode(False)
        if not self._permanent and self._previous_opt_func is not None:
            # leaving with fit(cbs=...): the Learner's own optimizer comes back, the weights stay at x
            self.learn.opt_func, self._previous_opt_func = self._previous_opt_func, None
            self.learn.opt = None

    def after_cancel_fit(self):
        self.after_fit()

    def state_dict(self) -> dict:
        return {"fit_count": self.fit_count}

    def load_state_dict(self, state: dict) -> None:
        self.fit_count = state["fit_count"]


register("schedule_free", lambda: ScheduleFree(bn_batches=4), "budget")
