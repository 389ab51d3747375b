"""MemoryProbe, ThroughputMeter, HostCopy and the SystemMonitor callback: the "system" telemetry contract."""

from __future__ import annotations

import pickle
import sys
import time
import types

import pytest
import torch
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader

from effilab import InfoBatch, telemetry_of
from effilab.core import probe as probe_mod
from effilab.core.probe import HostCopy, MemoryProbe, ThroughputMeter
from effilab.datasets import ArrayDataset
from effilab.system.monitor import SystemMonitor

from ..conftest import make_arrays, make_learner
from . import HostReadSpy

STEP_KEYS = {"time_s", "iter", "samples_per_s", "data_wait_frac", "rss_mb"}
CUDA_KEYS = {"cuda_allocated_mb", "cuda_reserved_mb", "cuda_peak_mb"}
EPOCH_KEYS = {"epoch", "samples", "samples_total", "full_samples_total", "time_s", "data_wait_frac",
              "peak_rss_mb"}
META_KEYS = {"device", "has_gpu", "gpu_name", "nvml", "total_memory_mb", "note"}


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


# -- ThroughputMeter -----------------------------------------------------------------------------------

def test_throughput_meter_maths_with_a_fake_clock():
    clock = FakeClock()
    m = ThroughputMeter(clock=clock)
    m.resume()                          # t=0: training starts, the loader is asked for a batch
    clock.t = 0.2
    m.batch_start()                     # waited 0.2
    clock.t = 1.0
    m.batch_end(10)
    clock.t = 1.5
    m.batch_start()                     # waited 0.5
    clock.t = 2.0
    m.batch_end(10)
    first = m.interval()
    assert first["samples"] == 20 and first["elapsed_s"] == pytest.approx(2.0)
    assert first["samples_per_s"] == pytest.approx(10.0)
    assert first["data_wait_frac"] == pytest.approx(0.7 / 2.0)

    clock.t = 2.5
    m.pause()                           # validation from 2.5 to 10 is not counted
    clock.t = 10.0
    m.resume()
    clock.t = 10.1
    m.batch_start()                     # waited 0.1
    clock.t = 11.0
    m.batch_end(5)
    second = m.interval()
    assert second["samples"] == 5 and second["elapsed_s"] == pytest.approx(0.5 + 1.0)
    assert second["samples_per_s"] == pytest.approx(5 / 1.5)
    assert second["data_wait_frac"] == pytest.approx(0.1 / 1.5)

    total = m.total()
    assert total["samples"] == 25 and total["elapsed_s"] == pytest.approx(3.5)
    assert total["wait_s"] == pytest.approx(0.8)
    empty = m.interval()
    assert empty["samples"] == 0 and empty["samples_per_s"] == 0.0
    m.reset()
    assert m.total()["samples"] == 0 and not m.running


def test_throughput_meter_idle_interval_is_zero_not_nan():
    m = ThroughputMeter(clock=FakeClock())
    stats = m.interval()
    assert stats["samples_per_s"] == 0.0 and stats["data_wait_frac"] == 0.0


# -- MemoryProbe -----------------------------------------------------------------------------------------

def test_memory_probe_on_cpu_reads_rss_and_no_cuda_fields():
    p = MemoryProbe("cpu")
    values = p.read()
    assert set(values) == {"rss_mb"} and values["rss_mb"] > 10
    assert p.peak_rss_mb >= values["rss_mb"]
    info = p.info()
    assert set(info) == META_KEYS
    assert info["has_gpu"] is False and info["nvml"] is False and info["gpu_name"] is None
    assert "RSS" in info["note"] and info["total_memory_mb"] > values["rss_mb"]


def test_memory_probe_peak_follows_allocations():
    p = MemoryProbe("cpu")
    p.reset_peak()
    before = p.peak_rss_mb
    block = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
    p.read()
    del block
    assert p.peak_rss_mb > before + 32


