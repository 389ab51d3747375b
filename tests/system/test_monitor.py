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

STEP_KEYS = {"time_s", "iter", "samples_per_s", "data_wait_frac", "rss_mb", "flops_per_s", "mfu"}
CUDA_KEYS = {"cuda_allocated_mb", "cuda_reserved_mb", "cuda_peak_mb"}
EPOCH_KEYS = {"epoch", "samples", "samples_total", "full_samples_total", "time_s", "data_wait_frac",
              "peak_rss_mb", "flops_per_sample", "mfu"}
META_KEYS = {"device", "has_gpu", "gpu_name", "nvml", "total_memory_mb", "note", "peak_flops", "peak_source"}


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
    assert set(info) == META_KEYS - {"peak_flops", "peak_source"}
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


def test_monitor_handles_its_per_batch_events_without_fastais_dispatch(monkeypatch):
    """fastai's per-event dispatch (a `learn.training` read through two delegations) is not paid per batch:
    the monitor's per-batch handlers are called directly, and still only for training batches."""
    from fastai.callback.core import Callback

    dispatched = []
    original = Callback.__call__

    def counting(self, event_name):
        if isinstance(self, SystemMonitor):
            dispatched.append(event_name)
        return original(self, event_name)

    monkeypatch.setattr(Callback, "__call__", counting)
    learn = make_learner([SystemMonitor(every_s=0.0)])
    learn.fit(2, 1e-2)
    assert dispatched and not {"before_batch", "after_backward", "after_batch"} & set(dispatched)
    steps = telemetry_of(learn).records("system", "step")
    assert [r["iter"] for r in steps] == list(range(32))  # training batches only, each timed
    assert [r["samples"] for r in telemetry_of(learn).records("system", "epoch")] == [512, 512]
    assert all(_is_number(r["mfu"]) for r in steps), "the FLOPs were counted at the epoch's first step"


def _is_number(v):
    return isinstance(v, float) and v > 0


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


# -- FLOPs, MFU, memory snapshot, out-of-memory report ---------------------------------------------------

def test_monitor_measures_model_flops_and_mfu_on_cpu():
    from torch.utils.flop_counter import FlopCounterMode

    from effilab.system.monitor import measured_cpu_peak

    learn = make_learner([SystemMonitor(every_s=0.0)])
    model = pickle.loads(pickle.dumps(learn.model))
    x, y = make_arrays(32)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    expected = counter.get_total_flops() / 32
    learn.fit(2, 1e-2)
    tel = telemetry_of(learn)
    meta = tel.meta("system")
    assert meta["peak_flops"] == measured_cpu_peak() > 1e8 and meta["peak_source"].startswith("measured: fp32")
    epochs = tel.records("system", "epoch")
    assert [r["flops_per_sample"] for r in epochs] == [expected, expected] and expected > 1000
    for r in tel.records("system", "step"):
        assert r["flops_per_s"] == pytest.approx(expected * r["samples_per_s"])
        assert r["mfu"] == pytest.approx(r["flops_per_s"] / meta["peak_flops"]) and 0 < r["mfu"] < 1
    assert 0 < epochs[-1]["mfu"] < 1


def test_counting_flops_leaves_gradients_and_optimizer_state_plain_tensors():
    # A backward run under a dispatch mode made the gradients TensorBase once fastai's TensorBase reached it: every
    # optimiser op then went through __torch_function__, +30-50% on a small model for the rest of the fit.
    def types(learn):
        return ({type(p.grad) for p in learn.model.parameters()},
                {type(v) for st in learn.opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)})

    from effilab import InfoBatch  # its weighted loss carries TensorBase into the backward

    plain = make_learner([InfoBatch(0.5, seed=0)])
    plain.fit(1, 1e-2)
    monitored = make_learner([InfoBatch(0.5, seed=0), SystemMonitor(every_s=0.0)])
    monitored.fit(1, 1e-2)
    assert types(monitored) == types(plain) == ({torch.Tensor}, {torch.Tensor})
    assert telemetry_of(monitored).records("system", "epoch")[0]["flops_per_sample"] > 0


def test_flops_are_counted_again_each_epoch_as_sizes_change():
    from effilab import ProgressiveResize

    learn = make_learner([ProgressiveResize(), SystemMonitor(peak_flops=1e12)], task="image", n=128)
    learn.fit(3, 1e-2)
    tel = telemetry_of(learn)
    per_sample = [r["flops_per_sample"] for r in tel.records("system", "epoch")]
    assert per_sample == sorted(per_sample) and per_sample[0] < per_sample[-1]  # small images first
    assert tel.meta("system")["peak_source"] == "given"
    assert tel.records("system", "epoch")[-1]["mfu"] > 0


