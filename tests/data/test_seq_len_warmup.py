"""SeqLenWarmup: the lengths each training batch had, full length on time, telemetry, bad parameters."""

from __future__ import annotations

import pytest
from fastai.callback.core import Callback

from effilab import SeqLenWarmup, telemetry_of

from ..conftest import SEQ_LEN, make_learner
from ..spies import HostReadSpy


class Lengths(Callback):
    """The (x, y) lengths the model saw in each batch, after every `before_batch`, with pct_train."""

    order = 50

    def before_fit(self):
        self.train_lengths, self.valid_lengths = [], []

    def before_batch(self):
        x, y = self.learn.xb[0], self.learn.yb[0]
        rec = (self.learn.pct_train, x.shape[0], x.shape[1], y.shape[1])
        (self.train_lengths if self.training else self.valid_lengths).append(rec)


def _fit(cb, epochs=4, n=320, bs=32):
    lengths = Lengths()
    learn = make_learner([cb, lengths], n=n, bs=bs, task="sequence")
    learn.fit(epochs, 1e-2)
    return learn, lengths


def test_lengths_grow_and_are_full_from_warmup_frac_on():
    learn, lengths = _fit(SeqLenWarmup(start=8, warmup_frac=0.5, multiple=8))
    assert all(tx == ty for _, _, tx, ty in lengths.train_lengths)  # x and y cut alike
    ts = [tx for _, _, tx, _ in lengths.train_lengths]
    assert ts[0] == 8 and ts == sorted(ts) and set(ts) == {8, 16, 24, 32}
    assert all(t == SEQ_LEN for p, _, t, _ in lengths.train_lengths if p >= 0.5 - 1e-9)  # full on time
    assert all(t < SEQ_LEN for p, _, t, _ in lengths.train_lengths if p < 0.5 * (1 - 8 / 24))
    assert all(t % 8 == 0 for t in ts)
    assert lengths.valid_lengths and all(t == SEQ_LEN for _, _, t, _ in lengths.valid_lengths)


def test_planned_curve_and_tokens_forwarded():
    learn, lengths = _fit(SeqLenWarmup(start=8, warmup_frac=0.5, multiple=8), epochs=4, n=320)
    tel = telemetry_of(learn)
    planned = tel.meta("schedule")["planned"]["seq_len"]
    for pct, _, t, _ in lengths.train_lengths:  # 40 batches: every pct is a point k/200 of the curve
        assert planned["value"][round(pct * 200)] == t
    recs = tel.records("seq_len_warmup", "epoch")
    assert sum(r["tokens_forwarded"] for r in recs) == sum(n * t for _, n, t, _ in lengths.train_lengths)
    assert sum(r["tokens_full"] for r in recs) == 320 * 4 * SEQ_LEN
    assert recs[0]["relative"] < 1.0 == recs[-1]["relative"]
    assert [r["seq_len"] for r in tel.records("schedule", "step")] == sorted(
        r["seq_len"] for r in tel.records("schedule", "step"))


def test_a_short_fit_still_warms_up():
    _, lengths = _fit(SeqLenWarmup(start=8, warmup_frac=0.5), epochs=1)
    ts = [t for _, _, t, _ in lengths.train_lengths]
    assert ts[0] == 8 and ts[-1] == SEQ_LEN


def test_training_lowers_the_loss_with_warmup():
    learn = make_learner([SeqLenWarmup(start=8, warmup_frac=0.5)], n=320, task="sequence")
    before, _ = learn.validate()
    learn.fit_one_cycle(3, 1e-2)
    after, acc = learn.validate()
    assert after < before - 0.5 and acc > 0.1


def test_no_host_sync_in_training_batches(monkeypatch):
    spy = HostReadSpy(monkeypatch)
    learn = make_learner([SeqLenWarmup(), *spy.callbacks()], task="sequence", n=128)
    learn.fit(2, 1e-2)
    assert len(spy.per_batch) == 8
    assert [r for batch in spy.per_batch for r in batch] == []


def test_start_as_a_fraction_of_the_full_length():
    _, lengths = _fit(SeqLenWarmup(start=0.5, warmup_frac=0.5), epochs=2)
    ts = [t for _, _, t, _ in lengths.train_lengths]
    assert ts[0] == 16 and ts[-1] == SEQ_LEN and set(ts) == {16, 24, 32}


@pytest.mark.parametrize("kwargs", [{"start": 0}, {"start": 4.0}, {"start": True}, {"start": 0.0},
                                    {"warmup_frac": 0.0}, {"warmup_frac": 1.5},
                                    {"multiple": 0}])
def test_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        SeqLenWarmup(**kwargs)


def test_flat_batches_get_a_clear_error():
    import torch

    learn = make_learner([SeqLenWarmup()])
    learn.dls.train.dataset.x = torch.randn(512)  # (N,) inputs: nothing to cut
    with pytest.raises(TypeError, match="sequence batches"):
        learn.fit(1, 1e-2)
