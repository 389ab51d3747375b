"""StaticPrune as a fastai callback: full data until scored, then exactly the hardest subset."""

from __future__ import annotations

import pytest
import torch
from fastai.callback.core import Callback

from effilab import StaticPrune, telemetry_of
from effilab.core.sampling import el2n

from ..conftest import make_learner
from ..spies import HostReadSpy


class Seen(Callback):
    """The dataset indices each training epoch forwarded."""

    order = 100

    def __init__(self, cb):
        self.cb, self.epochs = cb, []

    def before_train(self):
        self.epochs.append([])

    def after_batch(self):
        if self.training:
            self.epochs[-1] += self.cb.plan_dl.batch_idx.tolist()


@pytest.mark.parametrize("score, score_epoch", [("el2n", 1), ("loss", 2)])
def test_full_data_until_scored_then_exactly_the_hardest(score, score_epoch):
    sp = StaticPrune(fraction=0.25, score=score, score_epoch=score_epoch, seed=0)
    seen = Seen(sp)
    learn = make_learner([sp, seen], n=512)
    learn.fit(4, 1e-2)
    for epoch in seen.epochs[:score_epoch]:
        assert sorted(epoch) == list(range(512))
    scores = sp.table.scores
    assert torch.isfinite(scores).all()  # every sample was scored in the scoring epoch
    hardest = set(scores.argsort(descending=True)[:384].tolist())
    for epoch in seen.epochs[score_epoch:]:
        assert len(epoch) == 384 and set(epoch) == hardest
    assert seen.epochs[-1] != seen.epochs[-2]  # reshuffled each epoch
    kept = [r["kept"] for r in telemetry_of(learn).records("static_prune", "epoch")]
    assert kept == [512] * score_epoch + [384] * (4 - score_epoch)
    assert learn.validate()[1] > 0.6


@pytest.mark.parametrize("score", ["el2n", "loss"])
def test_every_sample_is_scored_by_the_model_as_it_stands_after_the_scoring_epochs(score):
    """Not the losses of the moving model during the epoch: a separate no-grad pass after it, with the
    training-mode forward (BatchNorm on batch statistics), which leaves the model as it was."""
    class Snapshot(Callback):
        def __init__(self, order):
            self.order, self.states = order, []

        def after_train(self):  # before (order -10) and after (100) StaticPrune's scoring pass
            if self.epoch == 0:
                self.states.append({k: v.clone() for k, v in self.learn.model.state_dict().items()})

    sp, before, after = StaticPrune(fraction=0.5, score=score, seed=0), Snapshot(-10), Snapshot(100)
    learn = make_learner([sp, before, after])
    learn.fit(2, 1e-2)
    for k, v in before.states[0].items():
        assert torch.equal(v, after.states[0][k]), f"the scoring pass changed {k}"
    model = make_learner().model
    model.load_state_dict(before.states[0])
    ds = learn.dls.train.dataset
    x = torch.stack([ds[i][0] for i in range(512)])
    y = torch.stack([torch.as_tensor(ds[i][1]) for i in range(512)])
    with torch.no_grad():
        pred = torch.cat([model.train()(x[i:i + 32]) for i in range(0, 512, 32)])  # the loader's batches
    expected = el2n(pred, y) if score == "el2n" else torch.nn.functional.cross_entropy(pred, y, reduction="none")
    torch.testing.assert_close(sp.table.scores, expected)


def test_the_subset_is_kept_for_a_second_fit():
    sp = StaticPrune(fraction=0.5, seed=0)
    learn = make_learner([sp])
    learn.fit(2, 1e-2)
    subset = sp.subset.clone()
    learn.fit(2, 1e-2)
    assert torch.equal(subset, sp.subset)
    assert [r["kept"] for r in telemetry_of(learn).records("static_prune", "epoch")] == [512, 256, 256, 256]


def test_no_host_sync_in_training_batches(monkeypatch):
    spy = HostReadSpy(monkeypatch)
    learn = make_learner([StaticPrune(fraction=0.5, seed=0), *spy.callbacks()])
    learn.fit(3, 1e-2)
    assert len(spy.per_batch) == 16 + 2 * 8
    assert [r for batch in spy.per_batch for r in batch] == []


@pytest.mark.parametrize("kwargs, message", [
    ({"fraction": 1.0}, r"fraction must be in \[0, 1\)"), ({"fraction": -0.1}, "fraction"),
    ({"score": "grand"}, "score must be 'loss' or 'el2n'"), ({"score_epoch": 0}, "score_epoch must be an integer"),
    ({"score_epoch": 1.5}, "score_epoch"),
])
def test_bad_parameters_get_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StaticPrune(**kwargs)


def test_el2n_needs_class_logits():
    from torch import nn

    def mse(pred, y, reduction="mean"):
        return nn.functional.mse_loss(pred[:, 0], y.float(), reduction=reduction)

    learn = make_learner([StaticPrune(score="el2n")], loss_func=mse)
    learn.model[-1] = nn.Linear(32, 1)
    with pytest.raises(ValueError, match="score='loss'"):
        learn.fit(1)


def test_samples_the_scoring_epoch_left_out_are_scored_too():
    sp = StaticPrune(fraction=0.5, score="loss", seed=0)
    seen = Seen(sp)
    make_learner([sp, seen], n=500).fit(2, 1e-2)  # 15 batches of 32: 20 samples not forwarded in epoch 0
    unscored = set(range(500)) - set(seen.epochs[0])
    assert len(unscored) == 20 and len(sp.subset) == 250
    assert (sp.table.scores > 0).all()


def test_the_scoring_pass_is_reported_as_forward_only_work():
    """The scoring pass forwards every training sample once more, without backward: telemetry says so, once,
    so that the bench's work column counts it (a third of a forward+backward per sample)."""
    from effilab.bench.fit import FORWARD_SHARE, work_of

    sp = StaticPrune(fraction=0.25, score="el2n", score_epoch=2, seed=0)
    learn = make_learner([sp], n=512)
    learn.fit(3, 1e-2)
    tel = telemetry_of(learn)
    (scoring,) = tel.records("static_prune", "scoring")
    assert scoring["epoch"] == 1 and scoring["forward_only_samples"] == 512
    trained = tel.records("static_prune", "samples")[-1]["forwarded_total"]
    assert trained == 512 * 2 + 384
    assert work_of(trained, tel.to_dict()) == pytest.approx(trained + FORWARD_SHARE * 512)
    learn.fit(1, 1e-2)  # the subset is kept: no second scoring pass
    assert len(tel.records("static_prune", "scoring")) == 1
