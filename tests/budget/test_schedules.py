"""The budget schedules own the learning rate (also under fit_one_cycle), follow p, and WSD branches anytime;
schedule-free owns its optimizer's train/eval switching and BatchNorm statistics."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from fastai.callback.core import Callback
from torch.optim.swa_utils import update_bn

from effilab.budget import REX, WSD, Budget, LinearDecay, ScheduleFree, cooldown_budget
from effilab.callback import telemetry_of
from effilab.registry import all_techniques

from ..conftest import make_learner, params_of


class LrSpy(Callback):
    order = 99

    def before_fit(self):
        self.lrs, self.moms, self.pcts, self.modes, self.valid_modes = [], [], [], [], []

    def before_step(self):
        h = self.opt.hypers[0]
        self.lrs.append(h["lr"])
        self.moms.append(h.get("mom"))
        self.pcts.append(float(self.learn.pct_train))
        groups = getattr(self.opt, "opt", None)
        if groups is not None and hasattr(groups, "param_groups"):
            self.modes.append(groups.param_groups[0]["train_mode"])

    def before_validate(self):
        groups = getattr(self.opt, "opt", None)
        if groups is not None and hasattr(groups, "param_groups"):
            self.valid_modes.append(groups.param_groups[0]["train_mode"])


@pytest.mark.parametrize("cls, shape", [(LinearDecay, lambda p: 1 - p),
                                        (REX, lambda p: (1 - p) / (0.5 + 0.5 * (1 - p)))])
def test_schedule_owns_the_lr_under_fit_one_cycle(cls, shape):
    spy = LrSpy()
    learn = make_learner([Budget(640, "samples"), cls(), spy])
    learn.fit_one_cycle(8, 3e-2)  # the peak is one-cycle's lr_max; its cosine is overridden
    expected = [3e-2 * shape(32 * k / 640) for k in range(20)]
    assert np.allclose(spy.lrs, expected, rtol=1e-9)
    assert max(spy.moms) > min(spy.moms)  # one-cycle's momentum cycle is kept
    assert telemetry_of(learn).meta("schedule")["planned"]["lr"]["value"][0] == pytest.approx(3e-2)


def test_schedule_with_plain_fit_and_an_explicit_peak_per_group():
    spy = LrSpy()
    learn = make_learner([LinearDecay(lr=0.05, warmup=0.25), spy])
    learn.fit(2, 1e-3)  # no Budget: p is fastai's fraction of the fit (32 steps)
    assert spy.lrs[0] == 0 and spy.lrs[4] == pytest.approx(0.05 * 4 / 8)
    assert spy.lrs[8] == pytest.approx(0.05) and spy.lrs[-1] == pytest.approx(0.05 * (1 - 23 / 24))


@pytest.mark.parametrize("cooldown", ["linear", "1-sqrt"])
def test_wsd_cooldown_shape(cooldown):
    spy = LrSpy()
    learn = make_learner([Budget(40, "steps"), WSD(warmup=0.1, decay=0.25, cooldown=cooldown), spy])
    learn.fit(5, 1e-2)
    lrs = np.array(spy.lrs)
    assert len(lrs) == 40 and lrs[0] == 0 and np.allclose(lrs[4:31], 1e-2)
    x = (np.arange(31, 40) / 40 - 0.75) / 0.25
    assert np.allclose(lrs[31:], 1e-2 * (1 - (x if cooldown == "linear" else np.sqrt(x))))


def test_wsd_branches_a_finished_model_off_a_stable_checkpoint(tmp_path):
    """Anytime: a long run's stable-phase checkpoint, cooled down with `cooldown_budget`, is the model a run
    given the shorter budget from the start would have trained."""

    class SaveAt(Callback):
        def after_epoch(self):
            if self.epoch == 1:
                self.learn.save_checkpoint("stable")

    long = make_learner([Budget(160, "steps"), WSD(warmup=0.0, decay=0.25), SaveAt()], path=tmp_path)
    long.fit(10, 1e-2)
    amount = cooldown_budget(32, 0.25)  # two epochs spent: the cooldown starts now
    short = make_learner([Budget(amount, "steps"), WSD(warmup=0.0, decay=0.25)], model_seed=0)
    short.fit(10, 1e-2)

    branch_budget, spy = Budget(amount, "steps"), LrSpy()
    branch = make_learner([branch_budget, WSD(warmup=0.0, decay=0.25), spy], path=tmp_path, model_seed=1)
    with pytest.warns(UserWarning, match="p jumps from 0.200 to 0.750"):
        start = branch.load_checkpoint("stable")
    branch.fit(10, 1e-2, start_epoch=start)
    assert branch_budget.spent == math.ceil(amount) == 43 and spy.lrs[0] == pytest.approx(1e-2)
    assert spy.lrs[-1] < 1e-2 * 0.2
    assert torch.allclose(params_of(short), params_of(branch), atol=1e-6)


def test_inactive_in_lr_find():
    learn = make_learner([REX()], n=1024)
    learn.lr_find(num_it=30, show_plot=False)
    lrs = learn.recorder.lrs
    assert lrs[-1] > lrs[0] * 10  # lr_find's own exponential ramp


@pytest.mark.parametrize("kwargs, match", [({"lr": -1}, "lr must be"), ({"lr": True}, "lr must be"),
                                           ({"warmup": 1.2}, "fraction of the budget"),
                                           ({"final": float("nan")}, "must be a number")])
def test_schedules_reject_bad_input(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LinearDecay(**kwargs)
    with pytest.raises(ValueError, match="unknown cooldown shape"):
        WSD(cooldown="cos")


# ---- schedule-free


def test_schedule_free_switches_train_and_eval_and_owns_lr_and_momentum():
    spy = LrSpy()
    learn = make_learner([Budget(480, "samples"), ScheduleFree(beta=0.9, warmup=0.2, bn_batches=4), spy])
    learn.fit_one_cycle(5, 1e-2)
    opt = learn.opt.opt
    assert type(opt).__name__ == "AdamWScheduleFree"
    assert all(spy.modes) and len(spy.modes) == 15  # every step in train mode (y)
    assert spy.valid_modes == [False]  # validation sees x
    assert not opt.param_groups[0]["train_mode"]  # after the fit the model holds x
    assert set(spy.moms) == {0.9}  # one-cycle's momentum cycle would corrupt the x/y conversion
    assert spy.lrs[0] == 0 and spy.lrs[3] == pytest.approx(1e-2 * (3 * 32 / 480) / 0.2)
    assert np.allclose(spy.lrs[3:], 1e-2)
    tel = telemetry_of(learn).records("schedule_free", "epoch")
    assert tel[-1]["bn_samples"] == 4 * 32 and tel[-1]["beta"] == 0.9


def test_schedule_free_recomputes_batchnorm_at_x():
    learn = make_learner([ScheduleFree(bn_batches=3)])
    learn.fit(2, 1e-2)
    model = learn.model
    expected = copy.deepcopy(model)
    dl = learn.dls.train.new(shuffle=False, drop_last=False)
    update_bn([b[0] for b, _ in zip(dl, range(3))], expected)
    bn, ref = model[1], expected[1]
    assert torch.allclose(bn.running_mean, ref.running_mean) and torch.allclose(bn.running_var, ref.running_var)
    # the evaluated weights x differ from the gradient point y
    learn.opt.opt.train()
    y = params_of(learn)
    learn.opt.opt.eval()
    assert not torch.allclose(y, params_of(learn))


def test_schedule_free_passed_to_fit_gives_the_learner_its_optimizer_back():
    learn = make_learner([])
    opt_func = learn.opt_func
    learn.fit(1, 1e-2, cbs=ScheduleFree(bn_batches=2))
    x = params_of(learn)
    assert learn.opt_func is opt_func and learn.opt is None
    learn.validate()
    assert torch.equal(x, params_of(learn))
    learn.fit(1, 1e-2)  # a plain fit afterwards trains with the Learner's own optimizer
    assert type(learn.opt).__name__ == "Optimizer"


def test_schedule_free_interrupted_fit_leaves_x_in_the_model():
    class Interrupt(Callback):
        def after_batch(self):
            if self.training and self.epoch == 1 and self.iter == 3:
                raise KeyboardInterrupt

    learn = make_learner([ScheduleFree(bn_batches=2), Interrupt()])
    with pytest.raises(KeyboardInterrupt):
        learn.fit(3, 1e-2)
    assert learn.opt.opt.param_groups[0]["train_mode"]
    learn.remove_cb(Interrupt)
    learn.validate()
    assert not learn.opt.opt.param_groups[0]["train_mode"]
    learn.fit(1, 1e-2)


@pytest.mark.parametrize("kwargs", [{"kind": "lion"}, {"beta": 1.0}, {"beta": True}, {"warmup": -0.1},
                                    {"bn_batches": 2.5}, {"lr": 0}])
def test_schedule_free_rejects_bad_input(kwargs):
    with pytest.raises((ValueError, TypeError)):
        ScheduleFree(**kwargs)


def test_registered_as_budget_techniques_with_method_cards():
    techniques = all_techniques()
    for name, cls in [("linear_decay", LinearDecay), ("rex", REX), ("wsd", WSD), ("schedule_free", ScheduleFree),
                      ("budget", Budget)]:
        assert techniques[name].category == "budget"
        doc = cls.__doc__
        assert "**Paper.**" in doc and "**Saves.**" in doc and "**Defaults.**" in doc
