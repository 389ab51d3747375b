"""The base of curricula that reshape each training batch by a schedule of `pct_train` (progressive
resizing, sequence-length warmup): the planned curve and the actual values as "schedule" telemetry, and
the work forwarded per epoch relative to the full-size batches."""

from __future__ import annotations

from types import SimpleNamespace

from ..callback import EffilabCallback
from ..core.curriculum import planned_curve

__all__ = ["BatchScheduleCallback"]


class BatchScheduleCallback(EffilabCallback):
    """Subclasses give `key` (the schedule's name), `unit` (what is counted) and these methods:
    `full_size(xb, yb)` (the batch's full size, Python ints, no host read), `size_at(pct, full)` (the size
    at `pct`, whose `value_of` is the schedule's value), `units(size)` (work per sample at that size) and
    `reshape(xb, yb, size, full)` -> (xb, yb). Training batches only; inactive in validation and `lr_find`."""

    order = -2  # before MixUp/CutMix (order 0): they mix whatever size the batch has by then
    key = "size"
    unit = "units"

    def __init__(self):
        self.forwarded_total = 0  # units forwarded, over every fit (survives a resume)
        self.full_total = 0  # what the full-size batches would have forwarded

    # -- for subclasses
    def full_size(self, xb, yb):
        raise NotImplementedError

    def size_at(self, pct: float, full):
        raise NotImplementedError

    def value_of(self, size) -> int:
        return size

    def units(self, size) -> int:
        raise NotImplementedError

    def reshape(self, xb: tuple, yb: tuple, size, full) -> tuple[tuple, tuple]:
        raise NotImplementedError

    # -- events
    # Per-fit state in a plain namespace: setting a Callback attribute costs a Learner lookup per step.
    _run: SimpleNamespace | None = None

    def before_fit(self):
        self._run = None if hasattr(self.learn, "lr_finder") else SimpleNamespace(
            full=None, last=None, last_step=None, epoch_fwd=0, epoch_full=0)

    def before_train(self):
        if self._run is not None:
            self._run.epoch_fwd = self._run.epoch_full = 0

    def before_batch(self):
        run = self._run
        if run is None or not self.training:
            return
        learn = self.learn
        full = self.full_size(learn.xb, learn.yb)  # shapes are host ints: no sync
        if run.full != full:
            run.full = full
            self._plan(full)
        pct = learn.pct_train
        size = self.size_at(pct, full)
        learn.xb, learn.yb = self.reshape(learn.xb, learn.yb, size, full)
        n = learn.xb[0].shape[0]
        run.epoch_fwd += n * self.units(size)
        run.epoch_full += n * self.units(full)
        value = self.value_of(size)
        run.last_step = (learn.train_iter, pct)
        if value != run.last:  # the actual curve: one record per change
            run.last = value
            self.telemetry.record("schedule", "step", iter=learn.train_iter, pct=pct, **{self.key: value})
            run.last_step = None

    def after_train(self):
        run = self._run
        if run is None or run.full is None:
            return
        self.forwarded_total += run.epoch_fwd
        self.full_total += run.epoch_full
        u = self.unit
        self.telemetry.record(self.telemetry_name, "epoch", epoch=self.learn.epoch, **{
            self.key: run.last, f"{u}_forwarded": run.epoch_fwd, f"{u}_full": run.epoch_full,
            "relative": run.epoch_fwd / max(1, run.epoch_full),
            f"{u}_forwarded_total": self.forwarded_total, f"{u}_full_total": self.full_total})
        if run.last_step is not None:  # and the epoch's last batch, so the drawn curve reaches the epoch's end
            it, pct = run.last_step
            self.telemetry.record("schedule", "step", iter=it, pct=pct, **{self.key: run.last})
            run.last_step = None

    def after_fit(self):
        self._run = None

    def _plan(self, full) -> None:
        tel = self.telemetry
        curve = planned_curve(lambda p: self.value_of(self.size_at(p, full)))
        tel.set_meta("schedule", planned=tel.meta("schedule").get("planned", {}) | {self.key: curve})
        tel.set_meta(self.telemetry_name, full=list(full) if isinstance(full, tuple) else full)

    def planned(self) -> dict | None:
        """The planned curve this callback wrote (None before its first training batch)."""
        return self.telemetry.meta("schedule").get("planned", {}).get(self.key)

    def state_dict(self) -> dict:
        return {"forwarded_total": self.forwarded_total, "full_total": self.full_total}

    def load_state_dict(self, state: dict) -> None:
        self.forwarded_total, self.full_total = state["forwarded_total"], state["full_total"]