def test_measured_cpu_peak_is_cached():
    from effilab.system.monitor import measured_cpu_peak

    t0 = time.perf_counter()
    first = measured_cpu_peak(size=64, seconds=0.05)
    assert measured_cpu_peak(size=64, seconds=0.05) == first > 0
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("name, dtype, tf32, tflops", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, None, 989.4), ("NVIDIA H100 PCIe", torch.float16, None, 756.0),
    ("NVIDIA H100 NVL", torch.float32, False, 60.0), ("NVIDIA H200", torch.float32, True, 494.7),
    ("NVIDIA A100-SXM4-80GB", torch.float32, False, 19.5), ("NVIDIA A100 80GB PCIe", torch.float32, True, 156.0),
    ("NVIDIA A10", torch.bfloat16, None, 125.0), ("NVIDIA L4", torch.bfloat16, None, 121.0),
    ("NVIDIA L40S", torch.float16, None, 362.1), ("Tesla T4", torch.float16, None, 65.0),
    ("Tesla T4", torch.float32, True, 8.1), ("Tesla T4", torch.bfloat16, None, None),
    ("NVIDIA GeForce RTX 4090", torch.bfloat16, None, 165.2), ("Some Future GPU", torch.bfloat16, None, None)])
def test_datasheet_peaks(name, dtype, tf32, tflops):
    from effilab.system.monitor import datasheet_peak

    peak = datasheet_peak(name, dtype, tf32=tf32)
    assert peak == (None if tflops is None else pytest.approx(tflops * 1e12))


def test_peak_on_a_fake_gpu_comes_from_the_datasheet(fake_cuda, monkeypatch):
    from effilab.system.monitor import peak_flops

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: types.SimpleNamespace(
        name="NVIDIA H100 80GB HBM3", total_memory=80 * 2**30, uuid=None))
    peak, source = peak_flops(torch.device("cuda:0"), torch.bfloat16)
    assert peak == pytest.approx(989.4e12) and source == "datasheet: NVIDIA H100 80GB HBM3, bf16 dense"
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: types.SimpleNamespace(
        name="Fake GPU", total_memory=2**30, uuid=None))
    peak, source = peak_flops(torch.device("cuda:0"), torch.bfloat16)
    assert peak is None and "peak_flops=" in source


class _FakeCudaProbe(MemoryProbe):
    """A MemoryProbe that believes it watches cuda:0 (with the fake_cuda fixture's allocator)."""

    def __init__(self, device=None):
        super().__init__("cpu")
        self.device, self.is_cuda = torch.device("cuda:0"), True


@pytest.fixture
def fake_cuda_monitor(fake_cuda, monkeypatch, tmp_path):
    from effilab.system import monitor as monitor_mod

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # fastai would move the Learner there
    monkeypatch.setattr(monitor_mod, "MemoryProbe", _FakeCudaProbe)
    monkeypatch.setattr(monitor_mod, "peak_flops", lambda device, dtype: (1e12, f"fake {device} {dtype}"))
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history",
                        lambda enabled="all", **kw: calls.append(("record", enabled, kw)))
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", lambda path: calls.append(("dump", path)))
    monkeypatch.setattr(torch._C, "_cuda_attach_out_of_memory_observer", lambda fn: calls.append(("observe", fn)))
    monkeypatch.setattr(monitor_mod, "_OBSERVING", False)
    return types.SimpleNamespace(calls=calls, stats=fake_cuda.stats, path=tmp_path / "snaps" / "mem.pickle")


def test_memory_snapshot_on_fake_cuda(fake_cuda_monitor):
    calls, path = fake_cuda_monitor.calls, fake_cuda_monitor.path
    learn = make_learner([SystemMonitor(memory_snapshot=path, snapshot_steps=3)])
    dumped_at = []

    class Watch(__import__("fastai").callback.core.Callback):
        order = 100

        def after_batch(self):
            if self.training and any(c[0] == "dump" for c in calls) and not dumped_at:
                dumped_at.append(self.learn.train_iter)

    learn.add_cb(Watch())
    learn.fit(1, 1e-2)
    assert calls[0] == ("record", "all", {"max_entries": 100_000})
    assert ("dump", str(path)) in calls and calls[-1] == ("record", None, {})
    assert dumped_at == [3] and path.parent.is_dir()  # after the third training step
    assert telemetry_of(learn).meta("system")["memory_snapshot"] == str(path)
    assert [c[0] for c in calls].count("observe") == 1
    # A fit shorter than snapshot_steps still saves what it recorded.
    calls.clear()
    short = make_learner([SystemMonitor(memory_snapshot=path, snapshot_steps=10_000)], n=64)
    short.fit(1, 1e-2)
    assert [c[0] for c in calls] == ["record", "dump", "record"]


