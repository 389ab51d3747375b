"""The Budget callback: what it counts, how it drives fastai's schedules, where it stops, what it keeps."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.schedule import combined_cos
from fastai.torch_core import find_bs, get_model

from effilab.budget import Budget, epochs_for_budget
from effilab.callback import telemetry_of
from effilab.core.budget import step_flops
from effilab.data.infobatch import InfoBatch
from effilab.optim.batch_size import BatchSizeSchedule

from ..conftest import make_learner, params_of


class Spy(Callback):
    """What the training steps really were: batch sizes, first-input sizes, shapes, learning rates, pct."""

    order = 99

    def before_fit(self):
        self.bs, self.numel, self.shapes, self.lrs, self.pcts, self.steps = [], [], [], [], [], 0

    def after_pred(self):
        if self.training:
            self.bs.append(find_bs(self.learn.xb))
            self.numel.append(self.learn.xb[0].numel())
            self.shapes.append(tuple(self.learn.xb[0].shape))

    def before_step(self):
        self.lrs.append(self.opt.hypers[0]["lr"])
        self.pcts.append(float(self.learn.pct_train))

    def after_step(self):
        self.steps += 1


class FakeClock:
    """An injected time source that advances only when told: a cost table per training step, and a fixed
    cost per validation batch (which the budget must not charge)."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class Tick(Callback):
    order = 50  # inside the step, between the Budget's marks

    def __init__(self, clock, step_costs, valid_cost=0.0):
        self.clock, self.step_costs, self.valid_cost, self.k = clock, step_costs, valid_cost, 0

    def after_loss(self):
        if self.training:
            self.clock.t += self.step_costs[min(self.k, len(self.step_costs) - 1)]
            self.k += 1
        else:
            self.clock.t += self.valid_cost


def test_samples_budget_stops_mid_epoch_and_leaves_the_learner_usable():
    spy = Spy()
    budget = Budget(768, "samples")  # 1.5 epochs of 16 batches of 32
    learn = make_learner([budget, spy])
    learn.fit_one_cycle(10, 1e-2)
    assert spy.steps == 24 and budget.spent == 768 and budget.progress == 1.0 and budget.stopped_by_budget
    values = learn.recorder.values
    assert len(values) == 2 and all(len(v) == 3 for v in values)  # the cut epoch logs its train loss too
    loss, acc = learn.validate()  # no budget stop inside validate()
    assert np.isfinite(loss) and 0 <= acc <= 1
    fit = telemetry_of(learn).records("budget", "fit")[-1]
    assert fit["spent"] == 768 and fit["progress"] == 1.0 and fit["stopped_by_budget"] and fit["epoch"] == 1
    assert fit["steps"] == 24 and fit["valid_s"] > 0 and fit["warmup_s"] > 0
    assert [r["spent"] for r in telemetry_of(learn).records("budget", "epoch")] == [512, 768]


def test_fit_one_cycle_over_the_budget_equals_fit_one_cycle_over_those_epochs():
    """An upper bound on the epochs plus a budget of exactly two epochs is the two-epoch one-cycle fit."""
    plain, budgeted = Spy(), Spy()
    a = make_learner([plain])
    a.fit_one_cycle(2, 1e-2)
    b = make_learner([Budget(1024, "samples"), budgeted])
    b.fit_one_cycle(7, 1e-2)
    assert np.allclose(plain.lrs, budgeted.lrs, rtol=1e-12) and len(plain.lrs) == 32
    assert torch.allclose(params_of(a), params_of(b))
    sched = combined_cos(0.25, 1e-2 / 25, 1e-2, 1e-2 / 1e5)
    assert np.allclose(budgeted.lrs, [sched(k / 32) for k in range(32)])


def test_counts_what_pruning_and_batch_size_schedules_really_forward():
    spy = Spy()
    budget = Budget(1000, "samples")
    learn = make_learner([budget, InfoBatch(0.5, delta=1.0, seed=0), spy], n=256)
    learn.fit_one_cycle(30, 1e-2)
    assert budget.spent == sum(spy.bs) and 1000 <= budget.spent < 1000 + 32
    assert np.allclose(spy.pcts, np.cumsum([0] + spy.bs[:-1]) / 1000)  # p = spent before the step / budget
    assert len(learn.recorder.values) > 1000 // 256  # pruned epochs are shorter: more of them

    spy, steps = Spy(), Budget(20, "steps")
    learn = make_learner([steps, BatchSizeSchedule(milestones=(0.1,), factor=2), spy], n=256)
    learn.fit(10, 1e-2)
    assert spy.steps == 20 and steps.spent == 20 and 64 in spy.bs


