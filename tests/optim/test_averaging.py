"""EMA, SWA and LAWA callbacks: averages equal hand-computed ones, validation reports both models,
which weights the model holds, errors, no host reads per step, telemetry."""

from __future__ import annotations

import pytest
import torch
from fastai.callback.core import Callback

from effilab.callback import telemetry_of
from effilab.core.averaging import model_tensors
from effilab.optim import EMA, LAWA, SWA

from ..conftest import make_learner
from ..spies import HostReadSpy


class Snapshots(Callback):
    """Copies of the model's parameters and buffers after every step and at every epoch end (before
    the averaging callbacks, order 60, act)."""

    order = 55

    def before_fit(self):
        self.steps, self.epochs = [], []

    def after_step(self):
        self.steps.append([t.clone() for t in model_tensors(self.learn.model)])

    def after_train(self):
        self.epochs.append([t.clone() for t in model_tensors(self.learn.model)])


class FirstBatch(Callback):
    """The model's weights at the first training batch of each fit."""

    order = 61

    def before_fit(self):
        self.seen = None

    def before_batch(self):
        if self.training and self.seen is None:
            self.seen = [t.clone() for t in model_tensors(self.learn.model)]


def _close(got, want, atol=1e-6):
    return all(torch.allclose(a.float(), b.float(), atol=atol) for a, b in zip(got, want))


def test_ema_in_a_fit_equals_the_manual_average():
    snaps = Snapshots()
    cb = EMA(decay=0.95)
    learn = make_learner([cb, snaps], n=128)
    learn.fit(2, 1e-2)
    expected = snaps.steps[0]
    for t, snap in enumerate(snaps.steps[1:], start=1):
        d = min(0.95, (1 + t) / (10 + t))
        expected = [e * d + s * (1 - d) if s.is_floating_point() else s for e, s in zip(expected, snap)]
    assert cb.averager.n_averaged == len(snaps.steps) == 8
    assert _close(model_tensors(learn.model), expected)  # swap_at_end: the model holds the average
    assert _close(cb._stash, snaps.steps[-1])  # the raw weights are kept


def test_swa_averages_epoch_ends_from_start_frac_and_recomputes_batchnorm():
    snaps = Snapshots()
    cb = SWA(start_frac=0.5)
    learn = make_learner([cb, snaps], n=128)
    learn.fit(4, 1e-2)
    n_params = len(list(learn.model.parameters()))
    # (e + 1) / 4 >= 0.5: the ends of epochs 1, 2 and 3
    mean = [torch.stack([s[i] for s in snaps.epochs[1:]]).mean(0) for i in range(n_params)]
    assert cb.averager.n_averaged == 3
    assert _close(list(learn.model.parameters()), mean)
    # BatchNorm statistics of the averaged weights: a manual pass over the training set, in order
    x = learn.dls.train.dataset.x
    feats = [torch.nn.functional.linear(b, mean[0], mean[1]) for b in x.split(32)]
    bn = learn.model[1]
    assert torch.allclose(bn.running_mean, torch.stack([f.mean(0) for f in feats]).mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var, torch.stack([f.var(0) for f in feats]).mean(0), atol=1e-4)
    recs = telemetry_of(learn).records("swa", "epoch")
    assert [r["n_averaged"] for r in recs] == [0, 1, 2, 3]
    assert [r["validated"] for r in recs] == ["raw", "averaged", "averaged", "averaged"]
    assert [r["bn_samples"] for r in recs] == [0, 128, 128, 128]


def test_lawa_averages_the_latest_k_epoch_ends():
    snaps = Snapshots()
    cb = LAWA(k=2)
    learn = make_learner([cb, snaps], n=128)
    learn.fit(4, 1e-2)
    want = [(a + b) / 2 if a.is_floating_point() else b for a, b in zip(snaps.epochs[2], snaps.epochs[3])]
    assert _close(model_tensors(learn.model), want)
    assert [r["n_averaged"] for r in telemetry_of(learn).records("lawa", "epoch")] == [1, 2, 2, 2]


