"""SyncFreeRecorder: fastai's smoothed training loss kept on the device, read on the host only now and then."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from fastai.learner import AvgSmoothLoss, Learner
from fastai.torch_core import maybe_gather
from fastcore.basics import patch

from ..callback import EffilabCallback
from ..registry import register

__all__ = ["DeviceSmoothLoss", "SyncFreeRecorder", "host_buffer", "is_host_buffer"]


def host_buffer(n: int, dtype: torch.dtype, pinned: bool) -> torch.Tensor:
    """A host tensor that device values are copied into (pinned when the copy is to run asynchronously).

    It is marked as host memory, so that a check that emulates CUDA's synchronisation rules on the CPU
    (tests/system/test_no_sync.py) knows that reading it waits for no device."""
    buf = torch.empty(n, dtype=dtype, pin_memory=pinned)
    buf._effilab_host = True
    return buf


def is_host_buffer(t: torch.Tensor) -> bool:
    return getattr(t, "_effilab_host", False) or (t.device.type == "cpu" and t.is_pinned())


class DeviceSmoothLoss(AvgSmoothLoss):
    """fastai's `AvgSmoothLoss` (the same exponential average and debiasing) kept on the loss's device.

    fastai's version moves each step's loss to the CPU (`to_detach`), which waits for the device; this
    one lerps on the device. Under DDP the loss is still gathered over ranks (a collective, not a host wait).
    """

    def accumulate(self, learn):
        self.count += 1
        # A plain tensor: fastai's TensorBase adds a Python `__torch_function__` call to every op.
        loss = maybe_gather(learn.loss.mean().detach().as_subclass(torch.Tensor))
        # The first step starts from a zero made where the loss is (fastai's starting zero is a CPU tensor,
        # and copying it to the GPU would wait).
        previous = self.val if self.count > 1 else torch.zeros_like(loss)
        self.val = torch.lerp(loss, previous, self.beta)


class SyncFreeRecorder(EffilabCallback):
    """A fit whose training batches never wait for the device: fastai's Recorder without its per-step read.

    **What it does.** fastai's `Recorder` copies the smoothed training loss to the host after every
    training batch and the progress bar prints it, so every step of a default fastai fit waits for the
    device to finish (on a GPU, the host can no longer queue the next step's kernels while the current
    ones run). With this callback the smoothing runs on the device (`DeviceSmoothLoss`: the same
    arithmetic), each step's smoothed value stays there, and every `every` steps the values since the
    last read are copied to pinned host memory without blocking; they land in `learn.recorder.losses`
    when the copy has finished (polled with a CUDA event, never waited for), and the whole epoch is
    complete when its training ends. `learn.smooth_loss`, which the progress bar shows and other
    callbacks read, is the last value read, as a host tensor: it lags the device by up to `every`
    steps plus the copy.

    **What stays the same.** `learn.recorder.losses`, `lrs`, `values`, `final_record` and the epoch table
    hold what the default Recorder gives (the same values, as 0-dim CPU tensors), from each epoch's end
    on. During `lr_find` it steps aside (the finder compares every step's loss on the host).

    **What it saves.** Host waits: one per `every` steps becomes none. On a CPU nothing (there is no
    device to wait for); on a GPU with small steps, where the host's launch overhead is the bottleneck,
    the step time the host otherwise spends waiting. Other per-step reads are not removed: validation
    losses and training metrics (`Recorder(train_metrics=True)`) are still copied every batch, by fastai.

    **Use.** `Learner(..., cbs=SyncFreeRecorder())` or `learn.sync_free()`.

    **Telemetry** (source `"recorder"`): stream `"read"` at each read point: `iter` (the last step read),
    `epoch`, `smooth_loss` (its smoothed training loss), `n` (steps read).
    """

    order = 51  # after fastai's Recorder (50): takes the value it appended; before the progress bar (60)

    def __init__(self, every: int = 50):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise TypeError(f"every must be a positive int (steps between host reads), got {every!r}")
        self.every = every

    _run: SimpleNamespace | None = None

    def __setattr__(self, name, value):
        # fastai removes a callback with `cb.learn = None`, also in the `finally` of `fit(cbs=...)` after an
        # exception, when no event runs: the Recorder gets its own smoothing back then.
        if name == "learn" and value is None:
            self.after_cancel_fit()
        super().__setattr__(name, value)

    def __getstate__(self):  # pinned buffers and CUDA events stay out of pickles and exports
        return {k: v for k, v in self.__dict__.items() if k != "_run"}

    def before_fit(self):
        self.after_cancel_fit()  # an exception ends a fit with no event: undo what that fit left
        rec = getattr(self.learn, "recorder", None)
        if rec is None or hasattr(self.learn, "lr_finder"):
            return
        original = rec.smooth_loss
        rec.smooth_loss = DeviceSmoothLoss(beta=original.beta)
        self._run = SimpleNamespace(rec=rec, original=original, pending=[], first_iter=0, inflight=[], free=[],
                                    n_landed=0, host=None)

    def before_train(self):
        if self._run is not None:
            self._run.pending, self._run.first_iter = [], self.learn.train_iter

    def after_batch(self):
        run = self._run
        if run is None or not self.training or len(run.rec.losses) == run.n_landed:
            return  # validation, or a batch the Recorder skipped (no targets)
        run.pending.append(run.rec.losses.pop())  # the device value the Recorder just appended
        if len(run.pending) >= self.every:
            self._start_copy()
        self._land(wait=False)
        self._show()

    def _show(self):
        # What the progress bar and other callbacks read: the last value on the host, never the device's.
        host = self._run.host
        if host is not None:
            self.learn.smooth_loss = host
        else:
            self.learn.__dict__.pop("smooth_loss", None)  # nothing read yet in this fit

    def _start_copy(self):
        run = self._run
        k = len(run.pending)
        if not k:
            return
        values = torch.stack(run.pending)
        cuda = values.is_cuda
        # Host buffers are reused: pinned memory is slow to allocate.
        buf = run.free.pop() if run.free else host_buffer(self.every, values.dtype, pinned=cuda)
        buf[:k].copy_(values, non_blocking=True)  # into pinned memory on CUDA: the host does not wait
        run.inflight.append((buf, k, self._copy_done_event(values), run.first_iter + k - 1, self.learn.epoch))
        run.first_iter += k
        run.pending = []

    @staticmethod
    def _copy_done_event(values: torch.Tensor):
        """A CUDA event recorded after the copy, or None where the copy was synchronous (CPU)."""
        if not values.is_cuda:
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def _land(self, wait: bool):
        """Move the finished copies, oldest first, into the Recorder; with `wait`, all of them."""
        run = self._run
        while run.inflight:
            buf, k, event, it, epoch = run.inflight[0]
            if event is not None and not event.query():  # query() asks, it does not wait
                if not wait:
                    return
                event.synchronize()  # sync-ok: the epoch's end
            run.inflight.pop(0)
            values = [torch.tensor(v, dtype=buf.dtype) for v in buf.tolist()[:k]]  # host memory
            run.free.append(buf)
            run.rec.losses.extend(values)
            run.n_landed += k
            run.host = values[-1]
            run.host._effilab_host = True
            self.telemetry.record("recorder", "read", iter=it, epoch=epoch, smooth_loss=float(run.host), n=k)

    def after_train(self):
        if self._run is not None:
            self._flush()

    def _flush(self):
        self._start_copy()
        self._land(wait=True)
        self._show()

    def after_fit(self):
        run = self._run
        if run is None:
            return
        self._flush()
        self._restore()

    def after_cancel_fit(self):
        run = self._run
        if run is not None:
            self._restore()

    def _restore(self):
        # fastai's smoother back, holding where this fit's smoothing ended (on the host, as fastai keeps it)
        run, self._run = self._run, None
        ours, original = run.rec.smooth_loss, run.original
        if isinstance(ours, DeviceSmoothLoss):
            original.count, original.val = ours.count, ours.val.detach().cpu()  # sync-ok: the fit's end
        run.rec.smooth_loss = original


@patch
def sync_free(self: Learner, every: int = 50) -> Learner:
    """Add a `SyncFreeRecorder`: training steps that never wait for the device to report the loss."""
    self.add_cb(SyncFreeRecorder(every))
    return self


register("sync_free_recorder", SyncFreeRecorder, "system", stateful=False)
