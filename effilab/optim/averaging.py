"""Weight averaging as fastai callbacks: EMA (every step), SWA (epoch ends, BatchNorm recomputed) and LAWA
(the latest k epoch ends), over the plain-PyTorch averagers of `effilab.core.averaging`."""

from __future__ import annotations

import random
import warnings

import torch
import torch.distributed as dist
from fastai.torch_core import get_model

from ..callback import EffilabCallback
from ..core.averaging import (
    EmaAverage,
    LawaAverage,
    SwaAverage,
    WeightAverager,
    broadcast_buffers,
    check_decay,
    check_start_frac,
    copy_tensors,
    model_tensors,
    recompute_bn,
)
from ..core.batch_schedule import exact
from ..core.distributed import collective_device, is_distributed
from ..data.pruning import _unwrap_distributed
from ..registry import register

__all__ = ["EMA", "LAWA", "SWA", "WeightAveraging"]


class WeightAveraging(EffilabCallback):
    """What EMA, SWA and LAWA share: an averaged copy of the model, validation with the averaged weights,
    the raw model's validation in telemetry, and the averaged weights in the model after the fit.

    **Validation.** In each epoch where the average holds at least one snapshot, the Learner validates the
    *averaged* weights (swapped into the model for the validation pass and swapped back after it): the
    Recorder's `valid_loss` and metrics are the averaged model's. With `validate_raw=True` (default) the
    raw model is evaluated first on the same validation set (loss and, for classification, accuracy:
    one extra validation pass) and both go to telemetry.

    **Which weights `save`/`export` keep.** During the fit the model holds the raw weights (checkpoints
    written at epoch ends resume the raw training). With `swap_at_end=True` (default) the averaged weights
    are copied into the model at the end of the fit, so `learn.save`, `learn.export` and `predict` use
    them; the raw weights stay in the callback (and in its `state_dict`) and come back at the start of
    the next `fit`, which trains on from them. With `swap_at_end=False` the model keeps the raw weights
    and the average is `cb.averaged_model`. `learn.export` pickles the callbacks too: the exported file
    also carries the average (and the raw weights after a swap), one or two extra copies of the model.

    Each new fit starts a fresh average; a fit resumed with `start_epoch > 0` after `load_checkpoint`
    continues the loaded one. With several averaging callbacks on one Learner, only the first (by order,
    then position) swaps its average in for validation and at the end; the others average and report
    their snapshot counts only (a warning says so).
    """

    order = 60  # after the Recorder (50): its values for the epoch are the averaged model's validation
    telemetry_name = "averaging"

    def __init__(self, swap_at_end: bool = True, validate_raw: bool = True):
        self.swap_at_end, self.validate_raw = bool(swap_at_end), bool(validate_raw)
        self.averager: WeightAverager | None = None
        self.swapped = False  # the model holds the averaged weights; the raw ones are in `_stash`
        self._stash: list[torch.Tensor] | None = None
        self.fit_count = 0
        self._fitting = False  # a real fit trained at least one epoch (validate() fires before_fit too)
        self._in_epoch = False  # this epoch trained (not skipped by a resume, not lr_find, not validate())
        self._validated_avg = False
        self._raw: dict | None = None
        self._leads = True

    # -- for subclasses
    def make_averager(self, model) -> WeightAverager:
        raise NotImplementedError

    def epoch_trained(self) -> None:
        """After each trained epoch (SWA and LAWA take their snapshot here)."""

    def prepare_average(self) -> None:
        """Before the averaged weights go into the model (SWA recomputes BatchNorm statistics here)."""

    def epoch_record(self) -> dict:
        return {}

    # -- helpers
    @property
    def model(self):
        return get_model(self.learn.model)  # the module inside DDP

    @property
    def averaged_model(self):
        """The averaged model (a copy of the Learner's model), or None before the first fit."""
        return None if self.averager is None else self.averager.module

    def _swap_in(self):
        current = model_tensors(self.model)
        if self._stash is None or [t.shape for t in self._stash] != [t.shape for t in current]:
            self._stash = [t.clone() for t in current]
        else:
            copy_tensors(self._stash, current)
        copy_tensors(current, self.averager.tensors())
        self.swapped = True

    def after_model_change(self):
        """The model's parameters changed in number or shape (model growth, inserted gates): the average starts
        again from the model as it is now."""
        if self.averager is not None and not self.swapped:
            self.averager = self.make_averager(self.model).to(next(self.model.parameters()).device)

    def _swap_out(self):
        copy_tensors(model_tensors(self.model), self._stash)
        self.swapped = False

    # -- events
    def before_fit(self):
        self._fitting = self._in_epoch = False
        first = next(cb for cb in self.learn.cbs.sorted("order") if isinstance(cb, WeightAveraging))
        if first is not self and self._leads:
            warnings.warn(f"{type(self).__name__}: {type(first).__name__} on the same Learner validates and keeps "
                          f"its average; {type(self).__name__} only averages (see cb.averaged_model)", stacklevel=2)
        self._leads = first is self

    def before_train(self):
        if hasattr(self.learn, "lr_finder"):
            return
        if self.swapped:  # the previous fit ended with the averaged weights in the model: train on the raw ones
            self._swap_out()
        if not self._fitting:
            self._fitting = True
            model = self.model
            device = next(model.parameters()).device
            if self.averager is None or self.learn.epoch == 0:  # a new fit, not a resumed one
                self.averager = self.make_averager(model)
            self.averager.to(device)
        self._in_epoch = True

    def after_train(self):
        if self._in_epoch:
            # Under DDP, BatchNorm statistics differ between ranks until the next forward: rank 0's
            # everywhere, as DDP's next forward would make them, so every rank averages the same.
            broadcast_buffers(self.model, self.averager.module)
            self.epoch_trained()

    def before_validate(self):
        self._validated_avg, self._raw = False, None
        if not (self._leads and self._in_epoch) or self.averager is None or self.averager.n_averaged == 0:
            return
        if self.validate_raw:
            self._raw = self._evaluate_raw()
        self.prepare_average()
        self._swap_in()
        self._validated_avg = True

    def after_validate(self):
        if self._validated_avg and self.swapped:
            self._swap_out()

    def after_cancel_validate(self):
        self.after_validate()

    def after_cancel_fit(self):
        # Interrupted while validating the average (an error, Ctrl-C): the raw weights go back into the model.
        self.after_validate()
        self._validated_avg = self._in_epoch = False

    def after_epoch(self):
        if not self._in_epoch:
            return
        self._in_epoch = False
        rec = {"fit": self.fit_count, "epoch": self.learn.epoch, "n_averaged": self.averager.n_averaged,
               "validated": "averaged" if self._validated_avg else "raw"}
        rec.update(self._recorder_values())
        if self._raw is not None:
            rec.update({f"raw_{k}": v for k, v in self._raw.items()})
        rec.update(self.epoch_record())
        self.telemetry.record(self.telemetry_name, "epoch", **rec)

    def after_fit(self):
        if not self._fitting:
            return
        self._fitting = self._in_epoch = False
        self.fit_count += 1
        if self._leads and self.swap_at_end and self.averager.n_averaged and not self.swapped:
            self.prepare_average()
            self._swap_in()

    # -- measuring
    def _recorder_values(self) -> dict:
        """The Recorder's validation values of this epoch (the averaged model's when it was validated),
        averaged over the ranks under DDP (each rank validated its shard)."""
        rec = getattr(self.learn, "recorder", None)
        if rec is None or not rec.values or len(rec.values[-1]) < 2:
            return {}
        names = [n for n in rec.metric_names[1:] if n != "time"]  # values hold neither epoch nor time
        pairs = [(n, v) for n, v in zip(names, rec.values[-1]) if n != "train_loss"]
        names = [n for n, _ in pairs]
        values = [float(v) for _, v in pairs]  # sync-ok: host floats, once per epoch
        if is_distributed():
            t = torch.tensor(values, dtype=torch.float64, device=collective_device())
            dist.all_reduce(t)
            values = (t / dist.get_world_size()).tolist()  # sync-ok: a collective's result, once per epoch
        return dict(zip(names, values))

    @torch.no_grad()
    def _evaluate_raw(self) -> dict:
        """Loss (and accuracy for class predictions) of the model as it is, over the whole validation set."""
        model, loss_func = self.model, self.learn.loss_func
        n_inp = getattr(self.learn.dls, "n_inp", 1)
        loss_sum = correct = None
        count = 0
        with _rng_untouched():
            # The whole validation set on every rank under DDP (the same numbers everywhere).
            for b in _unwrap_distributed(self.learn.dls.valid):
                xb, yb = b[:n_inp], b[n_inp:]
                pred = model(*xb)
                n = len(yb[0]) if yb else len(pred)
                loss = loss_func(pred, *yb).detach().float() * n
                loss_sum = loss if loss_sum is None else loss_sum + loss
                if len(yb) == 1 and pred.dim() == 2 and yb[0].dim() == 1 and not yb[0].is_floating_point():
                    c = (pred.argmax(1) == yb[0]).sum()
                    correct = c if correct is None else correct + c
                count += n
        if not count:
            return {}
        out = {"valid_loss": float(loss_sum) / count}  # sync-ok: once per epoch
        if correct is not None:
            out["accuracy"] = int(correct) / count  # sync-ok: once per epoch
        return out

    def _train_inputs(self):
        """The training set's inputs, in order, each sample once (a non-shuffled copy of the training loader
        that leaves the run's random streams alone)."""
        n_inp = getattr(self.learn.dls, "n_inp", 1)
        if n_inp != 1:
            raise TypeError(f"{type(self).__name__} recomputes BatchNorm statistics with a model of one input; "
                            f"this Learner's model takes {n_inp}")
        with _rng_untouched():
            # Under DDP the Learner's loaders are wrapped: every rank passes over the whole training set
            # (the statistics are then averaged over the ranks).
            dl = _unwrap_distributed(self.learn.dls.train).new(shuffle=False, drop_last=False)
            for b in dl:
                yield b[0].as_subclass(torch.Tensor)

    # -- state
    def state_dict(self) -> dict:
        return {"averager": None if self.averager is None else self.averager.state_dict(),
                "fit_count": self.fit_count, "swapped": self.swapped,
                "stash": [t.clone() for t in self._stash] if self.swapped else None}

    def load_state_dict(self, state: dict) -> None:
        self.fit_count = state["fit_count"]
        self.averager = None
        if state["averager"] is not None:
            self.averager = self.make_averager(self.model)
            self.averager.load_state_dict(state["averager"])
        self.swapped = state["swapped"]
        self._stash = None if state["stash"] is None else [t.to(p.device) for t, p in
                                                           zip(state["stash"], model_tensors(self.model))]


