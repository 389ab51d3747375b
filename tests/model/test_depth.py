"""Stochastic depth and progressive layer dropping: the skipped work is skipped, the schedules, the randomness,
resume, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from fastai.callback.core import Callback
from torch import nn

from effilab.callback import telemetry_of
from effilab.core.depth import DepthDropper, linear_decay_keep, pld_keep, pld_theta
from effilab.core.residual import NotResidualError, Residual, residual_blocks
from effilab.datasets import ResNetSmall
from effilab.model.depth import ProgressiveLayerDrop, StochasticDepth

from ..conftest import make_learner, params_of


class Counting(nn.Module):
    """A branch that counts the samples it is called on."""

    def __init__(self, d=6):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.seen = 0

    def forward(self, x):
        self.seen += x.shape[0]
        return self.lin(x)


def _counting_model(n_blocks=4, d=6):
    return nn.Sequential(*[Residual(Counting(d)) for _ in range(n_blocks)])


def test_linear_decay_and_pld_schedules():
    assert linear_decay_keep(4, 0.5) == pytest.approx([0.875, 0.75, 0.625, 0.5])
    assert pld_theta(0.0) == 1.0 and pld_theta(1.0, 0.5, 10.0) == pytest.approx(0.5 + 0.5 * math.exp(-10))
    assert pld_keep(4, 0.0) == [1.0] * 4  # starts with every block
    late = pld_keep(4, 1.0, 0.5, 10.0)
    assert late == sorted(late, reverse=True) and late[-1] == pytest.approx(0.5, abs=1e-4)  # deeper dropped more


def test_block_mode_skips_dropped_blocks_entirely_and_counts_flops():
    model = _counting_model()
    dropper = DepthDropper(model, "block", seed=0)
    x = torch.randn(8, 6)
    keep = [1.0, 0.5, 0.5, 0.0001]
    for step in range(200):
        dropper.begin_step(step, keep)
        model(x)
    runs = dropper.ran_blocks
    assert runs[0] == 200 and 60 < runs[1] < 140 and 60 < runs[2] < 140 and runs[3] <= 2
    # a dropped block's branch was not called: 8 samples per run, plus the one-sample FLOP probe
    assert [b.body.seen for b in residual_blocks(model)] == [8 * r + 1 for r in runs]
    s = dropper.epoch_summary()
    per_block = dropper.flops_per_sample[id(residual_blocks(model)[0])]
    assert per_block == 2 * 6 * 6  # one 6x6 matmul per sample
    assert s["flops_skipped"] == pytest.approx(3 * per_block * 8 * sum(200 - r for r in runs))
    dropper.remove()
    assert all(b.depth_hook is None for b in residual_blocks(model))


def test_sample_mode_runs_the_branch_on_the_kept_samples_only_with_inverse_scaling():
    torch.manual_seed(0)
    model = _counting_model(1)
    block = residual_blocks(model)[0]
    x = torch.randn(64, 6)
    dropper = DepthDropper(model, "sample", seed=3)
    dropper.begin_step(0, [0.5])
    y = model(x)
    kept = block.body.seen - 1  # minus the FLOP probe's sample
    assert 16 < kept < 48 and dropper.samples_run == [kept]
    with torch.no_grad():
        f = block.body.lin(x)
    changed = (y - x).abs().sum(1) > 0
    assert int(changed.sum()) == kept
    assert torch.allclose(y[changed], x[changed] + f[changed] / 0.5, atol=1e-6)
    assert torch.equal(y[~changed], x[~changed])


def test_draws_are_reproducible_per_step_and_leave_the_global_rng_alone():
    models = [_counting_model() for _ in range(3)]

    def decisions(model, seed):
        dropper = DepthDropper(model, "block", seed=seed)
        out = []
        for step in range(30):
            dropper.begin_step(step, [0.5] * 4)
            model(torch.randn(2, 6, generator=torch.Generator().manual_seed(step)))
            out.append(dropper.end_step())
        return out

    state = torch.get_rng_state()
    a, b, c = decisions(models[0], 0), decisions(models[1], 0), decisions(models[2], 1)
    assert torch.equal(state, torch.get_rng_state())
    assert a == b and a != c


def test_callback_reports_blocks_run_and_flops_saved_and_restores_the_model():
    learn = make_learner([StochasticDepth(final_keep=0.5, mode="block", seed=0)], task="sequence")
    learn.model.blocks.append(type(learn.model.blocks[0])(32, 2, 0.0))  # two blocks
    learn.fit(2, 1e-3)
    tel = telemetry_of(learn)
    steps = tel.records("stochastic_depth", "step")
    assert len(steps) == 2 * len(learn.dls.train)
    assert all(r["keep"] == [0.75, 0.5] for r in steps)
    ran = torch.tensor([r["ran"] for r in steps])
    assert 0.6 < ran[:, 0].mean() < 0.9 and 0.3 < ran[:, 1].mean() < 0.7
    epoch = tel.records("stochastic_depth", "epoch")[-1]
    assert epoch["ran_blocks"] == ran[len(steps) // 2:].sum(0).int().tolist()
    assert 0.2 < epoch["flops_saved_frac"] < 0.55  # expected 1 - mean(keep) = 0.375
    assert all(b.depth_hook is None for b in residual_blocks(learn.model))


def test_a_dropped_block_gets_no_optimizer_step():
    learn = make_learner([StochasticDepth(final_keep=0.0001, mode="block", seed=0)], task="sequence")
    # one block, kept with probability ~1e-4: its weights never move (no zero-gradient momentum/decay steps)
    before = learn.model.blocks[0].qkv.weight.detach().clone()
    emb = learn.model.pos.weight.detach().clone()
    learn.fit(1, 1e-2)
    assert torch.equal(before, learn.model.blocks[0].qkv.weight)
    assert not torch.equal(emb, learn.model.pos.weight)


def test_pld_keeps_everything_at_first_and_drops_more_later():
    learn = make_learner([ProgressiveLayerDrop(theta_bar=0.5, gamma=10.0, seed=0)], task="sequence")
    learn.fit(3, 1e-3)
    steps = telemetry_of(learn).records("progressive_layer_drop", "step")
    assert steps[0]["keep"] == [1.0] and steps[-1]["keep"][0] == pytest.approx(0.5, abs=0.01)
    epochs = telemetry_of(learn).records("progressive_layer_drop", "epoch")
    assert epochs[0]["flops_saved_frac"] < epochs[-1]["flops_saved_frac"]
    assert epochs[0]["theta"] > epochs[-1]["theta"]


def test_resnet_small_trains_with_both_modes():
    for mode in ("block", "sample"):
        learn = make_learner([StochasticDepth(0.5, mode=mode)], task="image")
        learn.model = ResNetSmall(1, 4, width=8, stages=(2, 1))
        before = params_of(learn)
        learn.fit(1, 1e-2)
        assert not torch.equal(before, params_of(learn))
        assert telemetry_of(learn).records("stochastic_depth", "epoch")[-1]["flops_skipped"] > 0


def test_a_model_without_residual_blocks_is_refused_before_any_work():
    learn = make_learner([StochasticDepth()], task="image")
    before = params_of(learn)
    with pytest.raises(NotResidualError, match="Residual\\(branch\\)"):
        learn.fit(1, 1e-2)
    assert torch.equal(before, params_of(learn))


@pytest.mark.parametrize("kwargs, error", [
    ({"final_keep": 0.0}, ValueError), ({"final_keep": 1.5}, ValueError), ({"final_keep": True}, TypeError),
    ({"final_keep": "0.5"}, TypeError), ({"final_keep": float("nan")}, TypeError), ({"mode": "row"}, ValueError),
    ({"seed": 1.0}, TypeError),
])
def test_bad_arguments(kwargs, error):
    with pytest.raises(error):
        StochasticDepth(**kwargs)


def test_bad_pld_arguments():
    with pytest.raises(ValueError, match="gamma"):
        ProgressiveLayerDrop(gamma=-1.0)
    with pytest.raises(TypeError):
        ProgressiveLayerDrop(theta_bar=False)


def test_interrupted_fit_leaves_the_model_plain():
    from fastai.callback.core import CancelFitException

    class Interrupt(Callback):
        def __init__(self, exc):
            self.exc = exc

        def after_batch(self):
            if self.training and self.iter == 3:
                raise self.exc

    learn = make_learner([StochasticDepth(0.5), Interrupt(CancelFitException())], task="sequence")
    learn.fit(2, 1e-2)
    assert all(b.depth_hook is None for b in residual_blocks(learn.model))

    learn = make_learner([StochasticDepth(0.5), Interrupt(KeyboardInterrupt())], task="sequence")
    with pytest.raises(KeyboardInterrupt):
        learn.fit(2, 1e-2)
    learn.remove_cb(Interrupt)
    learn.validate()  # fastai ran no event after the exception: the next validate (or fit) cleans up
    assert all(b.depth_hook is None for b in residual_blocks(learn.model))
    learn.fit(1, 1e-2)


def test_a_second_depth_callback_warns_and_stays_idle():
    learn = make_learner([StochasticDepth(0.5), ProgressiveLayerDrop()], task="sequence")
    with pytest.warns(UserWarning, match="already drops blocks"):
        learn.fit(1, 1e-2)
    assert telemetry_of(learn).records("progressive_layer_drop", "step") == []


def test_resnet_small_for_image_tasks_only():
    from effilab.datasets import TaskData, resnet_small

    task = TaskData(None, None, 10, (1, 28, 28), "fake")
    model = resnet_small(task, width=8)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10) and len(residual_blocks(model)) == 4
    assert model.stem.stride == (2, 2)  # images larger than 16 px start with a stride-2 stem
    with pytest.raises(ValueError, match="image task"):
        resnet_small(TaskData(None, None, 10, (40,), "flat"))
