"""The generic suite: every registered technique goes through the same fits, resumes and combinations.

A technique registers itself once (`effilab.registry.register`) and inherits all of these tests.
Two-process DDP for stateful techniques lives in tests/distributed.
"""

from __future__ import annotations

import inspect
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


def test_reimporting_a_technique_module_registers_it_again():
    """`importlib.reload` (what `%autoreload` does) runs the module's `register` calls again: no "already
    registered" (in a fresh process: a reload replaces classes other tests hold). Another module's claim on a
    registered name is still an error."""
    import subprocess
    import sys

    code = ("import importlib, effilab.data.infobatch as m, effilab.optim.averaging as a, effilab.callback as c\n"
            "for mod in (m, a, c, m): importlib.reload(mod)\n"
            "from effilab.registry import TECHNIQUES, register\n"
            "assert TECHNIQUES['infobatch'].make.__module__ == m.__name__\n"
            "try:\n    register('infobatch', lambda: None, 'data')\nexcept ValueError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "already registered by effilab.data.infobatch" in out.stdout


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
    """Mixed precision on the CPU (fastai's MixedPrecision autocasts for CUDA only: on the CPU it runs in fp32):
    bf16 autocast around the forward and the loss, as MixedPrecision does on CUDA."""

    order = 10

    def before_batch(self):
        self.ctx = torch.autocast("cpu", dtype=torch.bfloat16)
        self.ctx.__enter__()

    def after_loss(self):
        self._exit()

    def after_cancel_batch(self):
        self._exit()

    def after_fit(self):
        self._exit()

    after_cancel_fit = after_fit

    def _exit(self):
        if getattr(self, "ctx", None) is not None:
            self.ctx.__exit__(None, None, None)
            self.ctx = None


class _ForwardDtypes(Callback):
    """The dtypes of the outputs of the model's layers with weights, in training batches."""

    def __init__(self):
        self.dtypes = set()  # over every fit (validate() fires before_fit too)

    def before_fit(self):
        self.hooks = [m.register_forward_hook(self._hook) for m in self.learn.model.modules()
                      if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]

    def _hook(self, module, args, out):
        if module.training and isinstance(out, torch.Tensor):
            self.dtypes.add(out.dtype)

    def after_fit(self):
        for h in self.hooks:
            h.remove()


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
@pytest.mark.parametrize("precision", [
    pytest.param("fastai_mixed_precision_cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="fastai's MixedPrecision autocasts on CUDA only")),
    "cpu_bf16_autocast"])
def test_with_mixed_precision(name, precision):
    """The forward really runs in reduced precision (the layers with weights return fp16/bf16)."""
    dtypes = _ForwardDtypes()
    extra = MixedPrecision() if precision == "fastai_mixed_precision_cuda" else _CpuBf16()
    learn = _learner(name, [TECHNIQUES[name].make(), extra, dtypes])
    if precision == "fastai_mixed_precision_cuda":
        learn.dls.to("cuda")
        learn.model.cuda()
    _fit_ok(learn)
    expected = torch.float16 if precision == "fastai_mixed_precision_cuda" else torch.bfloat16
    assert expected in dtypes.dtypes, f"the forward ran in {dtypes.dtypes}, not {expected}"


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


class _Snapshot(Callback):
    """The model's raw weights at the start of each training batch and of each validation (before any other
    callback's handler runs): what an interrupted fit must leave in the model."""

    order = -1000

    def before_batch(self):
        if self.training:
            self.raw = params_of(self.learn)

    def before_validate(self):
        self.raw = params_of(self.learn)


class _Interrupt(Callback):
    """Raises `exc` at `event` of the second training batch (or the first validation batch) of the last
    epoch (2) of a 3-epoch fit, after every other callback's handler of that event."""

    order = 1000

    def __init__(self, event: str, phase: str, exc: type[BaseException]):
        self.event, self.phase, self.exc, self.batches = event, phase, exc, 0

    def __call__(self, event_name):
        super().__call__(event_name)
        if event_name != self.event or self.learn.epoch != 2 or self.training != (self.phase == "train"):
            return
        self.batches += 1
        if self.batches == (2 if self.phase == "train" else 1):
            raise self.exc(f"interrupted at {self.event} ({self.phase})")


def _learner_state(learn) -> dict:
    """What a fit must leave as it found it (compared by identity where a technique could swap the object)."""
    model = learn.model
    return {
        "loss_func": learn.loss_func, "opt_func": learn.opt_func, "model": model,
        "dls.train": learn.dls.train, "dls.valid": learn.dls.valid,
        "dls.train.bs": learn.dls.train.bs, "dls.valid.bs": learn.dls.valid.bs,
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "callbacks": [type(cb).__name__ for cb in learn.cbs],
    }


def _changes(before: dict, after: dict) -> list[str]:
    out = []
    for key, old in before.items():
        new = after[key]
        same = new is old if key in ("loss_func", "opt_func", "model", "dls.train", "dls.valid") else new == old
        if not same:
            out.append(f"{key}: {old!r} -> {new!r}")
    return out


INTERRUPTIONS = {  # name: (event, phase, exception)
    "error_in_train_batch": ("after_loss", "train", RuntimeError),
    "error_before_step": ("before_step", "train", RuntimeError),
    "ctrl_c_in_validation": ("after_pred", "valid", KeyboardInterrupt),
}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("attached", ["learn.cbs", "fit(cbs=...)"])
@pytest.mark.parametrize("interruption", sorted(INTERRUPTIONS))
def test_an_interrupted_fit_leaves_the_learner_as_it_found_it(name, attached, interruption, request):
    event, phase, exc = INTERRUPTIONS[interruption]
    technique, snapshot = TECHNIQUES[name].make(), _Snapshot()
    learn = _learner(name, [technique] if attached == "learn.cbs" else [], n=128)
    before = _learner_state(learn)
    extra = [snapshot, _Interrupt(event, phase, exc)]
    with pytest.raises(exc, match="interrupted at"):
        learn.fit_one_cycle(3, 1e-2, cbs=extra if attached == "learn.cbs" else [technique, *extra])
    where = f"{name} ({attached}, {exc.__name__} at {event} of a {phase} batch)"
    changed = _changes(before, _learner_state(learn))
    assert not changed, f"{where} left the Learner changed: " + "; ".join(changed)
    diff = (params_of(learn) - snapshot.raw).abs().max()
    assert diff == 0, f"{where} left other weights in the model than the raw ones at the interruption (max diff {diff})"
    learn.fit(1, 1e-3)  # a plain fit works on the same Learner
    assert torch.isfinite(torch.tensor(learn.recorder.values[-1][0])), f"{where}: the next fit's loss is not finite"


_WRONG = ["no", "0.5", 1.5, float("nan"), True, None, 1]
_FITS = {"bool": lambda v: type(v) is bool, "int": lambda v: type(v) is int, "str": lambda v: isinstance(v, str),
         "float": lambda v: type(v) in (int, float) and v == v, "None": lambda v: v is None}


@pytest.mark.parametrize("name", NAMES)
def test_constructors_reject_arguments_of_the_wrong_type(name, request):
    """`EMA(warmup="no")`, `SelectiveBackprop(stale="no")`, `InfoBatch(seed=1.5)`...: an error, not a coercion.
    Each argument annotated `bool`, `float`, `int` or `str` (or a union of them and None) gets every value of
    another type."""
    from effilab.callback import ArgumentTypeError

    cls = type(TECHNIQUES[name].make())
    params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
    tried = 0
    for param in params:
        ann = param.annotation
        kinds = [k.strip() for k in ann.split("|")] if isinstance(ann, str) else []
        if not kinds or not set(kinds) <= set(_FITS):
            continue
        for value in _WRONG:
            if not any(_FITS[k](value) for k in kinds):
                with pytest.raises(ArgumentTypeError, match=param.name):
                    cls(**{param.name: value})
                tried += 1
    assert tried or not params, f"{cls.__name__}: no annotated argument to check"