@pytest.mark.parametrize("make", [lambda: EMA(decay=0.9, swap_at_end=False), lambda: LAWA(k=2, swap_at_end=False)])
def test_validation_reports_the_averaged_model_and_telemetry_the_raw_one(make):
    cb = make()
    learn = make_learner([cb], n=128)
    learn.fit(3, 5e-2)
    rec = telemetry_of(learn).records(cb.telemetry_name, "epoch")[-1]
    recorded = float(learn.recorder.values[-1][1])
    # swap_at_end=False: the model holds the raw weights; the Recorder validated the averaged ones
    raw_loss, raw_acc = learn.validate()
    assert rec["raw_valid_loss"] == pytest.approx(raw_loss, rel=1e-5)
    assert rec["raw_accuracy"] == pytest.approx(raw_acc)
    assert rec["valid_loss"] == pytest.approx(recorded)
    assert rec["valid_loss"] != pytest.approx(raw_loss, rel=1e-5)
    saved = [t.clone() for t in model_tensors(learn.model)]
    copy = [t.clone() for t in model_tensors(cb.averaged_model)]
    for t, a in zip(model_tensors(learn.model), copy):
        t.copy_(a)
    assert learn.validate()[0] == pytest.approx(rec["valid_loss"], rel=1e-5)
    for t, s in zip(model_tensors(learn.model), saved):
        t.copy_(s)


def test_swap_at_end_then_a_second_fit_trains_on_from_the_raw_weights():
    cb = EMA(decay=0.9)

    spy = FirstBatch()
    learn = make_learner([cb, spy], n=128)
    learn.fit(1, 1e-2)
    raw = [t.clone() for t in cb._stash]
    averaged = [t.clone() for t in model_tensors(learn.model)]
    assert not _close(raw, averaged)
    recorded = float(learn.recorder.values[-1][1])
    assert learn.validate()[0] == pytest.approx(recorded, rel=1e-5)  # the model holds what was validated
    learn.fit(1, 1e-2)
    assert _close(spy.seen, raw, atol=0)
    assert cb.averager.n_averaged == 4  # a fresh average for the new fit


def test_ema_reads_nothing_back_per_step(monkeypatch):
    spy = HostReadSpy(monkeypatch)
    learn = make_learner([EMA(decay=0.9), *spy.callbacks()], n=128)
    learn.fit(1, 1e-2)
    assert len(spy.per_batch) == 4 and all(not reads for reads in spy.per_batch), spy.per_batch


def test_telemetry_per_epoch():
    learn = make_learner([EMA(decay=0.9)], n=128)
    learn.fit_one_cycle(2, 1e-2)
    recs = telemetry_of(learn).records("ema", "epoch")
    assert [r["epoch"] for r in recs] == [0, 1] and [r["n_averaged"] for r in recs] == [4, 8]
    assert all({"valid_loss", "accuracy", "raw_valid_loss", "raw_accuracy", "decay"} <= set(r) for r in recs)
    assert recs[1]["decay"] == pytest.approx(min(0.9, 9 / 18))


def test_inactive_in_lr_find():
    cb = EMA()
    learn = make_learner([cb], n=128)
    learn.lr_find(num_it=5, show_plot=False)
    assert cb.averager is None and not telemetry_of(learn).records("ema", "epoch")


def test_bad_parameters():
    for d in (0, 1, 1.5):
        with pytest.raises(ValueError, match="decay"):
            EMA(decay=d)
    for s in (1.0, -0.2):
        with pytest.raises(ValueError, match="start_frac"):
            SWA(start_frac=s)
    for k in (0, 2.5):
        with pytest.raises(ValueError, match="k must"):
            LAWA(k=k)


def test_two_averagers_on_one_learner_the_first_swaps_the_other_only_averages():
    ema, lawa, first = EMA(decay=0.9), LAWA(k=2), FirstBatch()
    learn = make_learner([ema, lawa, first], n=128)
    with pytest.warns(UserWarning, match="only averages"):
        learn.fit(2, 1e-2)
    assert _close(model_tensors(learn.model), ema.averager.tensors(), atol=0)
    assert lawa.averager.n_averaged == 2 and not lawa.swapped
    assert [r["validated"] for r in telemetry_of(learn).records("lawa", "epoch")] == ["raw", "raw"]
    raw = [t.clone() for t in ema._stash]
    learn.fit(1, 1e-2)  # trains on from the raw weights, not from either average
    assert _close(first.seen, raw, atol=0)


def test_effilab_exports():
    import effilab
    import effilab.optim

    assert effilab.EMA is EMA and effilab.optim.SWA is SWA and effilab.LAWA is LAWA


def test_swa_starts_at_the_exact_fraction_of_the_fit():
    """start_frac=0.28 of 25 epochs: the first averaged epoch is the one that ends at 7/25 (index 6), not 7 as
    0.28 * 25 = 7.000000000000001 in floats would make it."""
    swa = SWA(start_frac=0.28, validate_raw=False)
    learn = make_learner([swa], n=64)
    learn.fit(25, 1e-3)
    n_averaged = [r["n_averaged"] for r in telemetry_of(learn).records("swa", "epoch")]
    assert n_averaged.index(1) == 6 and n_averaged[-1] == 19
