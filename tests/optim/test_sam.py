"""SAM and LookSAM callbacks: the step they take, BatchNorm, gradient accumulation, loss scaling and
overflow, autocast, telemetry, no host reads per step."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.training import GradientAccumulation
from fastai.optimizer import SGD
from fastai.torch_core import L
from torch import nn

from effilab import telemetry_of
from effilab.optim import SAM, LookSAM

from ..conftest import make_arrays, make_learner, params_of
from ..spies import HostReadSpy

plain_sgd = partial(SGD, mom=0.0)


class CpuScaledPrecision(MixedPrecision):
    """fastai's MixedPrecision with a CPU GradScaler (its own is CUDA-only) and optional CPU bf16 autocast."""

    def __init__(self, autocast_on=False, init_scale=2.0**10):
        super().__init__()
        self.autocast_on, self.init_scale = autocast_on, init_scale

    def before_fit(self):
        self.autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast_on)
        self.learn.scaler = torch.amp.GradScaler("cpu", init_scale=self.init_scale)
        self.scales = L()


class InjectInf(Callback):
    """Makes the first gradient of training batch `at` infinite (before SAM and the scaler see it)."""

    order = 7

    def __init__(self, at):
        self.at = at

    def after_backward(self):
        if self.epoch == 0 and self.iter == self.at:
            next(self.learn.model.parameters()).grad[0, 0] = math.inf


class Trace(Callback):
    """Per training batch: the weights after it and the loss scale; training forwards of the model."""

    order = 100

    def before_fit(self):
        self.params, self.scales, self.forwards = [], [], 0
        self.hook = self.learn.model.register_forward_hook(self._count)
        self.autocast_seen = []

    def _count(self, module, args, out):
        if module.training:
            self.forwards += 1
            self.autocast_seen.append(torch.is_autocast_enabled("cpu"))

    def after_batch(self):
        if self.training:
            self.params.append(params_of(self.learn))
            scaler = self.learn.__dict__.get("scaler")
            self.scales.append(None if scaler is None else scaler.get_scale())

    def after_fit(self):
        self.hook.remove()


def _epoch_records(learn):
    cb = next(cb for cb in learn.cbs if isinstance(cb, (SAM, LookSAM)))
    return telemetry_of(learn).records(cb.telemetry_name, "epoch")


def test_one_step_is_sgd_with_the_gradient_at_the_perturbed_weights():
    learn = make_learner([SAM(rho=0.1)], n=32, bs=32, batchnorm=False, opt_func=plain_sgd)
    model = learn.model
    w0 = [p.detach().clone() for p in model.parameters()]
    x, y = make_arrays(40)
    x, y = x[:32], y[:32]
    names = [n for n, _ in model.named_parameters()]

    def grads_at(ws):
        ws = [w.clone().requires_grad_() for w in ws]
        out = torch.func.functional_call(model, dict(zip(names, ws)), (x,))
        return torch.autograd.grad(nn.functional.cross_entropy(out, y), ws)

    g = grads_at(w0)
    gnorm = torch.cat([t.flatten() for t in g]).norm()
    g_sam = grads_at([w + 0.1 * gi / gnorm for w, gi in zip(w0, g)])
    learn.fit(1, 0.5)
    for p, w, gs in zip(model.parameters(), w0, g_sam):
        assert torch.allclose(p.detach(), w - 0.5 * gs, atol=1e-6)
    assert not torch.allclose(model[0].weight.detach(), w0[0] - 0.5 * g[0], atol=1e-6)  # not a plain step


def test_batchnorm_running_stats_count_each_batch_once():
    sam, plain = make_learner([SAM(0.05)], n=32, bs=32), make_learner([], n=32, bs=32)
    sam.fit(1, 1e-2)
    plain.fit(1, 1e-2)
    bn_sam, bn_plain = sam.model[1], plain.model[1]
    assert int(bn_sam.num_batches_tracked) == 1
    assert torch.equal(bn_sam.running_mean, bn_plain.running_mean)
    assert torch.equal(bn_sam.running_var, bn_plain.running_var)


@pytest.mark.parametrize("cls", [SAM, partial(LookSAM, every=2)])
def test_gradient_accumulation_is_sam_on_the_whole_batch(cls):
    """SAM + GradientAccumulation(n_acc=2*bs) takes the steps SAM takes on batches of 2*bs (no BatchNorm)."""
    accumulated = make_learner([cls(rho=0.1), GradientAccumulation(n_acc=32)], n=128, bs=16, batchnorm=False,
                               opt_func=plain_sgd)
    whole = make_learner([cls(rho=0.1)], n=128, bs=32, batchnorm=False, opt_func=plain_sgd)
    plain = make_learner([GradientAccumulation(n_acc=32)], n=128, bs=16, batchnorm=False, opt_func=plain_sgd)
    for learn in (accumulated, whole, plain):
        learn.fit(2, 0.5)
    assert torch.allclose(params_of(accumulated), params_of(whole), atol=1e-5)
    assert not torch.allclose(params_of(accumulated), params_of(plain), atol=1e-4)
    acc_rec, whole_rec = _epoch_records(accumulated), _epoch_records(whole)
    assert [r["steps"] for r in acc_rec] == [r["steps"] for r in whole_rec] == [4, 4]
    # each full step replays both micro-batches
    assert [r["extra_forward"] for r in acc_rec] == [2 * r["extra_forward"] for r in whole_rec]


