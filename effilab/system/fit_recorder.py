"""FitRecorder: the training curve and the hyper-parameter schedule, planned and actual, as telemetry."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
from fastai.callback.schedule import ParamScheduler
from fastai.learner import SkipToEpoch

from ..callback import EffilabCallback
from ..core.probe import HostCopy
from ..registry import register
from .recorder import SyncFreeRecorder

__all__ = ["FitRecorder", "planned_schedule"]

N_PCT = 201  # points of each planned curve: pct = k/200, exact on the epoch boundaries of up to 200 epochs


def planned_schedule(learn, n_points: int = N_PCT) -> tuple[dict, dict]:
    """The hyper-parameters the Learner's `ParamScheduler`s will set, as functions of `pct_train`.

    Returns `({key: {"pct": [...], "value": [...]}}, {key: (hyper, group)})` with only the hypers that
    move; a key is the hyper's name, or `name/g<i>` per parameter group when the groups differ.
    """
    scheds = {}
    for cb in sorted(learn.cbs, key=lambda c: c.order):  # as fastai runs them: a later one overrides
        if isinstance(cb, ParamScheduler):
            scheds.update(cb.scheds)
    pcts = [k / (n_points - 1) for k in range(n_points)]
    n_groups = len(learn.opt.hypers)
    planned, where = {}, {}
    for name, f in scheds.items():
        values = np.stack([np.broadcast_to(np.asarray(f(p), dtype=np.float64), (n_groups,)) for p in pcts])
        if np.ptp(values) <= 1e-12 * np.abs(values).max():
            continue  # a constant: nothing to plan
        same = np.allclose(values, values[:, -1:], rtol=1e-12, atol=0)
        for g in [n_groups - 1] if same else range(n_groups):
            key = name if same else f"{name}/g{g}"
            planned[key] = {"pct": pcts, "value": values[:, g].tolist()}  # host: numpy, once per fit
            where[key] = (name, g)
    return planned, where


class FitRecorder(EffilabCallback):
    """The fit as the dashboard draws it: smoothed training loss, epoch results and hyper-parameters.

    Per step (thinned: at most one record every `every` steps and `max_per_s` per second, plus the last
    step of each epoch) the smoothed training loss and the optimiser's scheduled hyper-parameters; per
    epoch what fastai's Recorder logged; before training the planned schedules of the Learner's
    `ParamScheduler`s (`fit_one_cycle`, `fit_flat_cos`, ...), sampled at 201 points of `pct_train`.

    The loss is read on the host only at record points: on CUDA it is copied without blocking and
    written at the next record point or at the epoch's end. Inactive during `lr_find`.

    **Use.** `Learner(..., cbs=FitRecorder())`, then any `fit*`; cost per step: a few attribute reads.

    With a `SyncFreeRecorder` on the Learner it reads none of the losses itself: the recorder's own reads (source
    `"recorder"`, stream `"read"`) are the training curve, and the step records carry no `train_loss`.

    **Telemetry.** Source `"fit"`: meta `n_epoch`, `n_iter` (batches of the first epoch), `bs`, `n_train`,
    `metric_names`, `fit_index`, `train_loss_from` (`"fit"`: this stream; `"recorder"`: the sync-free
    recorder's reads); stream `"step"` {`iter`, `epoch`, `pct`, `train_loss` (none with a
    `SyncFreeRecorder`)}; stream `"epoch"`
    {`epoch`, `train_loss`, `valid_loss`, each metric, `time_s`}. Source `"schedule"`: meta `planned`
    {key: {`pct`, `value`}} (keys `lr`, `mom`, ... or `lr/g0`, `lr/g1` when parameter groups differ; only
    hypers that move); stream `"step"` {`iter`, `pct`, key: actual value}. `iter` is the step's index in
    the fit and `pct` the `pct_train` its schedules were evaluated at, so actual and planned line up.
    """

    order, run_valid = 55, False  # after fastai's Recorder (50): its epoch log and smoothed loss are ready

    def __init__(self, every: int = 10, max_per_s: float = 2.0, clock=time.perf_counter):
        self.every, self.max_per_s, self.clock = every, max_per_s, clock

    def _start_fit(self):
        learn, tel = self.learn, self.telemetry
        prev = tel.meta("fit").get("fit_index")
        resumed = any(isinstance(cb, SkipToEpoch) for cb in learn.cbs)  # `fit(start_epoch=...)` continues
        fit_index = 0 if prev is None else prev if resumed else prev + 1
        names = list(getattr(getattr(learn, "recorder", None), "metric_names", []))
        metrics = [n for n in names if n not in ("epoch", "train_loss", "valid_loss", "time")]
        dl = learn.dls.train
        # With a SyncFreeRecorder the loss is read on the host only at its read points, which it writes
        # (source "recorder"): no read here, and the dashboard draws those.
        sync_free = any(isinstance(cb, SyncFreeRecorder) for cb in learn.cbs)
        tel.set_meta("fit", n_epoch=learn.n_epoch, n_iter=len(learn.dl), bs=getattr(dl, "bs", None),
                     n_train=getattr(dl, "n", None), metric_names=metrics, fit_index=fit_index,
                     train_loss_from="recorder" if sync_free else "fit")
        planned, where = planned_schedule(learn)
        # Other techniques keep their own planned keys; this fit's optimiser keys replace the last fit's.
        merged = {k: v for k, v in tel.meta("schedule").get("planned", {}).items() if k not in self._owned}
        self._owned = frozenset(planned)
        tel.set_meta("schedule", planned=merged | planned)
        # Per-fit state in a plain namespace: setting a Callback attribute costs a Learner lookup (~8 us).
        self._run = SimpleNamespace(where=where, copy=None if sync_free else HostCopy(), pending=None, since=0,
                                    last_t=float("-inf"), in_epoch=False, training=False,
                                    t_epoch=time.perf_counter())

    # Class defaults survive unpickling: planned keys this callback wrote, and no run outside a fit.
    _owned: frozenset = frozenset()
    _run: SimpleNamespace | None = None
    _direct = frozenset({"after_batch"})  # it checks `run.training` itself (~5 us a batch saved)

    def __getstate__(self):  # a pickle taken mid-fit (an export from a callback) leaves the run behind
        return {k: v for k, v in self.__dict__.items() if k != "_run"}

    def before_train(self):
        if hasattr(self.learn, "lr_finder"):
            return
        if self._run is None:
            self._start_fit()
        self._run.in_epoch = self._run.training = True

    def before_epoch(self):
        if self._run is not None:
            self._run.t_epoch = time.perf_counter()

    def after_batch(self):
        run = self._run
        if run is None or not run.training:
            return
        run.since += 1
        learn = self.learn
        last = learn.iter == learn.n_iter - 1
        if not last and run.since < self.every:
            return
        now = self.clock()
        if last or now - run.last_t >= 1.0 / self.max_per_s:
            run.since, run.last_t = 0, now
            self._flush()
            hypers = learn.opt.hypers
            # This step's index and the `pct_train` its hypers were set at: fastai has moved both on by one
            # step in its own after_batch (TrainEvalCallback, which runs first).
            it, pct = learn.train_iter - 1, learn.pct_train - 1.0 / (learn.n_iter * learn.n_epoch)
            sched = {k: float(hypers[g][name]) for k, (name, g) in run.where.items()}
            run.pending = ({"iter": it, "epoch": learn.epoch, "pct": pct}, sched)
            if run.copy is None:
                self._flush()
            else:
                run.copy.put(getattr(learn, "smooth_loss", None))
                if not run.copy.deferred:
                    self._flush()

    def _flush(self):
        run = self._run
        if run is None or run.pending is None:
            return
        (fit, sched), run.pending = run.pending, None
        loss = {} if run.copy is None else {"train_loss": run.copy.get()}
        self.telemetry.record("fit", "step", **fit, **loss)
        if sched:
            self.telemetry.record("schedule", "step", iter=fit["iter"], pct=fit["pct"], **sched)

    def after_train(self):
        if self._run is not None:
            self._run.training = False
        self._flush()  # the epoch's last step: a host read at the epoch's end is allowed

    def after_epoch(self):
        run = self._run
        if run is None or not run.in_epoch:
            return  # a skipped epoch (resume) or `validate()`, which fires epoch events too
        run.in_epoch = False
        rec = getattr(self.learn, "recorder", None)
        names, log = list(getattr(rec, "metric_names", [])), list(getattr(rec, "log", []))
        values = {n: v for n, v in zip(names, log) if n not in ("epoch", "time")}
        self.telemetry.record("fit", "epoch", epoch=self.learn.epoch, **values,
                              time_s=time.perf_counter() - run.t_epoch)

    def after_fit(self):
        self._flush()
        self._run = None  # CUDA events and pinned buffers stay out of pickles and exports


register("fit_recorder", FitRecorder, "system")
