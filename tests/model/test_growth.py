"""Model growth: function preservation, optimizer state carried over, compute saved, exact resume, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from fastai.callback.core import Callback
from torch import nn

from effilab.callback import telemetry_of
from effilab.core.growth import GrowthError, check_preserved, deepen_, eval_output, widen_
from effilab.core.init import insert_gates
from effilab.core.residual import NotResidualError, Residual, ResidualBlock, residual_blocks
from effilab.datasets import ResNetSmall
from effilab.model.growth import ModelGrowth

from ..conftest import example_input, make_learner, params_of


def _trained_resnet():
    torch.manual_seed(0)
    model = ResNetSmall(1, 4, width=8, stages=(2, 2))
    opt = torch.optim.SGD(model.parameters(), 0.1)
    for _ in range(3):  # non-trivial BatchNorm statistics and weights
        loss = model(torch.randn(16, 1, 16, 16)).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_deepening_preserves_the_function_in_eval_and_train_mode():
    model = _trained_resnet()
    reference = copy.deepcopy(model)
    x = torch.randn(6, 1, 16, 16)
    n = len(residual_blocks(model))
    new = deepen_(model, model.blocks[0])
    assert len(residual_blocks(model)) == n + 1 and model.blocks[1] is new
    assert check_preserved(eval_output(reference, x), eval_output(model, x)) < 1e-6
    with torch.no_grad():  # batch statistics too
        assert torch.allclose(model.train()(x), reference.train()(x), atol=1e-5)


def test_widening_preserves_the_function_and_adds_units():
    model = _trained_resnet()
    x = torch.randn(6, 1, 16, 16)
    before = eval_output(model, x)
    block = model.blocks[1]
    migrate = widen_(block, 1.5, torch.Generator().manual_seed(0), noise=0.05)
    assert block.conv1.out_channels == 12 and block.conv1.weight.shape[0] == 12
    assert block.bn2.running_mean.shape == (12,)
    assert block.conv2.weight.shape[1] == 12 and len(migrate) == 4  # conv1.weight, bn2.weight/bias, conv2.weight
    assert check_preserved(before, eval_output(model, x)) < 1e-5


def test_widened_optimizer_state_keeps_adams_step():
    block = Residual(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 4)))
    block.widen_pairs = lambda: [(block.body[0], [], block.body[2])]
    w_old = block.body[0].weight
    state = {"grad_avg": torch.randn(3, 4), "sqr_avg": torch.rand(3, 4) + 0.1, "step": 7}
    migrate = widen_(block, 2.0, torch.Generator().manual_seed(0), noise=0.0)
    old_p, fn = migrate[block.body[0].weight]
    assert old_p is w_old
    new = fn(state)
    assert new["step"] == 7 and new["grad_avg"].shape == (6, 4)
    step_old = state["grad_avg"] / state["sqr_avg"].sqrt()
    step_new = new["grad_avg"] / new["sqr_avg"].sqrt()
    assert torch.allclose(step_new[:3], step_old)  # each unit's copies step as the unit did


def test_growth_that_cannot_preserve_the_function_is_refused():
    class PostNorm(ResidualBlock):  # the branch ends in a normalisation: zeroing the Linear leaves the LN bias
        def __init__(self):
            super().__init__()
            self.lin, self.norm = nn.Linear(4, 4), nn.LayerNorm(4)
            nn.init.normal_(self.norm.bias)

        def branch(self, x):
            return self.norm(self.lin(x))

    model = nn.Sequential(PostNorm())
    x = torch.randn(3, 4)
    before = eval_output(model, x)
    deepen_(model, model[0])
    with pytest.raises(GrowthError, match="gates"):
        check_preserved(before, eval_output(model, x))
    # the fix the message names: with gates, deepening zeroes the copy's gate
    model = nn.Sequential(PostNorm())
    insert_gates(model, 1.0)
    before = eval_output(model, x)
    deepen_(model, model[0])
    assert check_preserved(before, eval_output(model, x)) == 0.0

    with pytest.raises(GrowthError, match="identity"):
        deepen_(_trained_resnet(), _trained_resnet().blocks[2])  # the downsampling block
    resnet = _trained_resnet()
    with pytest.raises(GrowthError, match="identity"):
        deepen_(resnet, resnet.blocks[2])
    with pytest.raises(GrowthError, match="widen_pairs"):
        widen_(Residual(nn.Linear(4, 4)), 2.0)
    with pytest.raises(GrowthError, match="factor"):
        widen_(resnet.blocks[0], 1.0)


class _Losses(Callback):
    order = 100

    def after_batch(self):
        if self.training:
            self.losses = getattr(self, "losses", []) + [float(self.loss)]


def test_callback_grows_at_the_planned_points_keeps_the_loss_and_the_optimizer_state():
    losses = _Losses()
    learn = make_learner([ModelGrowth(at=(0.25, 0.5), op="deepen"), losses], task="sequence")
    learn.fit(4, 1e-3)
    events = telemetry_of(learn).records("growth", "event")
    assert [e["epoch"] for e in events] == [1, 2] and [e["iter"] for e in events] == [0, 0]
    assert [e["n_blocks"] for e in events] == [2, 4] and all(e["max_abs_change"] < 1e-5 for e in events)
    assert len(learn.model.blocks) == 4
    # all parameters are in the (rebuilt) optimizer, the old ones with their Adam moments
    opt_params = {id(p) for p, *_ in learn.opt.all_params()}
    assert opt_params == {id(p) for p in learn.model.parameters()}
    assert all("grad_avg" in learn.opt.state[p] for p in learn.model.parameters())
    # the loss does not jump at a growth event (within the noise of the batches around it)
    n = len(learn.dls.train)
    for e in (n, 2 * n):
        assert losses.losses[e] < 1.15 * max(losses.losses[e - 3:e])
    planned = telemetry_of(learn).meta("growth")["planned"]
    last = telemetry_of(learn).records("growth", "epoch")[-1]
    assert 0.2 < planned["planned_saving"] < 0.7
    assert last["saved_frac"] == pytest.approx(planned["planned_saving"], abs=0.02)


def test_widening_callback_trains_and_reports():
    learn = make_learner([ModelGrowth(at=(0.5,), op="widen", factor=2.0)], task="sequence")
    learn.fit(2, 1e-3)
    assert learn.model.blocks[0].mlp[0].out_features == 256
    assert telemetry_of(learn).records("growth", "epoch")[-1]["saved_frac"] > 0.05


def test_second_fit_does_not_grow_again():
    learn = make_learner([ModelGrowth(at=(0.5,))], task="sequence")
    learn.fit(2, 1e-3)
    learn.fit(2, 1e-3)
    assert len(learn.model.blocks) == 2 and len(telemetry_of(learn).records("growth", "event")) == 1


def test_resume_after_growth_regrows_a_fresh_model(tmp_path):
    class SaveAt(Callback):
        def after_epoch(self):
            if self.epoch == 2:
                self.learn.save_checkpoint("mid")

    full = make_learner([ModelGrowth(at=(0.25, 0.5), op="widen", factor=1.5), SaveAt()], task="sequence",
                        path=tmp_path)
    full.fit(4, 1e-3)
    resumed = make_learner([ModelGrowth(at=(0.25, 0.5), op="widen", factor=1.5)], task="sequence", path=tmp_path,
                           model_seed=1)
    start = resumed.load_checkpoint("mid")
    assert resumed.model.blocks[0].mlp[0].out_features == full.model.blocks[0].mlp[0].out_features
    resumed.fit(4, 1e-3, start_epoch=start)
    assert torch.allclose(params_of(full), params_of(resumed), atol=1e-6)
    x = example_input("sequence")
    assert torch.allclose(full.model.eval()(x), resumed.model.eval()(x), atol=1e-5)


def test_a_model_without_residual_blocks_is_refused():
    learn = make_learner([ModelGrowth()], task="image")
    with pytest.raises(NotResidualError):
        learn.fit(1, 1e-2)


@pytest.mark.parametrize("kwargs", [
    {"at": ()}, {"at": (0.5, 0.25)}, {"at": (0.0,)}, {"at": (1.0,)}, {"at": (True,)}, {"op": "stack"},
    {"op": "widen", "factor": 1.0}, {"factor": "2"}, {"noise": 0.6}, {"noise": float("nan")}, {"tol": 0.0},
    {"seed": 0.5},
])
def test_bad_arguments(kwargs):
    with pytest.raises((TypeError, ValueError)):
        ModelGrowth(**kwargs)
