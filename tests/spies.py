"""Spies shared by tests: host reads (syncs) made by effilab code inside training batches."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from fastai.callback.core import Callback

import effilab

EFFILAB_DIR = str(Path(effilab.__file__).parent)
HOST_READS = ("item", "cpu", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")


class HostReadSpy:
    """Counts tensor-to-host reads made by effilab code, per training batch.

    `callbacks()` returns two callbacks that open the window before every other callback's
    `before_batch` and close it after every other callback's `after_batch`, so nothing of a batch is
    missed. `per_batch` lists, for each training batch, the reads seen (as "name at file:line").
    """

    def __init__(self, monkeypatch):
        self.per_batch: list[list[str]] = []
        self.open = False
        for name in HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))

    def _wrap(self, name, original):
        def wrapper(tensor, *args, **kwargs):
            if self.open:
                frame = sys._getframe(1)
                if frame.f_code.co_filename.startswith(EFFILAB_DIR):
                    self.per_batch[-1].append(f"{name} at {frame.f_code.co_filename}:{frame.f_lineno}")
            return original(tensor, *args, **kwargs)
        return wrapper

    def callbacks(self):
        spy = self

        class Open(Callback):
            order = -1000

            def before_batch(self):
                if self.training:
                    spy.per_batch.append([])
                    spy.open = True

        class Close(Callback):
            order = 1000

            def after_batch(self):
                spy.open = False

        return [Open(), Close()]