def test_gradient_accumulation_steps_are_optimizer_steps():
    from fastai.callback.training import GradientAccumulation

    budget = Budget(6, "steps")
    spy = Spy()
    learn = make_learner([budget, GradientAccumulation(64), spy])
    learn.fit(5, 1e-2)
    assert budget.spent == 6 and spy.steps == 6 and len(spy.bs) == 12  # two batches per optimizer step


def test_tokens_budget_counts_the_token_input():
    spy = Spy()
    budget = Budget(3 * 32 * 32, "tokens")  # three batches of 32 sequences of 32 tokens
    learn = make_learner([budget, spy], task="sequence", n=128)
    learn.fit(5, 1e-3)
    assert spy.numel == [32 * 32] * 3 and budget.spent == 3 * 32 * 32


class HalveEveryOtherEpoch(Callback):
    """Changes the per-step cost: odd epochs train on 8x8 crops (as progressive resizing would)."""

    order = -2

    def before_batch(self):
        if self.training and self.epoch % 2:
            self.learn.xb = (self.learn.xb[0][..., :8, :8],)


def test_flops_are_measured_again_when_the_batch_shape_changes():
    spy = Spy()
    learn = make_learner([HalveEveryOtherEpoch(), spy], task="image", n=128)
    model = get_model(learn.model)
    full = step_flops(model, (torch.zeros(32, 1, 16, 16),))
    small = step_flops(model, (torch.zeros(32, 1, 8, 8),))
    assert small < full / 2
    budget = Budget(4 * full + 3 * small, "flops")
    learn.add_cb(budget)
    learn.fit(10, 1e-3)
    assert spy.shapes == [(32, 1, 16, 16)] * 4 + [(32, 1, 8, 8)] * 3
    assert budget.spent == 4 * full + 3 * small and len(budget._flops) == 2


def test_a_flops_budget_charges_sams_second_pass():
    from effilab import SAM

    spy = Spy()
    learn = make_learner([SAM(rho=0.05), spy])  # 16 steps of 32 per epoch
    full = step_flops(get_model(learn.model), (torch.zeros(32, 12),))
    budget = Budget(20 * full, "flops")
    learn.add_cb(budget)
    learn.fit(3, 1e-3)
    # Each step is two forward + backward passes: the budget ends after 10 steps, not 20.
    assert spy.steps == 10 and budget.spent == 20 * full


def test_seconds_budget_ends_on_time_with_the_schedule_finished():
    clock = FakeClock()
    costs = [5.0] + [0.2] * 20 + [0.5] * 1000  # a slow first step (compile), then a slowdown
    budget = Budget(20.0, "seconds", clock=clock)
    spy = Spy()
    learn = make_learner([budget, Tick(clock, costs, valid_cost=3.0), spy])
    learn.fit_one_cycle(100, 1e-2)
    assert abs(budget.spent - 20.0) <= 0.5 * 0.5 + 1e-9  # within half a step
    assert budget.spent == pytest.approx(20 * 0.2 + 32 * 0.5)  # 1 warm-up + 20 + 32 steps
    assert spy.steps == 53
    fit = telemetry_of(learn).records("budget", "fit")[-1]
    assert fit["warmup_s"] == pytest.approx(5.0) and fit["train_s"] == pytest.approx(budget.spent)
    assert fit["valid_s"] == pytest.approx(4 * 2 * 3.0)  # 53 steps: 4 epochs, each validated (2 batches of 64)
    # p is the elapsed share of the budget: the one-cycle learning rate ends at its final value
    sched = combined_cos(0.25, 1e-2 / 25, 1e-2, 1e-2 / 1e5)
    assert spy.pcts[-1] == pytest.approx(1 - 0.5 / 20) and spy.lrs[-1] < 1e-2 * 0.01
    assert spy.lrs[-1] == pytest.approx(sched(spy.pcts[-1]))


def test_seconds_budget_smaller_than_one_step_warns_and_stops():
    clock = FakeClock()
    budget = Budget(0.1, "seconds", clock=clock)
    spy = Spy()
    learn = make_learner([budget, Tick(clock, [1.0])])
    learn.add_cb(spy)
    with pytest.warns(UserWarning, match="smaller than one training step"):
        learn.fit(3, 1e-2)
    assert spy.steps == 2  # the warm-up step and the one that spent it


def test_too_few_epochs_warn_before_and_after():
    budget = Budget(5000, "samples")
    learn = make_learner([budget])
    with pytest.warns(UserWarning) as record:
        learn.fit(2, 1e-2)
    messages = [str(w.message) for w in record]
    assert any("cannot spend the budget" in m and "Pass at least 10 epochs" in m for m in messages)
    assert any("did not finish" in m for m in messages)
    assert budget.progress == pytest.approx(1024 / 5000) and not budget.stopped_by_budget


