"""InfoBatch and RandomPrune as fastai callbacks: what the user sees, and what must never happen."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.mixup import MixUp
from torch import nn

from effilab import InfoBatch, RandomPrune, telemetry_of

from ..conftest import make_learner
from ..spies import HostReadSpy


class Trace(Callback):
    """Records what the training loop did: batches and `n_iter` per epoch, learning rates."""

    order = 100

    def before_fit(self):
        self.batches, self.n_iters, self.lrs = [], [], []

    def before_train(self):
        self.batches.append(0)

    def after_batch(self):
        if self.training:
            self.batches[-1] += 1
            self.lrs.append(self.opt.hypers[-1]["lr"])
            if self.iter == 0:
                self.n_iters.append(self.n_iter)


def test_prunes_saves_samples_and_still_learns():
    trace = Trace()
    learn = make_learner([InfoBatch(0.5, delta=0.875, seed=0), trace], n=1024)
    learn.fit_one_cycle(8, 2e-2)
    tel = telemetry_of(learn)
    epochs = tel.records("infobatch", "epoch")
    assert [r["epoch"] for r in epochs] == list(range(8))
    kept = [r["kept"] for r in epochs]
    assert kept[0] == 1024 and kept[7] == 1024 and max(kept[1:7]) < 900
    assert all(r["annealing"] == (r["epoch"] >= 7) for r in epochs)
    assert all(r["kept"] + r["pruned"] == 1024 for r in epochs)
    samples = tel.records("infobatch", "samples")[-1]
    assert samples["forwarded_total"] == 32 * sum(trace.batches) < 0.85 * samples["full_total"]
    assert learn.validate()[1] > 0.6


def test_epoch_length_is_true_at_epoch_start_and_schedule_finishes():
    """n_iter (what schedulers and progress bars read) equals the batches each epoch really runs, and
    one-cycle ends where it would without pruning."""
    trace = Trace()
    learn = make_learner([InfoBatch(0.6, seed=0), trace], n=1024)
    learn.fit_one_cycle(6, 1e-2)
    assert trace.n_iters == trace.batches and min(trace.batches) < 32
    full = Trace()
    make_learner([full], n=1024).fit_one_cycle(6, 1e-2)
    assert trace.lrs[-1] == pytest.approx(full.lrs[-1], rel=1e-6)
    assert trace.lrs[0] == pytest.approx(full.lrs[0], rel=1e-6)
    assert max(trace.lrs) == pytest.approx(max(full.lrs), rel=0.05)


def test_validation_is_never_pruned():
    class CountValid(Callback):
        order = 100

        def before_validate(self):
            self.n = 0

        def after_batch(self):
            if not self.training:
                self.n += self.yb[0].shape[0]

    counter = CountValid()
    learn = make_learner([InfoBatch(0.9, seed=0), counter], n=512)
    learn.fit(4, 1e-2)
    assert counter.n == 128  # the whole validation set, every epoch


def test_global_rng_states_are_those_of_a_run_without_it():
    def states_after(cbs):
        torch.manual_seed(0)
        np.random.seed(0)
        random.seed(0)
        learn = make_learner(cbs, shuffle=True)
        learn.fit(3, 1e-2)
        return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()

    plain, pruned = states_after([]), states_after([InfoBatch(0.5, seed=0)])
    assert torch.equal(plain[0], pruned[0])
    assert np.array_equal(plain[1], pruned[1])
    assert plain[2] == pruned[2]


def test_reported_loss_estimates_the_full_data_loss():
    """With frozen weights, the reported training loss of a pruned epoch matches the full-data loss."""

    class Freeze(Callback):
        order = 20

        def before_step(self):
            from fastai.callback.core import CancelStepException
            raise CancelStepException

    class Losses(Callback):
        order = 100

        def before_train(self):
            self.values = []

        def after_batch(self):
            if self.training:
                self.values.append(float(self.learn.loss))

    rec_ib, rec_full = Losses(), Losses()
    ib = make_learner([InfoBatch(0.8, seed=0), Freeze(), rec_ib], n=2048, batchnorm=False)
    ib.fit(1, 1e-2)
    scores = ib.cbs.filter(lambda c: isinstance(c, InfoBatch))[0].pruner.table.scores
    ib.fit(2, 1e-2)  # the second fit prunes from its first epoch: scores are known
    full = make_learner([Freeze(), rec_full], n=2048, batchnorm=False)
    full.fit(1, 1e-2)
    kept_fraction = telemetry_of(ib).records("infobatch", "epoch")[-2]["kept"] / 2048
    assert kept_fraction < 0.7
    full_mean = float(np.mean(rec_full.values))
    assert full_mean == pytest.approx(float(scores.mean()), rel=0.02)
    assert float(np.mean(rec_ib.values)) == pytest.approx(full_mean, rel=0.1)


def test_no_host_sync_in_training_batches(monkeypatch):
    """No .item()/.cpu()/.tolist()/float()/bool()... from effilab code while a training batch runs."""
    spy = HostReadSpy(monkeypatch)
    learn = make_learner([InfoBatch(0.5, seed=0), *spy.callbacks()])
    learn.fit(3, 1e-2)
    assert telemetry_of(learn).records("infobatch", "epoch")[1]["pruned"] > 0
    assert 16 < len(spy.per_batch) < 3 * 16  # every batch was watched; epochs 1-2 were pruned
    assert [r for batch in spy.per_batch for r in batch] == []


def test_bad_input_gets_clear_errors():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        InfoBatch(ratio=1.0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        InfoBatch(delta=1.5)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        RandomPrune(fraction=-0.1)

    def scalar_loss(pred, y):
        return nn.functional.cross_entropy(pred, y)

    learn = make_learner([InfoBatch(0.5)], loss_func=scalar_loss)
    with pytest.raises(TypeError, match="reduction='none'"):
        learn.fit(1)


def test_iterable_dataset_is_refused():
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            for i in range(64):
                yield torch.randn(12), torch.tensor(i % 4)

    learn = make_learner([InfoBatch(0.5)])
    learn.dls = DataLoaders(DataLoader(Stream(), bs=16), learn.dls.valid, device="cpu")
    with pytest.raises(TypeError, match="indexable"):
        learn.fit(1)


def test_non_finite_losses_are_not_scored_and_warned_once():
    class Poison(Callback):
        order = 0

        def after_pred(self):
            if self.training and self.iter == 0:
                self.learn.pred = self.pred.clone()
                self.learn.pred[0] = float("nan")

    learn = make_learner([InfoBatch(0.5, seed=0), Poison()])
    learn.opt_func = _sgd_skipping_nan
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        learn.fit(3, 1e-2)
    msgs = [str(w.message) for w in caught if "non-finite" in str(w.message)]
    assert len(msgs) == 1
    ib = learn.cbs.filter(lambda c: isinstance(c, InfoBatch))[0]
    assert torch.isfinite(ib.pruner.table.scores).all()
    assert telemetry_of(learn).records("infobatch", "nonfinite")[-1]["total"] == 3


def _sgd_skipping_nan(params, lr, **kwargs):
    from fastai.optimizer import SGD

    opt = SGD(params, lr)
    step = opt.step

    def guarded(*a, **k):
        if all(torch.isfinite(p.grad).all() for p in opt.all_params(with_grad=True).itemgot(0)):
            step(*a, **k)
    opt.step = guarded
    return opt


def test_training_set_size_change_starts_fresh_scores():
    learn = make_learner([InfoBatch(0.5, seed=0)], n=256)
    learn.fit(2, 1e-2)
    learn.dls = make_learner([], n=512).dls
    with pytest.warns(UserWarning, match="changed size"):
        learn.fit(2, 1e-2)
    ib = learn.cbs.filter(lambda c: isinstance(c, InfoBatch))[0]
    assert ib.pruner.num_samples == 512


def test_interrupted_fit_leaves_the_learner_usable():
    class Interrupt(Callback):
        def after_batch(self):
            if self.training and self.epoch == 1 and self.iter == 3:
                raise KeyboardInterrupt

    learn = make_learner([InfoBatch(0.5, seed=0), Interrupt()])
    loss_func = learn.loss_func
    with pytest.raises(KeyboardInterrupt):
        learn.fit(3, 1e-2)
    learn.remove_cb(Interrupt)
    learn.validate()
    assert learn.loss_func is loss_func
    learn.fit(2, 1e-2)
    assert learn.loss_func is loss_func
    assert len(telemetry_of(learn).records("infobatch", "epoch")) == 4


def test_composes_with_mixup():
    learn = make_learner([InfoBatch(0.5, seed=0), MixUp()], n=512)
    loss_func = learn.loss_func
    learn.fit(3, 1e-2)
    assert learn.loss_func is loss_func
    assert telemetry_of(learn).records("infobatch", "epoch")[1]["pruned"] > 0


def test_lr_find_is_left_alone():
    learn = make_learner([InfoBatch(0.5, seed=0)])
    learn.lr_find(num_it=20, show_plot=False)
    assert telemetry_of(learn).records("infobatch", "epoch") == []


def test_random_prune_keeps_the_fraction():
    learn = make_learner([RandomPrune(0.25, delta=0.5, seed=0)], n=1024)
    learn.fit(4, 1e-2)
    kept = [r["kept"] for r in telemetry_of(learn).records("random_prune", "epoch")]
    assert kept == [768, 768, 1024, 1024]


# ---- scores once per sample per step, the loss trained on; exact reductions


def _score_table(cb):
    return cb.pruner.table if isinstance(cb, InfoBatch) else cb.table


@pytest.mark.parametrize("technique", ["infobatch", "easy_to_hard", "importance_sampling"])
@pytest.mark.parametrize("mixer", ["mixup", "cutmix"])
def test_under_mixup_and_cutmix_the_score_is_the_mixed_loss_written_once(technique, mixer, monkeypatch):
    """fastai's MixUp/CutMix call the loss twice per batch (partner labels, then own labels) and lerp: the
    score is the lerp (the loss the sample was trained on), written once per batch."""
    from fastai.callback.mixup import CutMix
    from fastai.losses import CrossEntropyLossFlat

    from effilab import EasyToHard, ImportanceSampling
    from effilab.core.infobatch import ScoreTable

    make = {"infobatch": lambda: InfoBatch(ratio=0.5, delta=0.75, seed=0),
            "easy_to_hard": lambda: EasyToHard(start_frac=0.5, full_at=0.5, seed=0),
            "importance_sampling": lambda: ImportanceSampling(momentum=None, seed=0)}[technique]
    writes = []
    update = ScoreTable.update
    monkeypatch.setattr(ScoreTable, "update", lambda self, idx, losses: (writes.append(idx.numel()),
                                                                          update(self, idx, losses))[1])

    class Check(Callback):
        order = 100  # after the technique (-5) and the mixer (0)
        checked = 0

        def before_batch(self):
            writes.clear()

        def after_loss(self):
            if not self.training:
                return
            mix = self.learn.cbs.filter(lambda c: isinstance(c, (MixUp, CutMix)))[0]
            ce = CrossEntropyLossFlat(reduction="none")
            expected = torch.lerp(ce(self.pred, *mix.yb1), ce(self.pred, *self.yb), mix.lam).detach()
            idx = cb.plan_dl.batch_idx
            assert writes == [idx.numel()], f"scores written {len(writes)} times in one step"
            got = _score_table(cb).scores[idx]
            # importance sampling draws with replacement: a repeated sample holds one of its losses
            match = torch.isclose(got[:, None], expected.float()[None, :], rtol=1e-5) & (idx[:, None] == idx[None, :])
            assert match.any(1).all(), f"scores {got} are not the mixed losses {expected}"
            Check.checked += 1

    cb = make()
    mix_cb = MixUp(0.4) if mixer == "mixup" else CutMix(1.0)
    learn = make_learner([cb, mix_cb, Check()], n=128, task="image" if mixer == "cutmix" else "tabular")
    learn.fit(2, 1e-2)
    assert Check.checked >= 6


def _padded_sequence_learner(cbs, loss_func):
    learn = make_learner(cbs, n=128, task="sequence", loss_func=loss_func)
    for ds in (learn.dls.train.dataset, learn.dls.valid.dataset):
        ds.y = ds.y.clone()
        ds.y[:, 24:] = 0  # 25% padding, ignored by `ignore_index=0` losses
    return learn


@pytest.mark.parametrize("loss", ["sum", "mean", "ignore_index"])
def test_with_unit_weights_the_loss_is_the_unwrapped_one_exactly(loss):
    """InfoBatch(ratio=0) weighs every sample 1: the backpropagated and reported losses are the Learner's own,
    on a sequence task (T=32) whatever the loss's reduction and ignored elements; each sample's score is its
    own mean over the elements that count."""
    from fastai.losses import CrossEntropyLossFlat

    loss_func = {"sum": CrossEntropyLossFlat(reduction="sum"), "mean": CrossEntropyLossFlat(),
                 "ignore_index": CrossEntropyLossFlat(ignore_index=0)}[loss]

    class Check(Callback):
        order = 100
        checked = 0

        def after_loss(self):
            if not self.training or not isinstance(self.learn.loss_func, WeightedLoss):
                return
            expected = loss_func(self.pred, *self.yb)
            torch.testing.assert_close(self.loss_grad, expected, rtol=1e-6, atol=0)
            torch.testing.assert_close(self.loss, expected.detach(), rtol=1e-6, atol=0)
            y = self.yb[0]
            per_token = CrossEntropyLossFlat(reduction="none")(self.pred, y).view(y.shape).detach()
            keep = (y != 0) if loss == "ignore_index" else torch.ones_like(y, dtype=torch.bool)
            own_mean = (per_token * keep).sum(1) / keep.sum(1)
            torch.testing.assert_close(ib.pruner.table.scores[ib.plan_dl.batch_idx], own_mean)
            Check.checked += 1

    from effilab.data.pruning import WeightedLoss

    ib = InfoBatch(ratio=0.0, seed=0)
    learn = _padded_sequence_learner([ib, Check()], loss_func)
    learn.fit(1, 1e-3)
    assert Check.checked == 4
