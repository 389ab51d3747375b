"""Spies shared by tests: host reads (syncs) made by effilab code inside training batches."""

from __future__ import annotations

import sys
from pathlib import Path

import fastai.callback.core
import fastai.learner
import torch
from fastai.callback.core import Callback
from torch.utils._python_dispatch import TorchDispatchMode

import effilab

EFFILAB_DIR = str(Path(effilab.__file__).parent)
# The training loop and fastai's own callbacks: a read made from there (the Recorder's) is not effilab's.
FASTAI_LOOP = (str(Path(fastai.learner.__file__)), str(Path(fastai.callback.core.__file__).parent))
# Tensor methods that read to the host without an aten op on the CPU (or before it): patched on the class.
HOST_READS = ("item", "cpu", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")
# effilab's own plumbing, on the stack of every callback's event: not where a read is made.
_PLUMBING = {("callback.py", "_with_events"), ("callback.py", "__call__")}

aten = torch.ops.aten
# Ops whose result the host must see before it can go on: a scalar read, or an output whose size depends on
# the values (the host allocates it). Boolean-mask indexing and assignment go through nonzero on the device.
_SYNCING = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default, aten.nonzero.default,
            aten.nonzero_numpy.default, aten.nonzero_static.default, aten.masked_select.default,
            aten._unique.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
            aten.unique_dim_consecutive.default, aten.argwhere.default, aten._assert_async.default,
            aten._assert_async.msg}
_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
_REPEAT_INTERLEAVE = {aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}


def _needs_host(func, args, kwargs) -> bool:
    if func in _SYNCING:
        return True
    if func in _INDEXING:  # with a boolean mask among the indices
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] or ()))
    if func in _REPEAT_INTERLEAVE:  # the output size is the sum of the repeats unless given
        return kwargs.get("output_size") is None and (len(args) < 4 or args[3] is None)
    return False


def effilab_caller() -> str | None:
    """`file:line` of the effilab code that made the current call, or None: the innermost effilab frame
    between here and the fastai training loop (effilab's own event plumbing excluded)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(EFFILAB_DIR):
            if (Path(name).name, frame.f_code.co_name) not in _PLUMBING:
                return f"{name}:{frame.f_lineno}"
        elif name.startswith(FASTAI_LOOP):
            return None  # the training loop or a fastai callback: not effilab's read
        frame = frame.f_back
    return None


class _HostOps(TorchDispatchMode):
    def __init__(self, spy: HostReadSpy):
        super().__init__()
        self.spy = spy

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        spy = self.spy
        if spy.open and not spy._in_method and _needs_host(func, args, kwargs):
            where = effilab_caller()
            if where is not None:
                spy.per_batch[-1].append(f"{func.overloadpacket.__name__} at {where}")
        return func(*args, **kwargs)


class HostReadSpy:
    """Counts device-to-host reads made by effilab code, per training batch.

    Sees the Tensor methods that read (`.item()`, `.cpu()`, `.tolist()`, `float(t)`, `bool(t)`, ...) and,
    through a `TorchDispatchMode`, every op whose result the host needs: `nonzero`, boolean-mask indexing
    and assignment, `masked_select`, `unique`, `repeat_interleave` without `output_size`, a tensor's truth
    value (`if torch.any(t)`), `torch.equal`. A read counts as effilab's when effilab code is the innermost
    caller before the fastai training loop.

    `callbacks()` returns two callbacks that open the window before every other callback's
    `before_batch` and close it after every other callback's `after_batch`, so nothing of a batch is
    missed. `per_batch` lists, for each training batch, the reads seen (as "name at file:line").
    """

    def __init__(self, monkeypatch):
        self.per_batch: list[list[str]] = []
        self.open = False
        self._in_method = 0
        self._mode: _HostOps | None = None
        for name in HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))

    def _wrap(self, name, original):
        def wrapper(tensor, *args, **kwargs):
            if self.open and not self._in_method:
                where = effilab_caller()
                if where is not None:
                    self.per_batch[-1].append(f"{name} at {where}")
            self._in_method += 1  # the aten ops it runs are this read, not another one
            try:
                return original(tensor, *args, **kwargs)
            finally:
                self._in_method -= 1
        return wrapper

    def _close(self):
        self.open = False
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None

    def callbacks(self):
        spy = self

        class Open(Callback):
            order = -1000

            def before_batch(self):
                if self.training:
                    spy.per_batch.append([])
                    spy.open = True
                    spy._mode = _HostOps(spy)
                    spy._mode.__enter__()

        class Close(Callback):
            order = 1000

            def after_batch(self):
                spy._close()

            def after_fit(self):
                spy._close()

            after_cancel_fit = after_fit

        return [Open(), Close()]
