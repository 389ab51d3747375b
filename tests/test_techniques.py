"""The generic suite: every registered technique goes through the same fits, resumes and combinations.

A technique registers itself once (`effilab.registry.register`) and inherits all of these tests.
Two-process DDP for stateful techniques lives in tests/distributed.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.learner import load_learner

from effilab.callback import telemetry_of
from effilab.registry import all_techniques

from .conftest import example_input, make_learner, params_of

TECHNIQUES = all_techniques()
NAMES = sorted(TECHNIQUES)


def _learner(name, cbs=(), **kwargs):
    """The generic learner of the kind technique `name` needs (`Technique.task`), with `cbs`."""
    return make_learner(list(cbs), task=TECHNIQUES[name].task, **kwargs)


def test_registry_is_not_empty():
    assert {"infobatch", "random_prune"} <= set(NAMES)


def test_a_technique_names_a_known_kind_of_learner():
    from effilab.registry import TASK_KINDS, register

    assert {TECHNIQUES[n].task for n in NAMES} <= set(TASK_KINDS)
    with pytest.raises(ValueError, match="task must be one of"):
        register("no_such_technique", lambda: None, "data", task="video")
    for task in TASK_KINDS:  # each kind's learner predicts its own example input
        learn = make_learner(task=task, n=64)
        with torch.no_grad():
            out = learn.model.eval()(example_input(task))
        assert out.shape[0] == 3 and out.shape[-1] in (4, 128)


class _CpuBf16(Callback):
    """Mixed precision on the CPU (fastai's MixedPrecision targets CUDA): bf16 autocast around the forward."""

    order = 10

    def before_batch(self):
        self.ctx = torch.autocast("cpu", dtype=torch.bfloat16)
        self.ctx.__enter__()

    def after_loss(self):
        self.ctx.__exit__(None, None, None)


def _fit_ok(learn, epochs=2):
    learn.fit_one_cycle(epochs, 1e-2)
    loss, acc = learn.validate()
    assert torch.isfinite(torch.tensor(loss)) and 0 <= acc <= 1
    return loss, acc


@pytest.mark.parametrize("name", NAMES)
def test_two_epoch_fit_then_a_second_fit(name):
    learn = _learner(name, [TECHNIQUES[name].make()])
    before = params_of(learn)
    _fit_ok(learn)
    assert not torch.equal(before, params_of(learn)), "no training happened"
    _fit_ok(learn, epochs=3)  # a second fit on the same Learner
    assert telemetry_of(learn).sources, "the technique wrote no telemetry"


@pytest.mark.parametrize("name", NAMES)
def test_resume_mid_run_continues_identically(name, tmp_path):
    class SaveAt(Callback):
        def after_epoch(self):
            if self.epoch == 1:
                self.learn.save_checkpoint("mid")

    full = _learner(name, [TECHNIQUES[name].make(), SaveAt()], path=tmp_path)
    full.fit_one_cycle(4, 1e-2)

    resumed = _learner(name, [TECHNIQUES[name].make()], path=tmp_path, model_seed=1)  # other initial weights
    start = resumed.load_checkpoint("mid")
    assert start == 2
    resumed.fit_one_cycle(4, 1e-2, start_epoch=start)
    assert torch.allclose(params_of(full), params_of(resumed), atol=1e-6), "resumed run diverged"


@pytest.mark.parametrize("name", NAMES)
def test_export_and_pickle(name, tmp_path):
    learn = _learner(name, [TECHNIQUES[name].make()], path=tmp_path)
    learn.fit(1, 1e-2)
    cb = learn.cbs[-1] if type(learn.cbs[-1]).__module__.startswith("effilab") else None
    if cb is not None:
        pickle.loads(pickle.dumps(cb.state_dict()))
    learn.export(tmp_path / "export.pkl")
    inference = load_learner(tmp_path / "export.pkl")
    x = example_input(TECHNIQUES[name].task)
    with torch.no_grad():
        assert torch.allclose(inference.model.eval()(x), learn.model.eval()(x))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("precision", ["fastai_mixed_precision", "cpu_bf16_autocast"])
def test_with_mixed_precision(name, precision):
    extra = MixedPrecision() if precision == "fastai_mixed_precision" else _CpuBf16()
    learn = _learner(name, [TECHNIQUES[name].make(), extra])
    _fit_ok(learn)


@pytest.mark.parametrize("name", NAMES)
def test_with_dataloader_workers(name):
    learn = _learner(name, [TECHNIQUES[name].make()], num_workers=2)
    _fit_ok(learn)


@pytest.mark.parametrize("name", NAMES)
def test_all_techniques_together(name):
    """Each technique alongside every other one (where they can be combined) still trains: the non-"data"
    techniques for the generic learner ("tabular") or for this technique's kind of learner."""
    task = TECHNIQUES[name].task
    others = [TECHNIQUES[o].make() for o in NAMES
              if o != name and TECHNIQUES[o].category != "data" and TECHNIQUES[o].task in ("tabular", task)]
    learn = _learner(name, [TECHNIQUES[name].make(), *others])
    _fit_ok(learn)
