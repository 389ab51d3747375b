"""Activation checkpointing: block discovery, identical gradients, recomputation, selective policy, the memory
budget, and the callback's restore and bad input."""

from __future__ import annotations

import pytest
import torch
from fastai.callback.core import Callback, CancelFitException
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from effilab.callback import telemetry_of
from effilab.core.checkpointing import (
    checkpointed,
    choose_blocks,
    find_blocks,
    restore_forward,
    saved_activation_bytes,
    wrap_forward,
)
from effilab.datasets import char_transformer
from effilab.system import ActivationCheckpointing

from ..conftest import make_learner, params_of


def _transformer(dropout=0.1, n_layer=3):
    torch.manual_seed(0)
    return char_transformer(128, d_model=32, n_layer=n_layer, n_head=2, max_len=32, dropout=dropout)


def _tokens(n=8):
    return torch.randint(0, 128, (n, 32), generator=torch.Generator().manual_seed(0))


def _grads(model, x, seed=0):
    model.zero_grad()
    torch.manual_seed(seed)
    model(x).square().mean().backward()
    return [p.grad.clone() for p in model.parameters()]


class Counted(nn.Module):
    """A block that counts its forward calls."""

    def __init__(self):
        super().__init__()
        self.lin1, self.lin2, self.calls = nn.Linear(8, 16), nn.Linear(16, 8), 0

    def forward(self, x):
        self.calls += 1
        return self.lin2(torch.relu(self.lin1(x)))


# ----------------------------------------------------------------------------------------- core


def test_find_blocks():
    assert list(find_blocks(_transformer())) == ["blocks.0", "blocks.1", "blocks.2"]
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert find_blocks(mlp) == {}
    cnn = nn.Sequential(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()), nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU()),
                        nn.Flatten(), nn.LazyLinear(2))
    assert list(find_blocks(cnn)) == ["0", "1"]
    # A container of blocks is searched, not taken as one block.
    nested = nn.Sequential(nn.Linear(8, 8), nn.Sequential(Counted(), Counted()))
    assert list(find_blocks(nested)) == ["1.0", "1.1"]


@pytest.mark.parametrize("selective", [False, True])
def test_gradients_equal_the_unchecked_model(selective):
    model, x = _transformer(dropout=0.1), _tokens()
    plain = _grads(model, x)
    with checkpointed(find_blocks(model), selective=selective):
        ckpt = _grads(model, x)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert "forward" not in model.blocks[0].__dict__  # restored


def test_the_checkpointed_forward_recomputes_in_training_only():
    model = nn.Sequential(Counted(), Counted())
    x = torch.randn(4, 8)
    model(x).sum().backward()
    assert [m.calls for m in model] == [1, 1]
    with checkpointed({"0": model[0]}):
        model(x).sum().backward()
        assert [m.calls for m in model] == [3, 2]  # block 0 ran again in backward
        with torch.no_grad():
            model(x)
        assert [m.calls for m in model] == [4, 3]  # no recomputation without gradients
    model(x).sum().backward()
    assert [m.calls for m in model] == [5, 4]


def test_selective_keeps_the_matmuls_and_whole_blocks_recompute_them():
    model, x = _transformer(dropout=0.0), _tokens()

    def flops(**kw):
        with FlopCounterMode(display=False) as counter:
            if kw:
                with checkpointed(find_blocks(model), **kw):
                    model(x).sum().backward()
            else:
                model(x).sum().backward()
        return counter.get_total_flops()

    plain, whole, selective = flops(), flops(selective=False), flops(selective=True)
    assert whole > plain and selective == plain


def test_saved_bytes_per_block_and_what_checkpointing_frees():
    model, x = _transformer(dropout=0.1), _tokens()
    blocks = find_blocks(model)
    model.train()
    rng = torch.get_rng_state()
    per_block, total = saved_activation_bytes(model, blocks, (x,))
    assert torch.equal(rng, torch.get_rng_state())
    assert all(b > 0 for b in per_block.values()) and sum(per_block.values()) < total
    assert len(set(per_block.values())) == 1  # identical blocks keep identical amounts
    with checkpointed(blocks):
        _, total_ckpt = saved_activation_bytes(model, blocks, (x,))
    assert total_ckpt <= total - 0.9 * sum(per_block.values())  # the estimate is what went
    # Selective checkpointing keeps the matmul outputs (in its own cache, unseen by the hooks): it frees less.
    per_block_sel, _ = saved_activation_bytes(model, blocks, (x,), selective=True)
    assert all(0 < per_block_sel[n] < per_block[n] for n in blocks)


def test_measurement_leaves_batchnorm_statistics_alone():
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU()), nn.Linear(8, 2))
    before = [b.clone() for b in model.buffers()]
    saved_activation_bytes(model, find_blocks(model), (torch.randn(16, 4) + 3,))
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))


def test_choose_blocks_to_fit_a_budget():
    per_block = {"a": 10, "b": 30, "c": 20}
    assert choose_blocks(per_block, 100, 100) == []
    assert choose_blocks(per_block, 100, 70) == ["b"]
    assert choose_blocks(per_block, 100, 55) == ["b", "c"]
    assert choose_blocks(per_block, 100, 0) == ["a", "b", "c"]  # all, even if still over


