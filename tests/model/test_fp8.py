"""FP8Training: the refusal without FP8 hardware, the layer filter, emulated conversion on a CPU and the
plain model given back; on a GPU with FP8 the real thing."""

from __future__ import annotations

import pytest
import torch
from fastai.callback.core import Callback
from torch import nn

from effilab.callback import telemetry_of
from effilab.model import FP8Training, fp8_layer_filter
from effilab.model.fp8 import fp8_device_support

from ..conftest import make_learner


def test_refuses_on_a_cpu_before_any_batch():
    seen = []
    learn = make_learner([FP8Training()], n=64, task="sequence")
    learn.model.register_forward_hook(lambda *a: seen.append(1))
    with pytest.raises(RuntimeError, match=r"compute capability >= 8.9.*emulate=True"):
        learn.fit(1, 1e-2)
    assert seen == []
    assert not any(type(m).__name__ == "Float8Linear" for m in learn.model.modules())


def test_device_support_says_why():
    ok, why = fp8_device_support(torch.device("cpu"))
    assert not ok and "'cpu'" in why


def test_layer_filter():
    assert fp8_layer_filter(nn.Linear(4096, 4096)) == (True, "converted")
    ok, why = fp8_layer_filter(nn.Linear(100, 4096))
    assert not ok and "multiples of 16" in why
    ok, why = fp8_layer_filter(nn.Linear(1024, 1024))
    assert not ok and "too small" in why
    assert fp8_layer_filter(nn.Linear(1024, 1024), size_filter=False)[0]
    assert fp8_layer_filter(nn.Linear(8192, 1024))[0]  # tensorwise: in > 4096 pays
    assert not fp8_layer_filter(nn.Linear(8192, 1024), recipe="rowwise")[0]  # rowwise: out <= 2048 does not
    assert fp8_layer_filter(nn.Linear(4096, 8192), recipe="rowwise")[0]
    assert not fp8_layer_filter(nn.Conv2d(16, 16, 3))[0]
    with pytest.raises(ValueError, match="recipe"):
        fp8_layer_filter(nn.Linear(16, 16), recipe="mxfp8")


def test_no_qualifying_layer_is_an_error_that_names_the_fix():
    learn = make_learner([FP8Training(emulate=True)], n=64)  # 12 -> 32 -> 4: nothing is a multiple of 16
    with pytest.raises(ValueError, match="size_filter=False"):
        learn.fit(1, 1e-2)


def test_emulated_fp8_trains_the_qualifying_layers_and_gives_back_a_plain_model():
    cb = FP8Training(emulate=True, size_filter=False)
    learn = make_learner([cb], n=128, task="sequence")
    linears = {n: m for n, m in learn.model.named_modules() if isinstance(m, nn.Linear)}
    weights = {n: m.weight for n, m in linears.items()}
    seen = set()


    class Types(Callback):
        def after_pred(self):
            seen.update(type(m).__name__ for m in self.learn.model.modules())

    learn.add_cb(Types())
    before = {n: w.detach().clone() for n, w in weights.items()}
    learn.fit(1, 1e-2)
    assert "Float8Linear" in seen
    meta = telemetry_of(learn).meta("fp8")
    assert "blocks.0.qkv" in meta["converted"] and meta["emulate"] is True
    # back to the original modules, holding the trained Parameters
    after = {n: m for n, m in learn.model.named_modules() if isinstance(m, nn.Linear)}
    assert all(after[n] is linears[n] and type(after[n]) is nn.Linear for n in linears)
    assert all(after[n].weight is weights[n] for n in linears)
    assert not torch.equal(before["blocks.0.qkv"], after["blocks.0.qkv"].weight)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="recipe"):
        FP8Training(recipe="delayed")
    with pytest.raises(TypeError, match="emulate"):
        FP8Training(emulate="yes")


def _fp8_gpu() -> bool:
    return torch.cuda.is_available() and fp8_device_support(torch.device("cuda"))[0]


@pytest.mark.skipif(not _fp8_gpu(), reason="needs a GPU with FP8 tensor cores (compute capability >= 8.9)")
def test_fp8_on_a_gpu_converts_large_layers_and_trains():
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat

    from effilab.datasets import ArrayDataset

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(512, 2048, generator=g), torch.randint(0, 16, (512,), generator=g)
    dls = DataLoaders(DataLoader(ArrayDataset(x, y), bs=64, drop_last=True), DataLoader(ArrayDataset(x, y), bs=64),
                      device="cuda")
    model = nn.Sequential(nn.Linear(2048, 8192), nn.ReLU(), nn.Linear(8192, 16)).cuda()
    cb = FP8Training()
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), cbs=[cb])
    learn.fit(1, 1e-3)
    meta = telemetry_of(learn).meta("fp8")
    assert meta["converted"] == ["0"] and "2" in meta["skipped"]
    assert type(learn.model[0]) is nn.Linear
