"""SyncFreeRecorder: fastai's Recorder results, unchanged, without a host read per training step."""

from __future__ import annotations

import pickle

import pytest
import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.progress import ProgressCallback
from fastai.learner import AvgSmoothLoss
from fastcore.basics import noop

from effilab import telemetry_of
from effilab.system import DeviceSmoothLoss, SyncFreeRecorder

from ..conftest import make_learner


def _pair(every, epochs=2, n=224, **fit):
    """The same fit with fastai's Recorder alone and with SyncFreeRecorder(every)."""
    runs = []
    for cbs in ([], [SyncFreeRecorder(every)]):
        learn = make_learner(cbs, n=n)
        learn.fit_one_cycle(epochs, 1e-2, **fit)
        runs.append(learn)
    return runs


@pytest.mark.parametrize("every", [1, 3, 50])
def test_same_losses_values_and_lrs_as_fastai(every):
    default, sync_free = _pair(every)
    a, b = default.recorder, sync_free.recorder
    assert len(a.losses) == len(b.losses) == 2 * (224 // 32)
    assert all(not t.is_cuda and t.dim() == 0 for t in b.losses)
    assert torch.equal(torch.stack(a.losses), torch.stack(b.losses))
    assert a.values == b.values and a.lrs == b.lrs and a.iters == b.iters
    assert default.final_record == sync_free.final_record
    assert float(sync_free.smooth_loss) == float(a.losses[-1])
    # The Recorder has fastai's smoothing back after the fit.
    assert type(b.smooth_loss) is AvgSmoothLoss and b.smooth_loss.beta == a.smooth_loss.beta
    assert b.smooth_loss.count == a.smooth_loss.count and torch.equal(b.smooth_loss.value, a.smooth_loss.value)


def test_reads_land_every_n_steps_and_the_progress_bar_shows_them():
    seen = []

    class Watch(Callback):
        order = 70  # after the progress bar has updated its comment

        def after_batch(self):
            if self.training:
                seen.append((self.learn.iter, len(self.recorder.losses), self.progress.pbar.comment))

    learn = make_learner([SyncFreeRecorder(every=3), Watch()], n=224)
    learn.add_cb(ProgressCallback())
    learn.fit(2, 1e-2)
    losses = learn.recorder.losses
    n_iter = 224 // 32
    for i, (it, landed, comment) in enumerate(seen):
        epoch_start = (i // n_iter) * n_iter
        expected = epoch_start + 3 * ((it + 1) // 3)  # steps read so far in this epoch (CPU: at once)
        assert landed == expected, (i, landed, expected)
        if landed:
            assert comment == f"{losses[landed - 1].item():.4f}"
    assert seen[0][2] == "" and seen[2][2] != ""  # nothing to show before the first read

    reads = telemetry_of(learn).records("recorder", "read")
    assert [r["n"] for r in reads] == [3, 3, 1, 3, 3, 1]  # every 3 steps, and the rest at each epoch's end
    assert [r["iter"] for r in reads] == [2, 5, 6, 9, 12, 13]
    assert [r["epoch"] for r in reads] == [0, 0, 0, 1, 1, 1]
    for r in reads:
        assert r["smooth_loss"] == pytest.approx(losses[r["iter"]].item())


def test_device_smooth_loss_is_fastai_arithmetic_on_the_device():
    class L:
        pass

    learn = L()
    ours, theirs = DeviceSmoothLoss(0.9), AvgSmoothLoss(0.9)
    for v in [2.0, 1.5, 1.25, 3.0]:
        learn.loss = torch.tensor([v, v / 2])
        ours.accumulate(learn)
        theirs.accumulate(learn)
        assert torch.equal(ours.value, theirs.value)


def test_lr_find_is_left_to_fastai():
    learn = make_learner([SyncFreeRecorder(every=5)], n=224)
    learn.lr_find(num_it=10, show_plot=False)
    assert type(learn.recorder.smooth_loss) is AvgSmoothLoss
    assert not telemetry_of(learn).records("recorder", "read")


def test_interrupted_fits_leave_the_recorder_as_fastai_has_it():
    class Boom(Callback):
        def __init__(self, exc):
            self.exc = exc

        def after_batch(self):
            if self.training and self.iter == 2:
                raise self.exc

    learn = make_learner([], n=224)
    for exc in (CancelFitException(), RuntimeError("boom")):
        try:
            learn.fit(1, 1e-2, cbs=[SyncFreeRecorder(every=5), Boom(exc)])
        except RuntimeError:
            pass
        assert "sync_free_recorder" not in learn.__dict__
        assert type(learn.recorder.smooth_loss) is AvgSmoothLoss
    # A callback kept on the Learner undoes its change as the exception leaves the fit (after_cancel_fit).
    cb = SyncFreeRecorder(every=5)
    learn.add_cb(cb)
    with pytest.raises(RuntimeError):
        learn.fit(1, 1e-2, cbs=Boom(RuntimeError("boom")))
    assert type(learn.recorder.smooth_loss) is AvgSmoothLoss
    learn.fit(1, 1e-2)
    assert type(learn.recorder.smooth_loss) is AvgSmoothLoss and len(learn.recorder.losses) == 7


PICKLED = []


class PickleMidFit(Callback):
    def after_batch(self):
        if self.training and self.iter == 4:
            PICKLED.append(pickle.loads(pickle.dumps(self.learn)).sync_free_recorder)


def test_pickles_mid_fit_without_its_run_and_sync_free_adds_it():
    pickled = PICKLED
    learn = make_learner([PickleMidFit()], n=224)
    learn.logger = noop  # picklable
    assert learn.sync_free(every=4) is learn and isinstance(learn.sync_free_recorder, SyncFreeRecorder)
    learn.fit(1, 1e-2)
    assert pickled[0].every == 4 and pickled[0]._run is None


@pytest.mark.parametrize("every", [0, -1, 2.5, True, "3", None])
def test_bad_every_is_refused(every):
    with pytest.raises(TypeError, match=r"every must be (a positive )?int"):
        SyncFreeRecorder(every)


class _FakeEvent:
    """A CUDA event whose copy takes `polls` queries to finish."""

    log: list = []

    def __init__(self, polls):
        self.polls = polls

    def query(self):
        self.polls -= 1
        return self.polls < 0

    def synchronize(self):
        _FakeEvent.log.append("wait")
        self.polls = -1


def test_asynchronous_copies_land_later_and_the_epoch_end_waits(monkeypatch):
    """The CUDA path with a fake event: values land when the copy reports done, never earlier, and the epoch's
    end waits for the last copy; the results are still fastai's."""
    _FakeEvent.log = []
    monkeypatch.setattr(SyncFreeRecorder, "_copy_done_event", staticmethod(lambda values: _FakeEvent(2)))
    landed = []

    class Watch(Callback):
        order = 70

        def after_batch(self):
            if self.training:
                landed.append(len(self.recorder.losses))

    learn = make_learner([SyncFreeRecorder(every=2), Watch()], n=224)
    learn.fit(1, 1e-2)
    # Copies start after steps 2, 4, 6 (1-based) and finish two queries (steps) later.
    assert landed == [0, 0, 0, 2, 2, 4, 4]
    assert _FakeEvent.log == ["wait"]  # only for the last step's copy, started at the epoch's end
    default = make_learner([], n=224)
    default.fit(1, 1e-2)
    assert torch.equal(torch.stack(learn.recorder.losses), torch.stack(default.recorder.losses))
