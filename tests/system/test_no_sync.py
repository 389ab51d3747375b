"""A whole fastai fit with `SyncFreeRecorder` and any registered technique makes no host read inside
training batches (before_batch to after_batch), counted strictly on the CPU and, with a GPU, enforced by
`torch.cuda.set_sync_debug_mode("error")`."""

from __future__ import annotations

import sys

import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback
from torch.utils._python_dispatch import TorchDispatchMode

from effilab.registry import all_techniques
from effilab.system.recorder import SyncFreeRecorder, is_host_buffer

from ..conftest import make_learner

aten = torch.ops.aten

# Ops that make CUDA wait for the device (their result's size or value is needed on the host).
SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
            aten.is_nonzero.default, aten.equal.default, aten._unique.default, aten._unique2.default,
            aten.unique_dim.default, aten.unique_consecutive.default, aten.bincount.default,
            aten.repeat_interleave.Tensor}
PY_READS = ("tolist", "numpy", "cpu")  # on a CPU tensor these dispatch nothing: caught at the Python level

# Techniques whose per-step work needs a host read, with the reason.
_FASTAI_TRUST_RATIO = ("fastai's {} optimizer compares each layer's norms on the host (`if r1 == 0 or r2 == 0`, "
                       "`min(r1 / r2, ...)` in fastai/optimizer.py): one read per parameter tensor per step")
NEEDS_A_READ = {"lamb": _FASTAI_TRUST_RATIO.format("Lamb"), "lars": _FASTAI_TRUST_RATIO.format("Larc")}


class HostReadCounter(TorchDispatchMode):
    """Counts, per training batch, what would make a CUDA host wait for the device, with everything on the CPU.

    Every tensor counts as a device tensor except host buffers (pinned memory on CUDA,
    `effilab.system.recorder.host_buffer` here). Caught: `item()`/`float()`/`bool()`/formatting, `nonzero`,
    boolean-mask indexing and assignment, `masked_select`, `unique`, `bincount`, `repeat_interleave`
    without a size, `equal`, `tolist()`, `numpy()`, `.cpu()` and blocking copies into host buffers.
    `callbacks()` open the window before every other callback's `before_batch` and close it after every
    other callback's `after_batch`.
    """

    def __init__(self, monkeypatch):
        super().__init__()
        self.per_batch: list[list[str]] = []
        self.open = False
        self.cuda_free = 0
        for name in PY_READS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))
        monkeypatch.setattr(torch.nn.functional, "one_hot", self._one_hot(torch.nn.functional.one_hot))

    def _one_hot(self, original):
        # On the CPU `one_hot` reads its input's min and max to check it; on CUDA, given `num_classes`,
        # it leaves the check to a device assert and reads nothing.
        counter = self

        def one_hot(tensor, num_classes=-1):
            counter.cuda_free += num_classes >= 0
            try:
                return original(tensor, num_classes)
            finally:
                counter.cuda_free -= num_classes >= 0
        return one_hot

    def _note(self, what):
        f = sys._getframe(2)
        skip = ("wrapper", "__torch_dispatch__")
        while f is not None and ("/torch/" in f.f_code.co_filename or f.f_code.co_name in skip):
            f = f.f_back
        where = f"{f.f_code.co_filename}:{f.f_lineno}" if f is not None else "?"
        self.per_batch[-1].append(f"{what} at {where}")

    def _wrap(self, name, original):
        counter = self

        def wrapper(tensor, *args, **kwargs):
            if counter.open and not is_host_buffer(tensor):
                counter._note(name)
            return original(tensor, *args, **kwargs)
        return wrapper

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.open and not self.cuda_free and self._syncs(func, args, kwargs):
            self._note(str(func))
        return func(*args, **kwargs)

    @staticmethod
    def _syncs(func, args, kwargs):
        if func in SYNC_OPS:
            return not (torch.is_tensor(args[0]) and is_host_buffer(args[0]))
        if func is aten.repeat_interleave.self_Tensor:
            return kwargs.get("output_size") is None and (len(args) < 4 or args[3] is None)
        if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default):
            return any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in args[1])
        if func is aten.copy_.default:  # a blocking copy into host memory waits for the device
            dst, src = args[0], args[1]
            blocking = not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
            return blocking and is_host_buffer(dst) and not is_host_buffer(src)
        return False

    def callbacks(self):
        counter = self

        class OpenWindow(Callback):
            order = -1000

            def before_batch(self):
                if self.training:
                    counter.per_batch.append([])
                    counter.open = True

        class CloseWindow(Callback):
            order = 1000

            def after_batch(self):
                counter.open = False

        return [OpenWindow(), CloseWindow()]

    def reads(self) -> list[str]:
        return sorted({r for batch in self.per_batch for r in batch})


