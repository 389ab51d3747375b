"""Initialisation schemes: residual gates, Fixup, LSUV, the whitening first conv, signal propagation; applied once,
carried through checkpoints; bad input."""

from __future__ import annotations

import random

import pytest
import torch
from fastai.callback.core import Callback
from torch import nn

from effilab.callback import telemetry_of
from effilab.core.init import fixup_, insert_gates, lsuv_, signal_propagation, whiten_conv_
from effilab.core.residual import NotResidualError, Residual, residual_blocks
from effilab.datasets import ResNetSmall
from effilab.model.init import FixupInit, LSUVInit, ResidualGates, WhitenFirstConv

from ..conftest import example_input, make_learner, params_of


def _deep_mlp(depth=8, d=16):
    return nn.Sequential(nn.Linear(12, d), *[Residual(nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d)))
                                            for _ in range(depth)], nn.Linear(d, 4))


def test_gates_at_zero_make_every_block_the_identity_and_train():
    torch.manual_seed(0)
    model = ResNetSmall(1, 4, width=8, stages=(2, 2))
    new = insert_gates(model, 0.0)
    assert len(new) == 4 and insert_gates(model) == []  # once per block
    x = torch.randn(5, 1, 16, 16)
    model.eval()
    h = model.stem(x)
    for block in model.blocks:
        assert torch.allclose(block(h), block.shortcut(h))
        h = block(h)
    model.train()
    model(x).sum().backward()
    assert all(g.grad is not None and g.grad.abs() > 0 for g in new)


def test_fixup_zeroes_each_branch_end_and_scales_the_rest():
    torch.manual_seed(0)
    model = _deep_mlp(depth=4)
    first = [b.body[0].weight.detach().clone() for b in residual_blocks(model)]
    rows = fixup_(model)
    assert [r["m"] for r in rows] == [2] * 4 and rows[0]["scale"] == pytest.approx(4 ** -0.5)
    for b, w in zip(residual_blocks(model), first):
        assert torch.allclose(b.body[0].weight, w * 0.5)
        assert torch.count_nonzero(b.body[2].weight) == 0 and torch.count_nonzero(b.body[2].bias) == 0
    x = torch.randn(3, 12)
    h = model[0](x)
    assert torch.allclose(model[1:-1](h), h)  # every block starts as the identity


def test_lsuv_gives_unit_variance_layers_and_restores_modes_and_hooks():
    torch.manual_seed(0)
    model = ResNetSmall(1, 4, width=8, stages=(1, 1))
    model.train()
    model.blocks[0].eval()  # a mixed state must come back as it was
    flags = [m.training for m in model.modules()]
    stats = [b.running_mean.clone() for b in model.modules() if isinstance(b, nn.BatchNorm2d)]
    x = torch.randn(32, 1, 16, 16)
    rows = lsuv_(model, x, tol=0.05, max_iter=10, generator=torch.Generator().manual_seed(0))
    assert len(rows) == 7  # the stem, two convs per block, the second block's 1x1 shortcut, the head
    assert all(abs(r["std_after"] - 1) < 0.05 for r in rows)
    assert [m.training for m in model.modules()] == flags
    assert all(not m._forward_hooks for m in model.modules())
    assert all(torch.equal(a, b.running_mean) for a, b in
               zip(stats, [b for b in model.modules() if isinstance(b, nn.BatchNorm2d)]))


def test_lsuv_leaves_a_tied_head_alone():
    from effilab.datasets import char_transformer

    model = char_transformer(128, 32, 1, 2, 32)
    emb = model.tok.weight.detach().clone()
    rows = lsuv_(model, torch.randint(0, 128, (8, 32)))
    assert "head" not in [r["layer"] for r in rows] and torch.equal(emb, model.tok.weight)


def test_whitening_filters_decorrelate_patches():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(9, 9, generator=g)
    patches = torch.randn(4000, 9, generator=g) @ mix  # correlated 3x3 patches
    images = patches.view(-1, 1, 3, 3)
    conv = nn.Conv2d(1, 20, 3)
    eig = whiten_conv_(conv, images, eps=1e-6)
    assert eig.shape == (9,) and torch.all(eig[:-1] >= eig[1:])
    out = conv(images).flatten(1)[:, :9].double()  # the 9 whitening filters
    cov = out.T @ out / len(out)
    assert torch.allclose(cov, torch.eye(9, dtype=torch.float64), atol=0.05)
    assert torch.allclose(conv.weight[9:18], -conv.weight[:9])