class _rng_untouched:
    """Python's and torch's (CPU) random states restored on exit: an extra pass over a loader draws seeds."""

    def __enter__(self):
        self.py, self.torch = random.getstate(), torch.get_rng_state()

    def __exit__(self, *exc):
        random.setstate(self.py)
        torch.set_rng_state(self.torch)


class EMA(WeightAveraging):
    """EMA: an exponential moving average of the weights, updated after every optimizer step.

    **What it does.** Keeps a copy of the model; after each optimizer step it moves the copy towards the
    model: `avg = decay_t * avg + (1 - decay_t) * weights` (parameters and BatchNorm buffers, with
    `torch._foreach_lerp_` on the device: no host read per step). The first step copies the weights.
    Validation, `save` and `export` use the average (see `WeightAveraging`).

    **Paper.** Polyak & Juditsky 1992 (iterate averaging); the exponential form as in TensorFlow's
    `ExponentialMovingAverage` and timm's `ModelEma`. Built on `torch.optim.swa_utils.AveragedModel`.

    **Defaults.** `decay=0.999`, `warmup=True`: update t (t >= 1 snapshots already averaged) uses
    `decay_t = min(decay, (1 + t) / (10 + t))` (TF's `num_updates` rule, timm's warm-up), so a short run
    is not dominated by its first weights; `warmup=False` uses `decay` from the first update on.
    With ~100 steps per epoch a decay of 0.999 averages over ~10 epochs: lower it for short runs.

    **Use.** `Learner(..., cbs=EMA(decay=0.999))`; `learn.fit_one_cycle(...)` as usual.

    **Interactions.** Updates after every other callback's `after_step` (order 60), so it sees the final
    weights of a step (after SAM's second step, say); a step cancelled by `GradientAccumulation` is not
    averaged. Under DDP every rank holds the same weights after the all-reduced step, so every rank's
    average is the same. Inactive in `lr_find`.

    **Telemetry** (source `"ema"`, stream `"epoch"`): snapshots averaged, the current decay, the averaged
    model's valid loss and metrics (the Recorder's) and the raw model's (`raw_valid_loss`, `raw_accuracy`).
    """

    telemetry_name = "ema"

    def __init__(self, decay: float = 0.999, warmup: bool = True, swap_at_end: bool = True,
                 validate_raw: bool = True):
        check_decay(decay)
        super().__init__(swap_at_end, validate_raw)
        self.decay, self.warmup = decay, bool(warmup)
        self._skip_step = False

    def make_averager(self, model):
        return EmaAverage(model, self.decay, self.warmup)

    def after_cancel_step(self):
        self._skip_step = True

    def after_step(self):
        if self._skip_step:  # fastai fires after_step also when the step was cancelled
            self._skip_step = False
        elif self._in_epoch:
            self.averager.update(self.model)

    def epoch_record(self):
        return {"decay": self.averager.current_decay}