def _fit(cbs, monkeypatch, task="tabular", epochs=2, progress=True):
    counter = HostReadCounter(monkeypatch)
    learn = make_learner([*cbs, *counter.callbacks()], n=192, task=task)
    if progress:
        learn.add_cb(ProgressCallback())
    with counter:
        learn.fit(epochs, 1e-2)
    return learn, counter


def test_counter_sees_each_kind_of_read(monkeypatch):
    """The check can fail: a callback that reads in each way is caught, once per kind per batch."""

    class Reads(Callback):
        order = 20

        def after_loss(self):
            if not self.training:
                return
            x = self.learn.loss.detach().as_subclass(torch.Tensor).reshape(1)
            y = torch.arange(4.0)
            float(x), x.item(), bool(x > 0), f"{x[0]:.2f}", x.tolist(), x.cpu(), x.numpy()
            y.nonzero(), y[y > 1], torch.where(y > 1), y.unique(), y.masked_select(y > 1)
            y[y > 2] = 0.0
            host_buffer = torch.empty(1)
            host_buffer._effilab_host = True
            host_buffer.copy_(x)

    learn, counter = _fit([SyncFreeRecorder(every=3), Reads()], monkeypatch, epochs=1)
    assert len(counter.per_batch) == len(learn.dls.train)
    reads = " ".join(counter.reads())
    for kind in ("_local_scalar_dense", "tolist", "cpu", "numpy", "nonzero", "index.Tensor", "unique",
                 "masked_select", "index_put", "copy_"):
        assert kind in reads, (kind, reads)
    assert "test_no_sync.py" in reads  # the reads are located at their call sites


def test_default_fastai_fit_reads_every_step(monkeypatch):
    """Without SyncFreeRecorder fastai's Recorder and progress bar read the loss in every training batch."""
    _, counter = _fit([], monkeypatch)
    assert counter.per_batch and all(counter.per_batch)
    reads = " ".join(counter.reads())
    assert "fastai" in reads and "cpu" in reads


def _techniques():
    return sorted(all_techniques().items())


@pytest.mark.parametrize("name, tech", _techniques(), ids=[n for n, _ in _techniques()])
def test_no_host_read_in_any_training_batch(name, tech, monkeypatch):
    if name in NEEDS_A_READ:
        pytest.skip(NEEDS_A_READ[name])
    cbs = [tech.make()] if name != "sync_free_recorder" else []
    learn, counter = _fit([*cbs, SyncFreeRecorder(every=4)], monkeypatch, task=tech.task)
    assert len(counter.per_batch) >= 2
    bad = [(i, reads) for i, reads in enumerate(counter.per_batch) if reads]
    assert not bad, f"{name}: host reads inside training batches: {bad[:3]}"
    assert len(learn.recorder.values) == 2 and len(learn.recorder.losses) == len(counter.per_batch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name, tech", _techniques(), ids=[n for n, _ in _techniques()])
def test_no_cuda_sync_in_any_training_batch(name, tech):
    if name in NEEDS_A_READ:
        pytest.skip(NEEDS_A_READ[name])

    class SyncError(Callback):
        order = -1000

        def before_batch(self):
            if self.training:
                torch.cuda.set_sync_debug_mode("error")

    class Close(Callback):
        order = 1000

        def after_batch(self):
            torch.cuda.set_sync_debug_mode("default")

    cbs = [tech.make()] if name != "sync_free_recorder" else []
    learn = make_learner([*cbs, SyncFreeRecorder(every=4), SyncError(), Close()], n=192, task=tech.task)
    learn.add_cb(ProgressCallback())
    learn.dls.to("cuda")
    learn.model.cuda()
    try:
        learn.fit(2, 1e-2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(learn.recorder.values) == 2
    assert all(not loss.is_cuda for loss in learn.recorder.losses)


# Settings (not the registered ones) that need a host read per step, with the reason.
SETTINGS_THAT_READ = {
    "selective_backprop(fixed_size=False)": (
        lambda: __import__("effilab").SelectiveBackprop(fixed_size=False, seed=0),
        "the paper's exact rule keeps a random number of samples per batch: the batch's size is only known "
        "on the host after a read (the default fixed_size=True draws a fixed k on the device)"),
}


@pytest.mark.parametrize("label", sorted(SETTINGS_THAT_READ))
def test_settings_that_need_a_read_are_caught(label, monkeypatch):
    make, _reason = SETTINGS_THAT_READ[label]
    _, counter = _fit([make(), SyncFreeRecorder(every=4)], monkeypatch, progress=False)
    assert any(counter.per_batch), f"{label} is listed as reading per step but no read was seen"
