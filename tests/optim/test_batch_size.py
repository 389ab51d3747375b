"""BatchSizeSchedule: the batch sizes asked for, every sample once per epoch, steps, pct_train, errors."""

from __future__ import annotations

import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from torch import nn

from effilab.callback import telemetry_of
from effilab.datasets import ArrayDataset
from effilab.optim import BatchSizeSchedule

N = 100


def _indexed_learner(cbs, num_workers=0, drop_last=False):
    """A Learner whose training inputs are their own indices (x = [index])."""
    x = torch.arange(N + 20, dtype=torch.float32)[:, None]
    y = (torch.arange(N + 20) % 4)
    dls = DataLoaders(DataLoader(ArrayDataset(x[:N], y[:N]), bs=8, shuffle=True, drop_last=drop_last,
                                 num_workers=num_workers),
                      DataLoader(ArrayDataset(x[N:], y[N:]), bs=5), device="cpu")
    torch.manual_seed(0)
    learn = Learner(dls, nn.Linear(1, 4), loss_func=CrossEntropyLossFlat(), cbs=cbs)
    learn.remove_cb(ProgressCallback)
    learn.logger = lambda *a, **k: None
    return learn


class Seen(Callback):
    order = 100

    def before_fit(self):
        self.train, self.valid_bs, self.pct = {}, set(), []

    def before_batch(self):
        if self.training:
            self.train.setdefault(self.epoch, []).append(self.xb[0][:, 0].long().tolist())
        else:
            self.valid_bs.add(len(self.xb[0]))

    def after_batch(self):
        if self.training:
            self.pct.append(self.learn.pct_train)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batch_sizes_and_every_sample_once_per_epoch(num_workers):
    seen = Seen()
    learn = _indexed_learner([BatchSizeSchedule(milestones=(0.5, 0.75), factor=2), seen], num_workers)
    learn.fit(4, 1e-2)
    for epoch, bs in enumerate([8, 8, 16, 32]):
        batches = seen.train[epoch]
        assert [len(b) for b in batches[:-1]] == [bs] * (len(batches) - 1) and len(batches[-1]) <= bs
        assert sorted(i for b in batches for i in b) == list(range(N))  # every sample once
    assert seen.valid_bs <= {5}  # validation untouched
    assert learn.dls.train.bs == 8  # restored after the fit
    recs = telemetry_of(learn).records("batch_size_schedule", "epoch")
    assert [r["bs"] for r in recs] == [8, 8, 16, 32]
    assert [r["steps"] for r in recs] == [13, 13, 7, 4]  # ceil(100 / bs)
    # pct_train: each epoch is 1/n_epoch of the fit however many steps it has; monotonic, ends at 1
    assert all(b > a for a, b in zip(seen.pct, seen.pct[1:])) and seen.pct[-1] == pytest.approx(1.0)


def test_explicit_sizes_and_schedule_telemetry():
    learn = _indexed_learner([BatchSizeSchedule(milestones=(0.25, 0.5), sizes=[10, 20, 50])], drop_last=True)
    learn.fit(4, 1e-2)
    tel = telemetry_of(learn)
    assert [r["bs"] for r in tel.records("batch_size_schedule", "epoch")] == [10, 20, 50, 50]
    assert [r["steps"] for r in tel.records("batch_size_schedule", "epoch")] == [10, 5, 2, 2]
    planned = tel.meta("schedule")["planned"]["bs"]
    assert planned["value"] == [10, 10, 20, 20, 50, 50, 50, 50] and planned["pct"][-1] == 1.0
    steps = tel.records("schedule", "step")
    assert [s["bs"] for s in steps] == [10, 10, 20, 20, 50, 50, 50, 50]
    assert [s["pct"] for s in steps][::2] == [0.0, 0.25, 0.5, 0.75]


def test_hold_lr_keeps_one_cycle_at_its_peak_after_the_warm_up():
    learn = _indexed_learner([BatchSizeSchedule(hold_lr=True)])
    learn.fit_one_cycle(4, 0.1, pct_start=0.25)
    lrs = learn.recorder.lrs
    peak = max(lrs)
    assert peak == pytest.approx(0.1, rel=1e-3)
    assert lrs[0] < 0.01 and lrs[-1] == pytest.approx(0.1, rel=1e-3)  # warm-up, then no annealing
    plain = _indexed_learner([BatchSizeSchedule()])
    plain.fit_one_cycle(4, 0.1, pct_start=0.25)
    assert plain.recorder.lrs[-1] < 0.01  # without hold_lr: one-cycle anneals


def test_too_large_a_batch_with_drop_last_is_an_error():
    learn = _indexed_learner([BatchSizeSchedule(milestones=(0.5,), sizes=[8, 128])], drop_last=True)
    with pytest.raises(ValueError, match="larger than the 100 training samples"):
        learn.fit(2, 1e-2)


@pytest.mark.parametrize("kwargs, match", [
    ({"milestones": (0.75, 0.5)}, "strictly increasing"),
    ({"milestones": (0.5, 1.0)}, r"in \(0, 1\)"),
    ({"milestones": (0.0,)}, r"in \(0, 1\)"),
    ({"milestones": ()}, "at least one"),
    ({"factor": 0.5}, "factor must be"),
    ({"milestones": (0.5,), "sizes": [64, 32]}, "strictly increasing"),
    ({"milestones": (0.5,), "sizes": [32, 64, 128]}, "one batch size per phase"),
    ({"milestones": (0.5,), "sizes": [0, 64]}, "positive integers"),
    ({"milestones": (0.5,), "sizes": [32, 64], "factor": 2}, "not both"),
])
def test_schedule_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BatchSizeSchedule(**kwargs)


def test_inactive_in_lr_find():
    learn = _indexed_learner([BatchSizeSchedule(milestones=(0.01,), factor=4)])
    learn.lr_find(num_it=5, show_plot=False)
    assert learn.dls.train.bs == 8 and not telemetry_of(learn).records("batch_size_schedule", "epoch")


def test_the_dashboard_draws_the_batch_size_schedule():
    from effilab.viz.figures import cells

    learn = _indexed_learner([BatchSizeSchedule(milestones=(0.5,), factor=4)])
    learn.fit(2, 1e-2)
    cell = next(c for c in cells(telemetry_of(learn)) if c.key == "schedule/bs")
    names = [t["name"] for t in cell.traces]
    assert names == ["schedule/bs: planned", "schedule/bs: actual"]
    assert max(cell.traces[1]["y"]) == 32 and min(cell.traces[1]["y"]) == 8