def test_out_of_memory_report_on_fake_cuda(fake_cuda_monitor, monkeypatch):
    from fastai.callback.core import Callback

    from effilab.system import monitor as monitor_mod

    fake_cuda_monitor.stats.update({"allocated_bytes.all.current": 700 * 2**20,
                                    "reserved_bytes.all.current": 1000 * 2**20, "num_alloc_retries": 3})
    segments = [{"stream": 0, "blocks": [
        {"size": 400 * 2**20, "state": "active_allocated", "frames": [{"filename": "model.py", "line": 12}]},
        {"size": 300 * 2**20, "state": "active_allocated", "frames": []},
        {"size": 300 * 2**20, "state": "inactive"}]}]
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda: segments)
    monkeypatch.setattr(monitor_mod, "_largest_cuda_tensors", lambda device: [
        {"mb": 400.0, "shape": (1024, 102400), "dtype": "torch.float32", "is_param": False, "grad": False}])

    class AllocationFails(Callback):
        def before_backward(self):
            if self.iter == 2:
                observer = next(c[1] for c in fake_cuda_monitor.calls if c[0] == "observe")
                observer(0, 512 * 2**20, 1024 * 2**20, 2**20)  # what PyTorch calls before raising
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB")

    monitor = SystemMonitor()
    learn = make_learner([monitor])
    with pytest.warns(ResourceWarning, match="held by tensors") as warned, \
            pytest.raises(torch.cuda.OutOfMemoryError):
        learn.fit(1, 1e-2, cbs=AllocationFails())
    report = monitor.oom_report
    assert report["requested_mb"] == 512 and report["allocated_mb"] == 700 and report["cached_free_mb"] == 300
    assert report["alloc_retries"] == 3 and report["device_total_mb"] == 1024
    assert [b["mb"] for b in report["largest_blocks"]] == [400, 300]
    assert report["largest_blocks"][0]["where"] == "model.py:12"
    text = str(warned[0].message)
    assert "allocating 512.0 MB" in text and "700.0 MB held by tensors" in text and "from model.py:12" in text
    assert "400.0 MB torch.float32 [1024, 102400]" in text and "expandable_segments" in text
    oom = telemetry_of(learn).records("system", "oom")
    assert len(oom) == 1 and oom[0]["text"] == report["text"]
    # The exception ended the fit through `after_cancel_fit` (effilab fires it on any exception): the
    # monitor stopped watching then; the next fit watches again and ends cleanly.
    from effilab.system.monitor import _ACTIVE
    assert id(monitor) not in _ACTIVE and monitor._run is None
    learn.fit(1, 1e-2)
    assert id(monitor) not in _ACTIVE and len(telemetry_of(learn).records("system", "epoch")) == 1


def test_oom_report_without_details():
    from effilab.system.monitor import oom_report

    report = oom_report({"allocated_bytes.all.current": 2**20, "reserved_bytes.all.current": 2**20})
    assert report["largest_blocks"] == [] and report["largest_tensors"] == []
    assert report["text"].startswith("CUDA out of memory: 1.0 MB held by tensors")
    assert "expandable" not in report["text"]


@pytest.mark.parametrize("kwargs", [{"every_s": True}, {"every_s": "1"}, {"every_s": -1.0}, {"peak_flops": 0},
                                    {"peak_flops": float("nan")}, {"peak_flops": True}, {"count_flops": 1},
                                    {"memory_snapshot": 3}, {"snapshot_steps": 0}, {"snapshot_steps": 2.0},
                                    {"oom": "yes"}])
def test_monitor_refuses_bad_input(kwargs):
    with pytest.raises(TypeError):
        SystemMonitor(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_memory_snapshot_and_mfu_on_a_real_gpu(tmp_path):
    path = tmp_path / "mem.pickle"
    learn = make_learner([SystemMonitor(every_s=0.0, memory_snapshot=path, snapshot_steps=3)])
    learn.dls.to("cuda")
    learn.model.cuda()
    learn.fit(1, 1e-2)
    tel = telemetry_of(learn)
    assert path.stat().st_size > 1000 and tel.meta("system")["memory_snapshot"] == str(path)
    assert tel.meta("system")["peak_source"].startswith("datasheet") or tel.meta("system")["peak_flops"] is None
    assert tel.records("system", "epoch")[0]["flops_per_sample"] > 0
