"""Autocast: the forward really runs in reduced precision on a CPU, the loss scaler's bookkeeping, errors,
restoring the autocast state, and FP8's number grid and scaling error (CPU numerics)."""

from __future__ import annotations

import pytest
import torch
from fastai.callback.core import Callback

from effilab.callback import telemetry_of
from effilab.core.precision import autocast_dtype, cpu_fast_bf16, fp8_grid, fp8_scaling_error, make_grad_scaler
from effilab.model import Autocast

from ..conftest import make_learner
from ..spies import HostReadSpy


class Dtypes(Callback):
    """The dtype of the first Linear's output in each training batch, and of the prediction the loss sees."""

    order = 20

    def before_fit(self):
        self.hidden, self.pred = [], []
        self.hook = self.learn.model[0].register_forward_hook(lambda m, i, o: self.hidden.append(o.dtype))

    def after_pred(self):
        self.pred.append(self.learn.pred.dtype)

    def after_fit(self):
        self.hook.remove()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_forward_runs_in_reduced_precision_on_cpu(dtype):
    spy = Dtypes()
    learn = make_learner([Autocast(dtype, warn_slow=False), spy], n=128)
    learn.fit(1, 1e-2)
    assert spy.hidden and set(spy.hidden) == {dtype}
    assert set(spy.pred) == {torch.float32}  # the loss and the metrics see fp32
    assert not torch.is_autocast_enabled("cpu")  # the region is closed after the fit
    assert all(p.dtype == torch.float32 for p in learn.model.parameters())  # master weights stay fp32


def test_without_the_callback_the_forward_is_fp32():
    spy = Dtypes()
    make_learner([spy], n=128).fit(1, 1e-2)
    assert set(spy.hidden) == {torch.float32}


def test_no_scaler_for_bf16_or_on_cpu_and_one_for_fp16_on_cuda():
    assert make_grad_scaler("cpu", torch.bfloat16) is None
    assert make_grad_scaler("cpu", torch.float16) is None
    assert make_grad_scaler("cuda", torch.bfloat16) is None
    assert isinstance(make_grad_scaler("cpu", torch.float16, enabled=True), torch.amp.GradScaler)


class Overflow(Callback):
    """Puts an inf into one gradient at chosen training steps."""

    order = 5

    def __init__(self, at):
        self.at = set(at)

    def after_backward(self):
        if self.learn.train_iter in self.at:
            next(self.learn.model.parameters()).grad[0] = float("inf")


def test_loss_scaler_skips_overflowing_steps_and_reports_its_scale_per_epoch():
    cb = Autocast("fp16", grad_scaler=True, warn_slow=False)
    learn = make_learner([cb, Overflow(at=[3, 12])], n=256)
    before = None

    class Weights(Callback):
        order = 90

        def after_backward(self):
            nonlocal before
            if self.learn.train_iter == 3:
                before = [p.detach().clone() for p in self.learn.model.parameters()]

        def after_step(self):
            if self.learn.train_iter == 3:  # the skipped step left the weights alone
                assert all(torch.equal(a, b) for a, b in zip(before, self.learn.model.parameters()))

    learn.add_cb(Weights())
    learn.fit(2, 1e-2)
    epochs = telemetry_of(learn).records("autocast", "epoch")
    assert [r["skipped_steps"] for r in epochs] == [1, 1]
    scales = telemetry_of(learn).records("autocast", "scale")
    assert [r["skipped_at"] for r in scales] == [[3], [12]]
    first = scales[0]["scales"]
    assert len(first) == 8 and first[3] == first[2] / 2  # the overflow halved the scale
    assert cb.skipped_total == 2


def test_no_host_read_per_step(monkeypatch):
    spy = HostReadSpy(monkeypatch)
    learn = make_learner([Autocast("bf16", warn_slow=False), *spy.callbacks()], n=128)
    learn.fit(1, 1e-2)
    assert spy.per_batch and all(reads == [] for reads in spy.per_batch), spy.per_batch


def test_an_exception_mid_batch_leaves_autocast_off():
    class Boom(Callback):
        order = 20

        def after_pred(self):
            if self.learn.train_iter == 2:
                raise RuntimeError("boom")

    learn = make_learner(n=128)
    with pytest.raises(RuntimeError, match="boom"):
        learn.fit(1, 1e-2, cbs=[Autocast(warn_slow=False), Boom()])
    assert not torch.is_autocast_enabled("cpu")


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="bf16"):
        Autocast("fp8")
    with pytest.raises(ValueError, match="bf16"):
        autocast_dtype(torch.float32)
    with pytest.raises(TypeError, match="grad_scaler"):
        Autocast(grad_scaler="yes")


def test_a_cpu_without_fast_bf16_gets_a_warning(monkeypatch):
    import effilab.core.precision as precision

    monkeypatch.setattr(precision, "cpu_fast_bf16", lambda: (False, "no AVX512-BF16 (test)"))
    with pytest.warns(UserWarning, match="lacks fast bf16"):
        make_learner([Autocast("bf16")], n=64).fit(1, 1e-2)
    assert isinstance(cpu_fast_bf16.__wrapped__()[0], bool)


def test_fp8_grid_has_the_formats_ranges_and_sizes():
    e4m3, e5m2 = fp8_grid("e4m3"), fp8_grid("e5m2")
    assert e4m3.max() == 448 and e4m3.min() == -448
    assert e5m2.max() == 57344
    assert len(e4m3) == 253 and len(e5m2) == 247  # 256 codes, minus NaNs (and infs), +0/-0 merged
    # 3 mantissa bits: 8 values per binade in e4m3, 4 in e5m2
    assert ((e4m3 >= 1) & (e4m3 < 2)).sum() == 8 and ((e5m2 >= 1) & (e5m2 < 2)).sum() == 4
    with pytest.raises(ValueError, match="e4m3"):
        fp8_grid("e3m4")


def test_rowwise_scaling_beats_tensorwise_on_an_outlier_row():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, generator=g) * 1e-3
    x[0] *= 1e6  # one outlier row
    tensorwise = fp8_scaling_error(x, "e4m3", "tensorwise")
    rowwise = fp8_scaling_error(x, "e4m3", "rowwise")
    assert rowwise["median_rel_error"] < 0.07  # e4m3: at most 2**-4 relative rounding error
    assert tensorwise["flushed_fraction"] > 0.5 > rowwise["flushed_fraction"]
    assert tensorwise["median_rel_error"] > 10 * rowwise["median_rel_error"]
    with pytest.raises(ValueError, match="granularity"):
        fp8_scaling_error(x, granularity="blockwise")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_on_cuda_gets_a_scaler_and_reports_its_scale():
    cb = Autocast("fp16")
    spy = Dtypes()
    learn = make_learner([cb, spy], n=256)
    learn.dls.to("cuda")
    learn.model.cuda()
    learn.fit(2, 1e-2)
    assert cb.loss_scaler is not None and set(spy.hidden) == {torch.float16}
    epochs = telemetry_of(learn).records("autocast", "epoch")
    assert len(epochs) == 2 and epochs[-1]["scale"] > 0
    assert len(telemetry_of(learn).records("autocast", "scale")[0]["scales"]) == 8  # one per step, skipped too
