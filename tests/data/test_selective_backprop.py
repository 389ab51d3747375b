"""SelectiveBackprop as a fastai callback: the backward batch is the selected subset, never empty."""

from __future__ import annotations

import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.mixup import MixUp

import effilab.data.selective_backprop as sb_module
from effilab import SelectiveBackprop, telemetry_of

from ..conftest import make_learner
from ..spies import HostReadSpy


class TrainedRows(Callback):
    """Rows the model is trained on per batch (what reaches the loss and the backward pass)."""

    order = 100

    def before_fit(self):
        self.rows = []

    def after_loss(self):
        if self.training:
            self.rows.append(self.pred.shape[0])


@pytest.mark.parametrize("beta", [1.0, 3.0])
def test_backpropagates_the_expected_fraction_and_never_an_empty_batch(beta):
    rows = TrainedRows()
    learn = make_learner([SelectiveBackprop(beta=beta, history=256, fixed_size=False, seed=0), rows], n=1024)
    learn.fit(3, 1e-2)
    samples = telemetry_of(learn).records("selective_backprop", "samples")
    assert [r["forwarded"] for r in samples] == [1024] * 3
    backprop = sum(r["backpropagated"] for r in samples)
    assert samples[-1]["backpropagated_total"] == backprop == sum(rows.rows)
    assert min(rows.rows) >= 1 and max(rows.rows) <= 32
    # Percentiles of a batch against the recent history are ~uniform: P(select) ~ 1/(1+beta)
    # (the loss falls while training, so slightly fewer; the first batch is kept whole).
    assert backprop / (3 * 1024) == pytest.approx(1 / (1 + beta), abs=0.08)
    assert samples[-1]["expected_fraction"] == pytest.approx(1 / (1 + beta))
    assert learn.validate()[1] > 0.6


def test_selection_pass_leaves_batchnorm_statistics_to_the_training_pass():
    learn = make_learner([SelectiveBackprop(seed=0)])
    learn.fit(2, 1e-2)
    bn = learn.model[1]
    assert int(bn.num_batches_tracked) == 2 * 16  # one update per step, not two


def test_reported_loss_is_the_whole_batch_mean():
    class Check(Callback):
        order = 100

        def before_fit(self):
            self.pairs = []

        def after_loss(self):
            if self.training:
                self.pairs.append((float(self.learn.loss), float(sb._full_loss), float(self.learn.loss_grad.detach())))

    sb, check = SelectiveBackprop(beta=2.0, seed=0), Check()
    make_learner([sb, check]).fit(1, 1e-2)
    assert all(reported == full for reported, full, _ in check.pairs)
    assert sum(trained > reported for reported, _, trained in check.pairs) > len(check.pairs) / 2  # biggest losers


def test_fixed_size_has_constant_backward_batches_and_no_host_reads(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the exact selection ran")

    monkeypatch.setattr(sb_module, "select_exact", fail)
    spy = HostReadSpy(monkeypatch)
    rows = TrainedRows()
    learn = make_learner([SelectiveBackprop(beta=1.0, fixed_size=True, seed=0), rows, *spy.callbacks()])
    learn.fit(2, 1e-2)
    assert rows.rows == [16] * 32
    assert [r for batch in spy.per_batch for r in batch] == []
    assert telemetry_of(learn).records("selective_backprop", "samples")[-1]["backpropagated_total"] == 16 * 32


def test_stale_variant_skips_the_selection_pass():
    rows = TrainedRows()
    learn = make_learner([SelectiveBackprop(beta=1.0, stale=True, seed=0), rows], n=1024)
    learn.fit(3, 1e-2)
    samples = telemetry_of(learn).records("selective_backprop", "samples")
    assert samples[0]["forwarded"] == samples[0]["backpropagated"] == 1024  # no losses yet: everything
    for r in samples[1:]:
        assert r["forwarded"] == r["backpropagated"] and 380 < r["forwarded"] < 640
    assert samples[-1]["backpropagated_total"] == sum(rows.rows)
    epochs = telemetry_of(learn).records("selective_backprop", "epoch")
    assert epochs[1]["kept"] < 1024 and epochs[1]["mean_select_prob"] == pytest.approx(0.5, abs=0.01)


def test_composes_with_mixup():
    learn = make_learner([SelectiveBackprop(seed=0), MixUp()])
    loss_func = learn.loss_func
    learn.fit(2, 1e-2)
    assert learn.loss_func is loss_func
    r = telemetry_of(learn).records("selective_backprop", "samples")[-1]
    assert r["backpropagated"] < r["forwarded"]


@pytest.mark.parametrize("kwargs, message", [
    ({"beta": 0.0}, "beta must be > 0"), ({"beta": -1}, "beta must be > 0"),
    ({"history": 0}, "history must be an integer >= 1"), ({"history": 2.5}, "history"),
])
def test_bad_parameters_get_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SelectiveBackprop(**kwargs)


def test_resumed_history_is_the_saved_one(tmp_path):
    sb = SelectiveBackprop(history=64, seed=0)
    make_learner([sb]).fit(1, 1e-2)
    other = SelectiveBackprop(history=64, seed=0)
    other.load_state_dict(sb.state_dict())
    assert torch.equal(other.history.values, sb.history.values) and other.history.filled == 64


def test_frozen_batchnorm_keeps_its_counter():
    class FreezeBN(Callback):
        def before_batch(self):
            self.learn.model[1].eval()

    learn = make_learner([SelectiveBackprop(seed=0), FreezeBN()])
    learn.fit(1, 1e-2)
    assert int(learn.model[1].num_batches_tracked) == 0


def test_stale_variant_has_no_host_reads_in_training_batches(monkeypatch):
    spy = HostReadSpy(monkeypatch)
    learn = make_learner([SelectiveBackprop(stale=True, seed=0), *spy.callbacks()])
    learn.fit(3, 1e-2)
    assert 16 < len(spy.per_batch) < 3 * 16
    assert [r for batch in spy.per_batch for r in batch] == []


def test_the_exact_variant_makes_its_one_documented_host_read_per_step(monkeypatch):
    """`fixed_size=False` reads the subset size back (`nonzero`) once per step, and nothing else: the spy
    sees that read (it used to miss it)."""
    spy = HostReadSpy(monkeypatch)
    learn = make_learner([SelectiveBackprop(beta=1.0, fixed_size=False, seed=0), *spy.callbacks()], n=256)
    learn.fit(1, 1e-2)
    assert len(spy.per_batch) == 8
    assert all(len(reads) == 1 and reads[0].startswith("nonzero at ") and "sampling.py" in reads[0]
               for reads in spy.per_batch), spy.per_batch