class SWA(WeightAveraging):
    """SWA: stochastic weight averaging of the epoch-end weights of the last part of the fit.

    **What it does.** From the epoch that ends at `start_frac` of the fit or later (of the budget's progress
    under an `effilab.budget.Budget`), it averages the
    weights at the end of each epoch with equal weights (`torch.optim.swa_utils`'s SWA rule). BatchNorm
    statistics of averaged weights are not the average of the statistics: before the averaged weights are
    validated or put into the model they are recomputed with `swa_utils.update_bn` over the training set
    (a forward pass over it, in order, through a non-shuffled copy of the Learner's training loader).

    **Paper.** Izmailov, Podoprikhin, Garipov, Vetrov & Wilson, "Averaging Weights Leads to Wider Optima
    and Better Generalization", UAI 2018 (arXiv 1803.05407).

    **Defaults.** `start_frac=0.75` (the last quarter of the fit). The paper runs the averaging phase at
    a constant or cyclical learning rate (`SWALR`); here the fit's own schedule continues (simple, and
    with `fit_one_cycle` the tail is annealed): use `fit` for a constant learning rate.

    **Use.** `Learner(..., cbs=SWA(start_frac=0.75))`. Costs one forward pass over the training set per
    averaged epoch (for the validation of the average) when the model has BatchNorm layers; the bench's
    work column counts it (`forward_only_samples`).

    **Interactions.** Recomputes BatchNorm on every rank over the whole training set and averages the
    statistics across ranks under DDP. Models with several inputs are not supported for the BatchNorm
    pass. Inactive in `lr_find`.

    **Telemetry** (source `"swa"`, stream `"epoch"`): snapshots averaged, samples forwarded to recompute
    BatchNorm (`bn_samples`), averaged and raw validation as for `EMA`.
    """

    telemetry_name = "swa"

    def __init__(self, start_frac: float = 0.75, swap_at_end: bool = True, validate_raw: bool = True):
        check_start_frac(start_frac)
        super().__init__(swap_at_end, validate_raw)
        self.start_frac = start_frac
        self._bn_fresh = True
        self._bn_samples = 0

    def make_averager(self, model):
        self._bn_fresh = True
        return SwaAverage(model)

    def epoch_trained(self):
        self._bn_samples = 0
        from ..budget.clock import budget_of

        budget = budget_of(self.learn)  # a budgeted fit: its progress, the epoch count is only an upper bound
        if budget.progress >= self.start_frac if budget is not None else \
                self.learn.epoch + 1 >= exact(self.start_frac) * self.learn.n_epoch:  # 0.28 of 25: from epoch 6
            self.averager.update(self.model)
            self._bn_fresh = False

    def prepare_average(self):
        if self._bn_fresh:
            return
        n = 0

        def counted():
            nonlocal n
            for x in self._train_inputs():
                n += len(x)
                yield x

        recompute_bn(self.averager.module, counted())
        self._bn_samples += n
        self._bn_fresh = True

    def epoch_record(self):
        return {"bn_samples": self._bn_samples, "forward_only_samples": self._bn_samples}  # the bench's work

    def state_dict(self):
        return super().state_dict() | {"bn_fresh": self._bn_fresh}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self._bn_fresh = state["bn_fresh"]