def test_signal_propagation_table_leaves_the_model_alone():
    torch.manual_seed(0)
    model = _deep_mlp(depth=6)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(64, 12), torch.randint(0, 4, (64,))
    plain = signal_propagation(model, x, y)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    blocks = [r for r in plain if r["kind"] == "Residual"]
    assert len(blocks) == 6 and all(r["act_std"] > 0 and r["grad_std"] > 0 for r in plain)
    fixup_(model)
    fixed = [r for r in signal_propagation(model, x, y) if r["kind"] == "Residual"]
    # without normalisation the plain residual stream grows with depth; Fixup keeps it at the input's scale
    assert plain[-2]["act_std"] / plain[0]["act_std"] > fixed[-1]["act_std"] / plain[0]["act_std"]


def test_gates_are_applied_once_trained_and_survive_a_second_fit():
    learn = make_learner([ResidualGates()], task="sequence")
    learn.fit(1, 1e-2)
    gate = learn.model.blocks[0].gate
    assert gate is not None and gate.detach().abs() > 0  # in the optimizer: it trained
    value = gate.detach().clone()
    learn.fit(1, 1e-2)
    assert learn.model.blocks[0].gate is gate  # not re-inserted nor reset
    assert not torch.equal(value, gate.detach())
    assert telemetry_of(learn).meta("residual_gates")["gates"] == 1


def test_reapply_resets_the_gates():
    learn = make_learner([ResidualGates(reapply=True)], task="sequence")
    learn.fit(1, 1e-2)
    learn.validate()  # fires before_fit too: not an initialisation
    learn.fit(1, 1e-2, cbs=[_AssertGateZeroAtStart()])


class _AssertGateZeroAtStart(Callback):
    order = 0

    def before_batch(self):
        if self.training and self.iter == 0:
            assert float(self.learn.model.blocks[0].gate.detach()) == 0.0


def test_a_gated_checkpoint_loads_into_a_plain_model(tmp_path):
    learn = make_learner([ResidualGates()], task="sequence", path=tmp_path)
    learn.fit(1, 1e-2)
    learn.save("gated")
    plain = make_learner([], task="sequence", path=tmp_path, model_seed=1)
    plain.load("gated", with_opt=False)
    x = example_input("sequence")
    assert torch.allclose(plain.model.eval()(x), learn.model.eval()(x))


def test_lsuv_callback_uses_a_batch_without_moving_the_data_order():
    class FirstBatch(Callback):
        def before_batch(self):
            if self.training and self.iter == 0:
                self.y0 = self.learn.y.clone()

    a, b = FirstBatch(), FirstBatch()
    random.seed(0)  # fastai seeds a loader's shuffling from Python's global generator
    with_lsuv = make_learner([LSUVInit(), a], shuffle=True)
    random.seed(0)
    plain = make_learner([b], shuffle=True)
    with_lsuv.fit(1, 1e-2)
    plain.fit(1, 1e-2)
    assert torch.equal(a.y0, b.y0)
    layers = telemetry_of(with_lsuv).meta("lsuv")["layers"]
    assert len(layers) == 2 and all(abs(r["std_after"] - 1) < 0.1 for r in layers)


def test_whitening_callback_freezes_the_weight_during_fits_only():
    learn = make_learner([WhitenFirstConv(n_images=256)], task="image")
    conv = learn.model[0]
    learn.fit(1, 1e-2, cbs=[_CheckFrozen(conv)])
    assert conv.weight.requires_grad
    white = conv.weight.detach().clone()
    learn.fit(1, 1e-2)  # not re-initialised, still frozen during the fit
    assert torch.equal(white, conv.weight)
    assert len(telemetry_of(learn).meta("whiten")["eigenvalues"]) == 9


class _CheckFrozen(Callback):
    def __init__(self, conv):
        self.conv = conv

    def after_batch(self):
        if self.training:
            assert not self.conv.weight.requires_grad


def test_models_without_residual_blocks_or_convs_are_refused_before_any_work():
    for cb, task, match in ((ResidualGates(), "image", "Residual\\(branch\\)"), (FixupInit(), "tabular", "Residual"),
                            (WhitenFirstConv(), "tabular", "Conv2d")):
        learn = make_learner([cb], task=task)
        before = params_of(learn)
        with pytest.raises((NotResidualError, TypeError), match=match):
            learn.fit(1, 1e-2)
        assert torch.equal(before, params_of(learn))


@pytest.mark.parametrize("make", [
    lambda: ResidualGates(init="0"), lambda: ResidualGates(init=float("nan")), lambda: ResidualGates(init=True),
    lambda: ResidualGates(reapply=1), lambda: FixupInit(multiplier=1), lambda: LSUVInit(tol=0.0),
    lambda: LSUVInit(max_iter=0), lambda: LSUVInit(max_iter=True), lambda: LSUVInit(seed=0.5),
    lambda: WhitenFirstConv(n_images=0), lambda: WhitenFirstConv(eps=-1.0), lambda: WhitenFirstConv(freeze="yes"),
])
def test_bad_arguments(make):
    with pytest.raises((TypeError, ValueError)):
        make()
