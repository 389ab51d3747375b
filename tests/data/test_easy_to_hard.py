"""EasyToHard: the first epoch uses everything, later epochs the easiest fraction by the pacing curve."""

from __future__ import annotations

import math

import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.mixup import MixUp

from effilab import EasyToHard, telemetry_of

from ..conftest import make_learner
from ..spies import HostReadSpy


class Plans(Callback):
    """Each epoch's plan and the scores it was made from (right after EasyToHard's `before_train`)."""

    order = -4

    def before_fit(self):
        self.plans = []

    def before_train(self):
        cb = next(c for c in self.learn.cbs if isinstance(c, EasyToHard))
        self.plans.append((cb.plan.indices.clone(), cb.table.scores.clone(), self.learn.pct_train))


def _fit(cb, epochs=4, n=256, extra=()):
    plans = Plans()
    learn = make_learner([cb, plans, *extra], n=n)
    learn.fit(epochs, 1e-2)
    return learn, plans


def test_first_epoch_uses_all_then_the_easiest_fraction_by_the_pacing():
    cb = EasyToHard(start_frac=0.3, full_at=0.75, seed=0)
    learn, plans = _fit(cb, epochs=4)
    sizes = [len(idx) for idx, _, _ in plans.plans]
    assert sizes[0] == 256  # no scores yet: everything
    for (idx, scores, pct), size in zip(plans.plans[1:], sizes[1:]):
        frac = 0.3 + 0.7 * min(1.0, pct / 0.75)
        assert size == math.ceil(frac * 256)
        # the kept samples are the lowest scores (latest losses) the plan was made from
        assert set(idx.tolist()) == set(torch.sort(scores, stable=True).indices[:size].tolist())
    assert sizes[1] < sizes[2] < sizes[3] == 256
    recs = telemetry_of(learn).records("easy_to_hard", "epoch")
    assert [r["kept"] for r in recs] == sizes
    for (idx, scores, _), r in zip(plans.plans[1:3], recs[1:3]):
        assert r["threshold"] == pytest.approx(float(scores[idx].max()))


def test_scores_are_the_latest_losses():
    cb = EasyToHard(start_frac=0.5, full_at=0.5, seed=0)
    learn, plans = _fit(cb, epochs=2)
    x, y = learn.dls.train.dataset.x, learn.dls.train.dataset.y
    learn.model.eval()  # BatchNorm: the table holds train-mode losses, so compare within a tolerance
    assert (cb.table.scores != 1.0).all()  # every sample has a loss after the full first epoch
    with torch.no_grad():
        now = torch.nn.functional.cross_entropy(learn.model(x), y, reduction="none")
    assert torch.corrcoef(torch.stack([now, cb.table.scores]))[0, 1] > 0.8


def test_schedule_telemetry_planned_and_actual():
    cb = EasyToHard(start_frac=0.3, full_at=0.5, seed=0)
    learn, plans = _fit(cb, epochs=4)
    tel = telemetry_of(learn)
    planned = tel.meta("schedule")["planned"]["data_frac"]
    actual = tel.records("schedule", "step")
    assert [r["pct"] for r in actual] == [0.0, 0.25, 0.5, 0.75]
    assert [r["data_frac"] for r in actual] == [1.0, math.ceil(0.65 * 256) / 256, 1.0, 1.0]
    for r in actual:  # the planned pacing is what each epoch used (up to rounding to whole samples)
        assert planned["value"][round(r["pct"] * 200)] == pytest.approx(r["data_frac"], abs=1 / 256)
    assert tel.records("easy_to_hard", "samples")[-1]["forwarded_total"] == 256 * 3 + math.ceil(0.65 * 256) // 32 * 32


def test_same_seed_same_plans_and_own_generator():
    _, a = _fit(EasyToHard(seed=3), epochs=3)
    _, b = _fit(EasyToHard(seed=3), epochs=3)
    for (ia, _, _), (ib, _, _) in zip(a.plans, b.plans):
        assert torch.equal(ia, ib)
    _, c = _fit(EasyToHard(seed=4), epochs=3)
    assert not torch.equal(a.plans[1][0], c.plans[1][0])


def test_works_under_mixup():
    cb = EasyToHard(start_frac=0.5, full_at=0.5, seed=0)
    learn, plans = _fit(cb, epochs=4, extra=[MixUp(0.4)])
    assert len(plans.plans[1][0]) == 192 and (cb.table.scores != 1.0).all()
    assert type(learn.loss_func).__name__ == "CrossEntropyLossFlat"  # the wrappers are gone after the fit


def test_no_host_sync_in_training_batches(monkeypatch):
    spy = HostReadSpy(monkeypatch)
    learn = make_learner([EasyToHard(seed=0), *spy.callbacks()], n=128)
    learn.fit(3, 1e-2)
    assert len(spy.per_batch) >= 8
    assert [r for batch in spy.per_batch for r in batch] == []


@pytest.mark.parametrize("kwargs", [{"start_frac": 0.0}, {"start_frac": 1.2}, {"full_at": -0.1}, {"full_at": 1.5},
                                    {"momentum": 1.0}])
def test_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        EasyToHard(**kwargs)
