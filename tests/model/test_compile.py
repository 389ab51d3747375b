"""Compile: eager baseline, compile time apart from step time, break-even, recompilations counted and
explained, partial batches without recompiling, cache resets when freezing changes the trainable set,
channels-last, restoring the model, bad input. The cheap "eager" backend (inductor takes ~75 s here)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from fastai.callback.core import Callback

from effilab.callback import telemetry_of
from effilab.core.compile import break_even_step, explain_recompile
from effilab.model import Compile, LayerFreezing

from ..conftest import make_learner


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # graphs compiled by an earlier test would be reused (no compile to observe)
    yield
    torch._dynamo.reset()


def test_break_even_step():
    assert break_even_step(10.0, 0.02, 0.01) == 1000
    assert break_even_step(0.0, 0.02, 0.01) == 1
    assert break_even_step(10.0, 0.01, 0.01) is None  # never pays
    assert break_even_step(10.0, 0.01, 0.02) is None


def test_explanations():
    assert "batch size" in explain_recompile("0/0: tensor 'args[0]' size mismatch at index 0. expected 32, actual 16")
    assert "shape" in explain_recompile("tensor 'x' size mismatch at index 2. expected 16, actual 24")
    assert "freezing" in explain_recompile("tensor 'w' requires_grad mismatch. expected requires_grad=1")
    assert "no_grad" in explain_recompile("0/0: GLOBAL_STATE changed: grad_mode")
    assert explain_recompile(None) == "first compilation"
    # dynamo lists every cached graph's failure: the validation graph's grad mode explains nothing here
    both = ["0/1: GLOBAL_STATE changed: grad_mode", "0/0: tensor 'x' size mismatch at index 2. expected 16, actual 12"]
    assert "shape" in explain_recompile(both)


def test_eager_steps_then_compiled_steps_with_compile_time_apart():
    cb = Compile(backend="eager", eager_steps=2)
    learn = make_learner([cb], n=256)
    calls = []

    class Compiled(Callback):
        def after_pred(self):
            if self.training:
                calls.append(self.learn.model._compiled_call_impl is not None)

    learn.add_cb(Compiled())
    learn.fit(2, 1e-2)
    assert calls == [False, False] + [True] * 14
    steps = telemetry_of(learn).records("compile", "step")
    assert steps[0]["kind"][:3] == ["eager", "eager", "compile"] and set(steps[1]["kind"]) == {"compiled"}
    epoch = telemetry_of(learn).records("compile", "epoch")[-1]
    assert epoch["eager_step_s"] > 0 and epoch["compiled_step_s"] > 0 and epoch["compile_s"] > 0
    expected = break_even_step(epoch["compile_s"], epoch["eager_step_s"], epoch["compiled_step_s"])
    assert epoch["break_even_step"] == expected
    compiles = telemetry_of(learn).records("compile", "compile")
    assert compiles[0]["why"] == "first compilation" and compiles[0]["where"] == "train"
    assert learn.model._compiled_call_impl is None  # uncompiled after the fit
    assert not any(k.startswith("_orig_mod") for k in learn.model.state_dict())


def _partial_last_batch_learner(cb):
    learn = make_learner([cb], n=240, batchnorm=False)  # 7 batches of 32 and one of 16
    learn.dls.train.drop_last = False
    return learn


def test_a_partial_last_batch_recompiles_and_is_explained_without_dynamic_batch():
    learn = _partial_last_batch_learner(Compile(backend="eager", eager_steps=0, dynamic_batch=False))
    learn.fit(1, 1e-2)
    train = [c for c in telemetry_of(learn).records("compile", "compile") if c["where"] == "train"]
    assert [c["why"] for c in train][:2] == ["first compilation", train[1]["why"]]
    assert "batch size" in train[1]["why"] and train[1]["step"] == 7


def test_dynamic_batch_compiles_the_partial_last_batch_into_the_same_graph():
    learn = _partial_last_batch_learner(Compile(backend="eager", eager_steps=0))
    learn.fit(1, 1e-2)
    train = [c for c in telemetry_of(learn).records("compile", "compile") if c["where"] == "train"]
    assert len(train) == 1 and train[0]["step"] == 0


def test_hitting_the_recompile_limit_warns():
    learn = _partial_last_batch_learner(Compile(backend="eager", eager_steps=0, dynamic_batch=False))
    with torch._dynamo.config.patch(recompile_limit=2), pytest.warns(UserWarning, match="recompile_limit"):
        learn.fit(1, 1e-2)


def test_freezing_resets_the_compile_cache_and_frozen_weights_stay_put():
    compile_cb = Compile(backend="eager", eager_steps=0)
    frozen_after = []

    class Watch(Callback):
        order = 90

        def before_step(self):
            self.w = self.learn.model[0].weight.detach().clone()

        def after_step(self):
            if not self.learn.model[0].weight.requires_grad:
                frozen_after.append(torch.equal(self.w, self.learn.model[0].weight))

    learn = make_learner([LayerFreezing(start=0.5), compile_cb, Watch()], n=256)
    learn.fit(2, 1e-2)
    resets = telemetry_of(learn).records("compile", "reset")
    assert [r["step"] for r in resets] == [8, 12]  # the two freezing events
    assert compile_cb.resets == 2
    assert frozen_after and all(frozen_after)


def test_channels_last_for_model_and_inputs_then_back():
    layouts = []

    class Layout(Callback):
        def after_pred(self):
            if self.training:
                layouts.append((self.learn.model[0].weight.is_contiguous(memory_format=torch.channels_last),
                                self.learn.xb[0].is_contiguous(memory_format=torch.channels_last)))

    learn = make_learner([Compile(backend="eager", channels_last=True), Layout()], n=64, task="image")
    learn.fit(1, 1e-2)
    assert layouts and all(w and x for w, x in layouts)
    assert learn.model[0].weight.is_contiguous()
    assert telemetry_of(learn).meta("compile")["channels_last"] is True


def test_an_interrupted_fit_uncompiles_the_model():
    class Boom(Callback):
        def after_batch(self):
            if self.training and self.learn.train_iter == 5:
                raise KeyboardInterrupt

    learn = make_learner(n=256, task="image")
    with pytest.raises(KeyboardInterrupt):
        learn.fit(1, 1e-2, cbs=[Compile(backend="eager", eager_steps=1, channels_last=True), Boom()])
    assert learn.model._compiled_call_impl is None
    assert learn.model[0].weight.is_contiguous()


def test_bad_input():
    with pytest.raises(ValueError, match="unknown torch.compile backend"):
        Compile(backend="tensorrt-nope")
    with pytest.raises(ValueError, match="mode"):
        Compile(mode="fast")
    with pytest.raises(TypeError, match="eager_steps"):
        Compile(eager_steps=-1)
    with pytest.raises(TypeError, match="channels_last"):
        Compile(channels_last="yes")
    with pytest.raises(TypeError, match="dynamic"):
        Compile(dynamic="auto")


def test_no_host_read_per_step(monkeypatch):
    from ..spies import HostReadSpy

    spy = HostReadSpy(monkeypatch)
    learn = make_learner([LayerFreezing(start=0.5), Compile(backend="eager", eager_steps=1), *spy.callbacks()],
                         n=128)
    learn.fit(2, 1e-2)
    assert spy.per_batch and all(reads == [] for reads in spy.per_batch), spy.per_batch


def test_a_changed_image_size_recompiles_and_is_explained():
    class Resize(Callback):
        order = -20

        def before_batch(self):
            if self.learn.epoch == 1:
                self.learn.xb = (torch.nn.functional.interpolate(self.learn.xb[0], size=(12, 12)),)

    learn = make_learner([Resize(), Compile(backend="eager", eager_steps=0)], n=128, task="image")
    learn.fit(2, 1e-2)
    train = [c for c in telemetry_of(learn).records("compile", "compile") if c["where"] == "train"]
    assert len(train) == 2 and train[1]["step"] == 4  # epoch 1 starts at step 4
    assert "shape changed" in train[1]["why"]
    assert telemetry_of(learn).records("compile", "epoch")[-1]["recompiles"] >= 1
