"""The optimizer callbacks really train with LAMB / LARS, recipes can choose them, linear scaling."""

from __future__ import annotations

import pytest
from fastai.callback.core import Callback
from fastai.optimizer import lamb_step, larc_layer_lr, larc_step

from effilab.bench.recipes import RunContext, parse_recipe
from effilab.callback import telemetry_of
from effilab.optim import LambOptimizer, LarsOptimizer, LinearScaling

from ..conftest import make_learner


class OptSpy(Callback):
    order = 100

    def before_fit(self):
        self.steps, self.lrs = [], []

    def after_step(self):
        self.steps.append(list(self.learn.opt.cbs))
        self.lrs.append(self.learn.opt.hypers[-1]["lr"])


def _uses(spy, marker):
    return spy.steps and all(marker in cbs for cbs in spy.steps)


@pytest.mark.parametrize("make, marker", [(LambOptimizer, lamb_step), (LarsOptimizer, larc_step)])
def test_the_fit_trains_with_the_chosen_optimizer(make, marker):
    spy = OptSpy()
    learn = make_learner([make(), spy], n=128)
    learn.fit_one_cycle(1, 1e-2)
    assert _uses(spy, marker)
    learn.fit(1, 1e-2)  # a second fit keeps it (and its state)
    assert _uses(spy, marker)


def test_a_callback_passed_to_fit_re_creates_the_optimizer_with_fits_learning_rate():
    spy = OptSpy()
    learn = make_learner([spy], n=128)
    learn.fit(1, 1e-3)  # creates fastai's default Adam
    assert not _uses(spy, lamb_step)
    learn.fit(1, 0.05, cbs=[LambOptimizer(wd=0.1)])
    assert _uses(spy, lamb_step) and all(lr == 0.05 for lr in spy.lrs)
    assert learn.opt.hypers[0]["wd"] == 0.1
    assert telemetry_of(learn).meta("optimizer")["name"] == "lamb"


def test_a_recipe_component_chooses_the_optimizer():
    recipe = parse_recipe("lars(trust_coeff=0.01, clip=True)")
    ctx = RunContext(task=None, seed=0, epochs=1, bs=32, lr=1e-2, n_train=128)
    cbs = recipe.make_callbacks(ctx)
    spy = OptSpy()
    learn = make_learner([*cbs, spy], n=128)  # as the bench runner builds its Learner
    learn.fit_one_cycle(1, 1e-2)
    assert _uses(spy, larc_step) and learn.opt.hypers[0]["trust_coeff"] == 0.01
    layer_lr = next(cb for cb in learn.opt.cbs if getattr(cb, "func", None) is larc_layer_lr)
    assert layer_lr.keywords == {"clip": True}  # LARC


def test_linear_scaling_scales_fit_and_one_cycle():
    spy = OptSpy()
    learn = make_learner([LinearScaling(base_bs=8), spy], n=128, bs=32)
    learn.fit(1, 0.01)
    assert spy.lrs and all(lr == pytest.approx(0.04) for lr in spy.lrs)
    learn.fit_one_cycle(2, 0.01)
    assert max(spy.lrs) == pytest.approx(0.04, rel=1e-3)
    assert telemetry_of(learn).records("linear_scaling", "fit")[-1] == {"bs": 32, "base_bs": 8, "scale": 4.0}
    learn.validate()  # no training: the learning rate is left alone
    learn.fit(1, 0.01)
    assert all(lr == pytest.approx(0.04) for lr in spy.lrs)


@pytest.mark.parametrize("make, match", [
    (lambda: LambOptimizer(mom=1.0), "mom"), (lambda: LambOptimizer(eps=0), "eps"),
    (lambda: LarsOptimizer(wd=-1), "wd"), (lambda: LarsOptimizer(trust_coeff=0), "trust_coeff"),
    (lambda: LinearScaling(base_bs=0), "base_bs"),
])
def test_bad_parameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()