def test_enough_epochs_do_not_warn():
    learn = make_learner([Budget(1000, "samples")])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        learn.fit(epochs_for_budget(1000, "samples", n_samples=512, bs=32, drop_last=True), 1e-2)


def test_resume_finishes_on_the_same_budget(tmp_path):
    class SaveAt(Callback):
        def after_epoch(self):
            if self.epoch == 1:
                self.learn.save_checkpoint("mid")

    full_budget = Budget(1400, "samples")
    full = make_learner([full_budget, SaveAt()], path=tmp_path)
    full.fit_one_cycle(6, 1e-2)
    resumed_budget = Budget(1400, "samples")
    resumed = make_learner([resumed_budget], path=tmp_path, model_seed=1)
    start = resumed.load_checkpoint("mid")
    assert resumed_budget.spent == 1024
    resumed.fit_one_cycle(6, 1e-2, start_epoch=start)
    assert resumed_budget.spent == full_budget.spent == 1408
    assert torch.allclose(params_of(full), params_of(resumed), atol=1e-6)

    other = make_learner([Budget(2000, "samples")], path=tmp_path)
    with pytest.warns(UserWarning, match="p jumps from 0.731 to 0.512"):
        other.load_checkpoint("mid")
    wrong = make_learner([Budget(100, "steps")], path=tmp_path)
    with pytest.raises(ValueError, match=r"in samples, this one in steps: resume with Budget\(1400, 'samples'\)"):
        wrong.load_checkpoint("mid")


def test_a_new_fit_starts_a_new_budget_and_a_spent_resume_trains_nothing(tmp_path):
    budget = Budget(600, "samples")
    learn = make_learner([budget, Spy()], path=tmp_path)
    learn.fit(5, 1e-2)
    assert budget.spent == 608
    learn.fit(5, 1e-2)
    assert budget.spent == 608 and budget.fit_count == 2
    learn.save_checkpoint("done")
    learn.load_checkpoint("done")
    with pytest.warns(UserWarning, match="already spent"):
        learn.fit(5, 1e-2, start_epoch=1)
    assert learn.spy.steps == 0


def test_an_interrupted_fit_keeps_what_it_spent():
    class Interrupt(Callback):
        def after_batch(self):
            if self.training and self.iter == 4:
                raise KeyboardInterrupt

    budget = Budget(2000, "samples")
    learn = make_learner([budget, Interrupt()])
    with pytest.raises(KeyboardInterrupt):
        learn.fit(5, 1e-2)
    assert budget.spent == 5 * 32 and budget.progress == pytest.approx(160 / 2000)
    learn.remove_cb(Interrupt)
    learn.validate()  # usable, and validate() does not stop on a stale budget state
    learn.fit(1, 1e-2)  # a new fit: a new budget
    assert budget.spent == 512


def test_inactive_in_lr_find():
    budget = Budget(64, "samples")
    learn = make_learner([budget], n=1024)
    learn.lr_find(num_it=20, show_plot=False)
    assert budget.spent == 0


@pytest.mark.parametrize("args, error, match", [
    ((0,), ValueError, "positive finite"),
    ((-10,), ValueError, "positive finite"),
    ((float("nan"),), ValueError, "positive finite"),
    ((float("inf"), "seconds"), ValueError, "positive finite"),
    ((True,), TypeError, "must be a number"),
    (("100",), TypeError, "must be a number"),
    ((100, "epochs"), ValueError, "unknown budget unit 'epochs'"),
])
def test_bad_budgets_are_rejected(args, error, match):
    with pytest.raises(error, match=match):
        Budget(*args)
    with pytest.raises(TypeError, match="clock must be a callable"):
        Budget(10, "seconds", clock=3.0)


def test_fit_budget_convenience():
    learn = make_learner([])
    budget = Budget(800, "samples")
    learn.fit_budget(budget, 1e-2)
    assert budget.spent == 800 and budget.stopped_by_budget and learn.n_epoch == 4  # ceil(800 / (512 * 0.5))
    assert not any(isinstance(cb, Budget) for cb in learn.cbs)  # passed to this fit only
    rex = Budget(320, "samples")
    learn.fit_budget(rex, 1e-2, schedule="rex")
    assert learn.recorder.lrs[-1] == pytest.approx(1e-2 * (1 - 0.9) / (1 - 0.45))
    with pytest.raises(ValueError, match="unknown schedule 'cosine_warm'"):
        learn.fit_budget(Budget(100), 1e-2, schedule="cosine_warm")
    with pytest.raises(TypeError, match="must be a Budget"):
        learn.fit_budget(100, 1e-2)
