"""LayerFreezing: the schedule, what is frozen (and what is not: tied weights), the backward that stops at
the first trainable layer, BatchNorm in eval mode, the timeline, restoring on every exit, bad input."""

from __future__ import annotations

import random

import pytest
import torch
from fastai.callback.core import Callback
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from effilab.callback import telemetry_of
from effilab.core.freezing import PrefixFreezer, forward_layers, freeze_points, frozen_count
from effilab.model import LayerFreezing

from ..conftest import make_learner, params_of


def test_schedule():
    assert freeze_points(2, 0.5, 1.0) == [0.5, 0.75]
    assert [frozen_count(p, 2, 0.5, 1.0) for p in (0.0, 0.49, 0.5, 0.74, 0.75, 0.99, 1.0)] == [0, 0, 1, 1, 2, 2, 2]
    assert frozen_count(0.9, 0, 0.5, 1.0) == 0


def test_forward_layers_open_containers_and_skip_parameter_free_modules():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU()), nn.Flatten(), nn.LazyLinear(2))
    assert [n for n, _ in forward_layers(model)] == ["0", "1", "3.0", "5"]
    assert [n for n, _ in forward_layers(model, ["0", "3"])] == ["0", "3"]
    with pytest.raises(ValueError, match="not modules"):
        forward_layers(model, ["stem"])


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))


def _backward_flops(model, n_frozen):
    freezer = PrefixFreezer(forward_layers(model))
    freezer.freeze_to(n_frozen)
    x = torch.randn(8, 1, 16, 16)
    out = model(x)
    with FlopCounterMode(display=False) as counter:
        out.sum().backward()
    freezer.restore(training=True)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def test_backward_stops_at_the_first_trainable_layer():
    model = _cnn()
    full = _backward_flops(model, 0)
    first_conv_frozen = _backward_flops(model, 2)  # conv + BN: no weight gradient, no input gradient
    assert first_conv_frozen < 0.75 * full
    freezer = PrefixFreezer(forward_layers(model))
    freezer.freeze_to(2)
    hidden = model[:3](torch.randn(2, 1, 16, 16))
    assert not hidden.requires_grad  # autograd recorded nothing in the frozen prefix
    freezer.restore(training=True)
    assert all(p.requires_grad for p in model.parameters())


class Watch(Callback):
    """Per training batch: which parameters require grad, have a gradient, changed; the BatchNorm modes."""

    order = 80

    def before_fit(self):
        self.rows = []

    def before_step(self):
        m = self.learn.model
        self.before = [p.detach().clone() for p in m.parameters()]
        self.grad = [p.grad is not None for p in m.parameters()]

    def after_step(self):
        m = self.learn.model
        changed = [not torch.equal(a, p) for a, p in zip(self.before, m.parameters())]
        self.rows.append({"iter": self.learn.train_iter, "requires_grad": [p.requires_grad for p in m.parameters()],
                          "grad": self.grad, "changed": changed, "bn_training": m[1].training})


def test_a_fit_freezes_the_prefix_on_schedule_and_frozen_weights_stay_put():
    watch = Watch()
    cb = LayerFreezing(start=0.5)
    learn = make_learner([cb, watch], n=256)  # Linear, BatchNorm1d, Linear: 2 may freeze; 8 steps per epoch
    learn.fit(2, 1e-2)
    # 16 steps: layer 0 (Linear) freezes at progress 0.5 (step 8), layer 1 (BN) at 0.75 (step 12)
    first_linear = [r["requires_grad"][0] for r in watch.rows]
    assert first_linear == [True] * 8 + [False] * 8
    bn_weight = [r["requires_grad"][2] for r in watch.rows]
    assert bn_weight == [True] * 12 + [False] * 4
    assert all(not any(r["changed"][:2]) and not any(r["grad"][:2]) for r in watch.rows[8:])  # no grad, no step
    assert all(r["changed"][-1] for r in watch.rows)  # the last layer always trains
    assert [r["bn_training"] for r in watch.rows] == [True] * 12 + [False] * 4
    timeline = telemetry_of(learn).records("freezing", "timeline")
    assert [(e["layer"], e["name"], e["step"]) for e in timeline] == [(0, "0", 8), (1, "1", 12)]
    assert timeline[0]["progress"] == pytest.approx(0.5)
    # frozen parameters stayed in the optimiser; after the fit everything trains again
    assert sum(len(pg) for pg in learn.opt.param_lists) == len(list(learn.model.parameters()))
    assert all(p.requires_grad for p in learn.model.parameters())
    assert learn.model[1].training == learn.model.training


def test_tied_weights_keep_training():
    learn = make_learner([LayerFreezing(start=0.0, end=0.5)], n=64, task="sequence")
    frozen = []

    class Check(Callback):
        def after_step(self):
            frozen.append(self.learn.model.tok.weight.requires_grad)

    learn.add_cb(Check())
    learn.fit(1, 1e-3)  # the embedding is layer 0 and freezes, but the output head shares its weight
    assert all(frozen)