def test_wrap_and_restore_keep_an_instance_forward():
    m = Counted()

    def own(x):
        return x

    m.forward = own
    wrap_forward(m)
    assert m.forward is not own
    restore_forward(m)
    assert m.forward is own


# ----------------------------------------------------------------------------------------- fastai


class CountMlpCalls(Callback):
    """Calls of block 0's MLP (a submodule: its recomputation goes through __call__) per training batch."""

    def before_fit(self):
        self.counts = []
        self.handle = self.learn.model.blocks[0].mlp.register_forward_pre_hook(lambda *a: self._hit())

    def _hit(self):
        if self.training:
            self.counts[-1] += 1

    def before_batch(self):
        if self.training:
            self.counts.append(0)

    def after_fit(self):
        self.handle.remove()


def test_fit_recomputes_restores_and_matches_the_plain_fit():
    plain = make_learner(task="sequence", n=128)
    plain.fit(1, 1e-2)
    spy = CountMlpCalls()
    cb = ActivationCheckpointing()
    learn = make_learner([cb, spy], task="sequence", n=128)
    learn.fit(1, 1e-2)
    assert spy.counts == [3, 2, 2, 2]  # forward and recomputation; the first batch also measures (one forward)
    assert "forward" not in learn.model.blocks[0].__dict__
    torch.testing.assert_close(params_of(learn), params_of(plain), rtol=0, atol=1e-6)
    meta = telemetry_of(learn).meta("checkpointing")
    assert meta["checkpointed"] == meta["blocks"] == ["blocks.0"]
    assert meta["saved_mb"] == pytest.approx(meta["per_block_mb"]["blocks.0"]) and 0 < meta["saved_mb"] < meta[
        "activation_mb"]
    assert telemetry_of(learn).records("checkpointing", "epoch")[-1]["checkpointed"] == ["blocks.0"]


def _seq_learner(cbs, n_layer=3):
    learn = make_learner(cbs, task="sequence", n=64)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        learn.model = char_transformer(128, d_model=32, n_layer=n_layer, n_head=2, max_len=32)
    return learn


def test_budget_chooses_the_fewest_blocks():
    probe = ActivationCheckpointing(budget_mb=1e9)
    learn = _seq_learner([probe])
    learn.fit(1, 1e-2)
    meta = telemetry_of(learn).meta("checkpointing")
    assert meta["checkpointed"] == [] and meta["fits_budget"]
    per_block, total = meta["per_block_mb"]["blocks.0"], meta["activation_mb"]
    for budget, n in ((total - 0.5 * per_block, 1), (total - 1.5 * per_block, 2), (0.0, 3)):
        cb = ActivationCheckpointing(budget_mb=budget)
        learn = _seq_learner([cb])
        learn.fit(1, 1e-2)
        meta = telemetry_of(learn).meta("checkpointing")
        assert len(meta["checkpointed"]) == n, (budget, meta)
        assert meta["fits_budget"] == (n < 3)
        assert all("forward" not in b.__dict__ for b in learn.model.blocks)


def test_named_blocks_and_selective():
    cb = ActivationCheckpointing(blocks=["blocks.1"], selective=True)
    learn = _seq_learner([cb])
    learn.fit(1, 1e-2)
    assert telemetry_of(learn).meta("checkpointing")["checkpointed"] == ["blocks.1"]


def test_forwards_restored_when_the_fit_is_cancelled():
    class Cancel(Callback):
        order = 100

        def after_batch(self):
            assert "forward" in self.learn.model.blocks[0].__dict__
            raise CancelFitException()

    learn = _seq_learner([ActivationCheckpointing(), Cancel()])
    learn.fit(1, 1e-2)
    assert all("forward" not in b.__dict__ for b in learn.model.blocks)


# ----------------------------------------------------------------------------------------- bad input


def test_a_model_with_no_blocks_is_refused_before_training():
    learn = make_learner([ActivationCheckpointing()], n=64)  # a flat MLP
    before = params_of(learn)
    with pytest.raises(ValueError, match="no blocks to checkpoint.*blocks=\\[...\\]"):
        learn.fit(1, 1e-2)
    assert torch.equal(before, params_of(learn))


def test_unknown_block_names_are_refused():
    learn = _seq_learner([ActivationCheckpointing(blocks=["blocks.7"])])
    with pytest.raises(ValueError, match="no submodule named.*blocks found"):
        learn.fit(1, 1e-2)


@pytest.mark.parametrize("kwargs, exc", [
    (dict(blocks="blocks.0"), TypeError), (dict(blocks=[0]), TypeError), (dict(budget_mb="1"), TypeError),
    (dict(budget_mb=True), TypeError), (dict(budget_mb=-1.0), ValueError), (dict(budget_mb=float("nan")), ValueError),
    (dict(selective=1), TypeError),
])
def test_bad_arguments_are_refused(kwargs, exc):
    with pytest.raises(exc):
        ActivationCheckpointing(**kwargs)