class LAWA(WeightAveraging):
    """LAWA: latest weight averaging, the mean of the weights at the ends of the latest `k` epochs.

    **What it does.** Keeps the latest `k` epoch-end snapshots (parameters and buffers) on the device
    and validates (and finally keeps) their mean: an average that follows the run, early in the fit too.

    **Paper.** Kaddour, "Stop Wasting My Time! Saving Days of ImageNet and BERT Training with Latest
    Weight Averaging", 2022: the average of the latest epoch-end checkpoints reaches a given accuracy in
    fewer epochs than the raw model, in ImageNet and BERT-style training.

    **Defaults.** `k=5` epoch-end snapshots (fewer while fewer epochs have ended). Memory: k copies of
    the model.

    **Use.** `Learner(..., cbs=LAWA(k=5))`.

    **Interactions.** BatchNorm statistics are averaged with the weights (not recomputed). Under DDP the
    snapshots agree on every rank. Inactive in `lr_find`.

    **Telemetry** (source `"lawa"`, stream `"epoch"`): snapshots averaged, averaged and raw validation as
    for `EMA`.
    """

    telemetry_name = "lawa"

    def __init__(self, k: int = 5, swap_at_end: bool = True, validate_raw: bool = True):
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        super().__init__(swap_at_end, validate_raw)
        self.k = k

    def make_averager(self, model):
        return LawaAverage(model, self.k)

    def epoch_trained(self):
        self.averager.update(self.model)


register("ema", lambda: EMA(decay=0.9), "optim", stateful=True)
register("swa", lambda: SWA(start_frac=0.5), "optim", stateful=True)
register("lawa", lambda: LAWA(k=2), "optim", stateful=True)