def test_an_interrupted_fit_gives_everything_back():
    class Boom(Callback):
        def after_batch(self):
            if self.training and self.learn.train_iter == 14:
                raise KeyboardInterrupt

    learn = make_learner(n=256)
    learn.model[3].weight.requires_grad_(False)  # the user's own choice survives too
    with pytest.raises(KeyboardInterrupt):
        learn.fit(2, 1e-2, cbs=[LayerFreezing(start=0.5), Boom()])
    assert [p.requires_grad for p in learn.model.parameters()] == [True, True, True, True, False, True]
    assert learn.model[1].training

    learn = make_learner([LayerFreezing(start=0.5)], n=256)  # a callback of the Learner: fixed at the next fit
    with pytest.raises(KeyboardInterrupt):
        learn.fit(2, 1e-2, cbs=[Boom()])
    learn.fit(1, 1e-2)
    assert all(p.requires_grad for p in learn.model.parameters())


def test_resume_refreezes_the_same_prefix(tmp_path):
    class SaveAt(Callback):
        def after_epoch(self):
            if self.epoch == 1:
                self.learn.save_checkpoint("mid")

    full = make_learner([LayerFreezing(start=0.25), SaveAt()], n=256, path=tmp_path)
    full.fit(4, 1e-2)
    resumed = make_learner([LayerFreezing(start=0.25)], n=256, path=tmp_path, model_seed=1)
    resumed.fit(4, 1e-2, start_epoch=resumed.load_checkpoint("mid"))
    assert torch.allclose(params_of(full), params_of(resumed), atol=1e-6)


def test_bad_input():
    learn = make_learner([LayerFreezing(max_frozen=5)], n=64)
    with pytest.raises(ValueError, match=r"has 3 layers .* at most 2 can freeze: pass max_frozen <= 2"):
        learn.fit(1, 1e-2)
    assert all(p.requires_grad for p in learn.model.parameters())
    with pytest.raises(ValueError, match="start < end"):
        LayerFreezing(start=0.8, end=0.5)
    with pytest.raises(TypeError, match="start"):
        LayerFreezing(start=True)
    with pytest.raises(TypeError, match="start"):
        LayerFreezing(start=float("nan"))
    with pytest.raises(TypeError, match="max_frozen"):
        LayerFreezing(max_frozen=1.5)
    with pytest.raises(TypeError, match="layers"):
        LayerFreezing(layers="0")


def test_no_host_read_per_step(monkeypatch):
    from ..spies import HostReadSpy

    spy = HostReadSpy(monkeypatch)
    learn = make_learner([LayerFreezing(start=0.25), *spy.callbacks()], n=128)
    learn.fit(2, 1e-2)
    assert spy.per_batch and all(reads == [] for reads in spy.per_batch), spy.per_batch


def test_cache_skips_the_frozen_prefix_forward_and_trains_alike():
    samples = []

    def run(cache):
        random.seed(0)  # fastai's shuffling draws from Python's RNG
        learn = make_learner([LayerFreezing(start=0.25, max_frozen=2, cache=cache)], n=256, shuffle=True)
        hook = learn.model[0].register_forward_hook(lambda m, i, o: samples.append(len(o)) if m.training else None)
        learn.fit(5, 1e-2)
        hook.remove()
        return learn

    plain = run(False)
    n_plain, samples[:] = sum(samples), []
    cached = run(True)
    assert n_plain == 5 * 256
    # the Linear and the BN freeze at progress 0.25 (step 10) and 0.625 (step 25); the cache holds model[:1],
    # then model[:3] (Linear, BN, ReLU); each sample goes through the prefix once per depth
    epochs = telemetry_of(cached).records("freezing", "epoch")
    assert [e["cache_depth"] for e in epochs] == [0, 1, 1, 3, 3]
    assert [e["cached_steps"] for e in epochs] == [0, 6, 8, 8, 8]
    assert sum(samples) == n_plain - sum(e["prefix_samples_skipped"] for e in epochs)
    assert sum(samples) < 0.7 * n_plain
    assert torch.allclose(params_of(plain), params_of(cached), atol=1e-5)
    assert type(cached.model) is nn.Sequential and len(cached.model) == 4  # the whole model is back
    assert "get_idxs" not in vars(cached.dls.train)


def test_cache_refuses_what_it_cannot_cache():
    from fastai.callback.mixup import MixUp

    learn = make_learner([LayerFreezing(cache=True), MixUp()], n=64)
    with pytest.raises(ValueError, match=r"same input for a sample every epoch.*MixUp"):
        learn.fit(1, 1e-2)
    learn = make_learner([LayerFreezing(cache=True)], n=64, task="sequence")
    with pytest.raises(ValueError, match="nn.Sequential"):
        learn.fit(1, 1e-2)
