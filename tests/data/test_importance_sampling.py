"""ImportanceSampling as a fastai callback: uniform first, then loss-proportional draws weighted back."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback

from effilab import ImportanceSampling, telemetry_of

from ..conftest import make_learner
from ..spies import HostReadSpy


class Batches(Callback):
    """Per training batch: the sample indices, the backpropagated loss and what the weights predict."""

    order = 100

    def __init__(self, cb):
        self.cb, self.epochs = cb, []

    def before_train(self):
        self.epochs.append([])

    def after_loss(self):
        if self.training and self.cb.active:
            idx = self.cb.plan_dl.batch_idx
            losses = F.cross_entropy(self.pred.float(), self.yb[0], reduction="none")
            expected = (losses * self.cb.plan.weights[idx]).mean()
            self.epochs[-1].append((idx.clone(), self.learn.loss_grad.detach().clone(), expected.detach()))


def test_uniform_first_epoch_then_weighted_draws_with_replacement():
    ims = ImportanceSampling(uniform=0.2, seed=0)
    rec = Batches(ims)
    learn = make_learner([ims, rec], n=512)
    learn.fit(4, 1e-2)
    first = torch.cat([b[0] for b in rec.epochs[0]])
    assert sorted(first.tolist()) == list(range(512))  # a uniform epoch: every sample once, weights 1
    tel = telemetry_of(learn).records("importance_sampling", "epoch")
    assert tel[0]["kept"] == 512 and tel[0]["max_weight"] == tel[0]["min_weight"] == 1.0
    for epoch in rec.epochs[1:]:
        idx = torch.cat([b[0] for b in epoch])
        assert idx.numel() == 512 and idx.unique().numel() < 480  # drawn with replacement
        for _, got, expected in epoch:  # the backpropagated loss is the weighted mean
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    later = tel[-1]
    assert later["kept"] < 480 and later["max_weight"] <= 1 / 0.2 + 1e-4 and later["min_weight"] < 1
    assert 0 < later["ess"] < 1 and later["prob_spread"] > 1.5
    # The draws favour high scores: drawn samples have a higher mean score than the table.
    table = ims.table.scores
    assert table[ims.plan.indices].mean() > table.mean()
    samples = telemetry_of(learn).records("importance_sampling", "samples")
    assert [r["forwarded"] for r in samples] == [512] * 4
    assert learn.validate()[1] > 0.6


def test_second_fit_samples_from_the_first_fits_scores():
    ims = ImportanceSampling(seed=0)
    learn = make_learner([ims], n=256)
    learn.fit(1, 1e-2)
    learn.fit(1, 1e-2)
    first, second = telemetry_of(learn).records("importance_sampling", "epoch")
    assert first["max_weight"] == 1.0 and second["max_weight"] > 1.0 and second["fit"] == 1


def test_draws_below_one_forward_fewer_samples():
    learn = make_learner([ImportanceSampling(draws=0.5, seed=0)], n=512)
    learn.fit(3, 1e-2)
    assert [r["forwarded"] for r in telemetry_of(learn).records("importance_sampling", "samples")] == [256] * 3


def test_no_host_sync_in_training_batches(monkeypatch):
    spy = HostReadSpy(monkeypatch)
    learn = make_learner([ImportanceSampling(seed=0), *spy.callbacks()])
    learn.fit(3, 1e-2)
    assert len(spy.per_batch) == 3 * 16
    assert [r for batch in spy.per_batch for r in batch] == []


@pytest.mark.parametrize("kwargs, message", [
    ({"uniform": 0.0}, r"uniform must be in \(0, 1\]"), ({"uniform": 1.5}, "uniform"),
    ({"momentum": 1.0}, r"momentum must be None or in \[0, 1\)"), ({"draws": 0.0}, r"draws must be in \(0, 1\]"),
])
def test_bad_parameters_get_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImportanceSampling(**kwargs)


def test_lr_find_is_left_alone():
    learn = make_learner([ImportanceSampling(seed=0)])
    learn.lr_find(num_it=10, show_plot=False)
    assert telemetry_of(learn).records("importance_sampling", "epoch") == []