def test_telemetry_counts_the_extra_passes():
    for cb, name in ((SAM(0.05), "sam"), (LookSAM(0.05, every=3), "looksam")):
        trace = Trace()
        learn = make_learner([cb, trace])
        learn.fit(2, 1e-2)
        recs = telemetry_of(learn).records(name, "epoch")
        steps = sum(r["steps"] for r in recs)
        extra = sum(r["extra_forward"] for r in recs)
        assert steps == 32
        assert extra == sum(r["extra_backward"] for r in recs) == math.ceil(steps / cb.sam.every)
        assert sum(r["extra_samples"] for r in recs) == 32 * extra
        assert trace.forwards == steps + extra  # the model really ran that many extra forwards
        for r in recs:
            assert r["ascent_norm"] == pytest.approx(0.05, rel=1e-4)
            assert r["nonfinite_grads"] == 0


def test_loss_scaling_gives_the_same_training_as_without():
    """The second loss is scaled like the first: with a GradScaler (fp32), SAM trains as without one."""
    scaled = make_learner([SAM(0.05), CpuScaledPrecision()])
    unscaled = make_learner([SAM(0.05)])
    scaled.fit(1, 1e-2)
    unscaled.fit(1, 1e-2)
    assert torch.allclose(params_of(scaled), params_of(unscaled), atol=1e-5)


@pytest.mark.parametrize("cls", [SAM, partial(LookSAM, every=2)])
def test_overflow_skips_the_step_like_plain_training(cls):
    runs = {}
    for name, cbs in (("plain", []), ("sam", [cls(rho=0.05)])):
        trace = Trace()
        learn = make_learner([*cbs, CpuScaledPrecision(), InjectInf(at=3), trace], n=256)
        learn.fit(1, 1e-2)
        runs[name] = trace
        assert torch.equal(trace.params[3], trace.params[2])  # step 3 skipped
        assert not torch.equal(trace.params[4], trace.params[3])  # training went on
        assert torch.isfinite(trace.params[-1]).all()
    assert runs["sam"].scales == runs["plain"].scales  # backed off once, at the same step
    assert runs["sam"].scales[3] == runs["sam"].scales[2] / 2


def test_second_forward_runs_under_the_same_autocast():
    trace = Trace()
    learn = make_learner([SAM(0.05), CpuScaledPrecision(autocast_on=True), trace], n=64)
    learn.fit(1, 1e-2)
    assert trace.forwards == 2 * 2 and all(trace.autocast_seen)
    assert torch.isfinite(params_of(learn)).all()


@pytest.mark.parametrize("make", [lambda: SAM(0.05), lambda: LookSAM(0.05, every=2)])
def test_no_host_sync_in_training_batches(monkeypatch, make):
    spy = HostReadSpy(monkeypatch)
    learn = make_learner([make(), *spy.callbacks()], n=128)
    learn.fit(2, 1e-2)
    assert len(spy.per_batch) == 8
    assert [r for batch in spy.per_batch for r in batch] == []


def test_inactive_in_lr_find():
    traces = [Trace(), Trace()]
    learn = make_learner([SAM(0.05), traces[0]])
    learn.lr_find(num_it=5, show_plot=False)
    make_learner([traces[1]]).lr_find(num_it=5, show_plot=False)
    assert traces[0].forwards == traces[1].forwards  # no extra pass
    assert not telemetry_of(learn).records("sam", "epoch")


def test_bad_parameters_get_clear_errors():
    with pytest.raises(ValueError, match="rho"):
        SAM(rho=0)
    with pytest.raises(ValueError, match="every"):
        LookSAM(every=0)
    with pytest.raises(ValueError, match="alpha"):
        LookSAM(alpha=-0.5)


def _cuda_learner(cbs, **kwargs):
    learn = make_learner(cbs, **kwargs)
    learn.dls.to("cuda")
    learn.model.cuda()
    return learn


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cls", [SAM, partial(LookSAM, every=2)])
def test_cuda_fp16_mixed_precision_trains_and_skips_overflow(cls):
    runs = {}
    for name, cbs in (("plain", []), ("sam", [cls(rho=0.05)])):
        trace = Trace()
        # A moderate initial scale: no overflow but the injected one (fp16's max is 65504).
        learn = _cuda_learner([*cbs, MixedPrecision(init_scale=2.0**10), InjectInf(at=3), trace], n=256)
        before = params_of(learn)
        learn.fit(1, 1e-2)
        runs[name] = trace
        assert torch.equal(trace.params[3], trace.params[2])
        assert not torch.equal(trace.params[-1], before.to(trace.params[-1].device))
        assert torch.isfinite(trace.params[-1]).all()
    assert runs["sam"].scales == runs["plain"].scales
    learn = _cuda_learner([cls(rho=0.05), MixedPrecision()])
    learn.fit(2, 1e-2)
    loss, _ = learn.validate()
    assert math.isfinite(loss)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cls", [SAM, partial(LookSAM, every=2)])
def test_no_cuda_sync_in_sam_steps(cls):
    class SyncErrorOn(Callback):  # around SAM's before_step (order 8), before the GradScaler's own sync
        order = 7

        def before_step(self):
            if self.epoch > 0:
                torch.cuda.set_sync_debug_mode("error")

    class SyncErrorOff(Callback):
        order = 9

        def before_step(self):
            torch.cuda.set_sync_debug_mode("default")

        def after_batch(self):
            torch.cuda.set_sync_debug_mode("default")

    learn = _cuda_learner([cls(rho=0.05), MixedPrecision(), SyncErrorOn(), SyncErrorOff()])
    learn.fit(3, 1e-2)
    assert len(_epoch_records(learn)) == 3