@pytest.fixture
def fake_cuda(monkeypatch):
    """A CUDA device as far as MemoryProbe can tell, with a fake NVML module."""
    stats = {"allocated_bytes.all.current": 3 * 2**20, "reserved_bytes.all.current": 8 * 2**20,
             "allocated_bytes.all.peak": 5 * 2**20}
    resets = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device=None: dict(stats))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: resets.append(device))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: types.SimpleNamespace(name="Fake GPU", total_memory=16 * 2**30,
                                                                  uuid=None))
    nvml = types.SimpleNamespace(nvmlInit=lambda: None, nvmlDeviceGetHandleByIndex=lambda i: ("handle", i),
                                 nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=42))
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    return types.SimpleNamespace(stats=stats, resets=resets, nvml=nvml)


def test_memory_probe_on_cuda_reads_allocator_and_nvml(fake_cuda):
    p = MemoryProbe("cuda:0")
    values = p.read()
    assert set(values) == {"rss_mb", "gpu_util"} | CUDA_KEYS
    assert values["cuda_allocated_mb"] == 3.0 and values["cuda_reserved_mb"] == 8.0
    assert values["cuda_peak_mb"] == 5.0 and values["gpu_util"] == pytest.approx(0.42)
    p.reset_peak()
    assert fake_cuda.resets == [torch.device("cuda:0")]
    info = p.info()
    assert info == {"device": "cuda:0", "has_gpu": True, "gpu_name": "Fake GPU", "nvml": True,
                    "total_memory_mb": 16 * 1024.0, "note": ""}


def test_memory_probe_on_cuda_without_working_nvml(fake_cuda):
    def broken():
        raise RuntimeError("NVML Shared Library Not Found")

    fake_cuda.nvml.nvmlInit = broken
    p = MemoryProbe("cuda:0")
    assert "gpu_util" not in p.read() and CUDA_KEYS <= set(p.read())
    assert p.info()["nvml"] is False and "nvidia-ml-py" in p.info()["note"]


def test_nvml_handle_is_none_without_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    assert probe_mod._nvml_handle(torch.device("cuda:0")) is None


# -- HostCopy ----------------------------------------------------------------------------------------------

