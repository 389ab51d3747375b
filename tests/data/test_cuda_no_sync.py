"""The data-centric callbacks on a CUDA device: no host synchronisation inside training steps."""

from __future__ import annotations

import pytest
import torch
from fastai.callback.core import Callback

from effilab import EasyToHard, InfoBatch, ProgressiveResize, SeqLenWarmup

from ..conftest import make_learner

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class SyncError(Callback):
    """Any host sync from before_batch to the end of the loss (epochs > 0, after warm-up) raises."""

    order = -100

    def before_batch(self):
        if self.training and self.epoch > 0:
            torch.cuda.set_sync_debug_mode("error")

    def after_loss(self):
        torch.cuda.set_sync_debug_mode("default")

    def after_cancel_batch(self):
        torch.cuda.set_sync_debug_mode("default")


class Close(Callback):
    order = 1000

    def after_batch(self):
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("make, task", [(lambda: ProgressiveResize(), "image"), (lambda: SeqLenWarmup(), "sequence"),
                                        (lambda: EasyToHard(seed=0), "tabular"),
                                        (lambda: InfoBatch(0.5, seed=0), "tabular")])
def test_no_cuda_sync_in_training_steps(make, task):
    cb = make()
    learn = make_learner([cb, SyncError(), Close()], task=task, n=256)
    learn.dls.to("cuda")
    learn.model.cuda()
    learn.fit(3, 1e-2)
    assert learn.telemetry.records(cb.telemetry_name, "epoch")