def test_host_copy_of_host_values():
    c = HostCopy()
    c.put(torch.tensor(2.5))
    assert not c.deferred and c.get() == 2.5
    c.put(None)
    assert c.get() is None
    c.put(1.25)
    assert c.get() == 1.25


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_host_copy_of_a_cuda_scalar_does_not_sync():
    c = HostCopy()
    x = torch.tensor(3.5, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        c.put(x * 2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert c.deferred and c.get() == 7.0


# -- SystemMonitor ----------------------------------------------------------------------------------------

def _check_types(rec: dict):
    for k, v in rec.items():
        assert v is None or type(v) in (int, float, bool, str), f"{k}={v!r} is not a plain Python value"


def test_monitor_follows_the_contract_on_cpu():
    learn = make_learner([SystemMonitor(every_s=0.0)])
    learn.fit(2, 1e-2)
    tel = telemetry_of(learn)
    meta = tel.meta("system")
    assert set(meta) == META_KEYS and meta["device"] == "cpu" and meta["has_gpu"] is False
    assert meta["note"] == "no GPU: showing process memory (RSS)"
    steps = tel.records("system", "step")
    assert [r["iter"] for r in steps] == list(range(32))  # every_s=0: one per training batch
    for r in steps:
        assert set(r) == STEP_KEYS, "CUDA fields must be absent on the CPU"
        _check_types(r)
        assert isinstance(r["iter"], int) and 0 <= r["data_wait_frac"] <= 1
        assert r["samples_per_s"] > 0 and r["rss_mb"] > 10
    times = [r["time_s"] for r in steps]
    assert times == sorted(times) and times[0] > 0
    epochs = tel.records("system", "epoch")
    assert [r["epoch"] for r in epochs] == [0, 1]
    for r in epochs:
        assert set(r) == EPOCH_KEYS
        _check_types(r)
    assert [r["samples"] for r in epochs] == [512, 512]
    assert [r["samples_total"] for r in epochs] == [512, 1024] == [r["full_samples_total"] for r in epochs]
    assert epochs[0]["time_s"] < epochs[1]["time_s"] and epochs[1]["peak_rss_mb"] > 10


def test_monitor_step_records_are_throttled_in_time():
    learn = make_learner([SystemMonitor(every_s=0.05)], n=1024, bs=16)
    learn.fit(1, 1e-2)
    times = telemetry_of(learn).series("system", "step", "time_s")
    assert all(b - a >= 0.05 for a, b in zip(times, times[1:]))
    learn = make_learner([SystemMonitor(every_s=1e9)])
    learn.fit(1, 1e-2)
    assert telemetry_of(learn).records("system", "step") == []
    assert len(telemetry_of(learn).records("system", "epoch")) == 1


def test_monitor_counts_the_samples_a_pruned_epoch_forwards():
    learn = make_learner([InfoBatch(0.7, seed=0), SystemMonitor()])
    learn.fit(4, 1e-2)
    tel = telemetry_of(learn)
    system, pruning = tel.records("system", "epoch"), tel.records("infobatch", "samples")
    assert [r["samples"] for r in system] == [r["forwarded"] for r in pruning]
    assert min(r["samples"] for r in system) < 512
    assert [r["full_samples_total"] for r in system] == [r["full_total"] for r in pruning]


class _SlowItems(ArrayDataset):
    def __getitem__(self, i):
        time.sleep(0.003)
        return super().__getitem__(i)


def test_monitor_sees_a_slow_loader():
    learn = make_learner([SystemMonitor(every_s=0.0)])
    x, y = make_arrays(256)
    learn.dls = DataLoaders(DataLoader(_SlowItems(x, y), bs=32, drop_last=True),
                            DataLoader(ArrayDataset(x[:64], y[:64]), bs=64), device="cpu")
    learn.fit(1, 1e-2)
    tel = telemetry_of(learn)
    assert tel.records("system", "epoch")[0]["data_wait_frac"] > 0.5
    assert min(tel.series("system", "step", "data_wait_frac")) > 0.3

    fast = make_learner([SystemMonitor()], n=256)
    fast.fit(1, 1e-2)
    assert telemetry_of(fast).records("system", "epoch")[0]["data_wait_frac"] < 0.5


def test_monitor_second_fit_validate_and_lr_find():
    learn = make_learner([SystemMonitor()])
    learn.fit(1, 1e-2)
    learn.validate()  # fires before_fit / epoch events: no new records
    learn.get_preds()
    tel = telemetry_of(learn)
    assert len(tel.records("system", "epoch")) == 1
    learn.lr_find(num_it=8, show_plot=False)
    assert len(tel.records("system", "epoch")) == 1
    learn.fit(2, 1e-2)
    epochs = tel.records("system", "epoch")
    assert [r["epoch"] for r in epochs] == [0, 0, 1]
    assert [r["samples_total"] for r in epochs] == [512, 1024, 1536]  # the Learner's whole life


def test_monitor_makes_no_host_reads_in_training_batches(monkeypatch):
    spy = HostReadSpy(monkeypatch)
    learn = make_learner([SystemMonitor(every_s=0.0), *spy.callbacks()])
    learn.fit(2, 1e-2)
    assert len(spy.per_batch) == 32 and len(telemetry_of(learn).records("system", "step")) == 32
    assert [reads for reads in spy.per_batch if reads] == []


def test_monitor_pickles_with_the_learner_and_mid_fit():
    import cloudpickle
    from fastai.callback.core import Callback

    states = []

    class PickleMidFit(Callback):
        order = 100

        def after_batch(self):
            if self.training and self.iter == 3:
                cb = self.learn.cbs.filter(lambda c: isinstance(c, SystemMonitor))[0]
                states.append(pickle.dumps({k: v for k, v in cb.__getstate__().items() if k != "learn"}))

    learn = make_learner([SystemMonitor(every_s=0.0), PickleMidFit()])
    learn.fit(1, 1e-2)
    assert len(states) == 1 and pickle.loads(states[0])["every_s"] == 0.0
    copy = cloudpickle.loads(cloudpickle.dumps(learn))  # what `learn.export` does, without emptying the dls
    cb = copy.cbs.filter(lambda c: isinstance(c, SystemMonitor))[0]
    assert cb._run is None and cb.every_s == 0.0
    assert telemetry_of(copy).records("system", "epoch") == telemetry_of(learn).records("system", "epoch")
    copy.fit(1, 1e-2)
    assert len(telemetry_of(copy).records("system", "epoch")) == 2
