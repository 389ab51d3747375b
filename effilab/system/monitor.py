"""SystemMonitor: throughput, data-loader stalls and memory of a fastai fit, for the live dashboard."""

from __future__ import annotations

import functools
import gc
import math
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
from fastai.torch_core import find_bs, get_model

from ..callback import EffilabCallback
from ..core.budget import StepFlops
from ..core.probe import MemoryProbe, ThroughputMeter
from ..registry import register

__all__ = ["DATASHEET_TFLOPS", "SystemMonitor", "datasheet_peak", "measured_cpu_peak", "oom_report", "peak_flops"]

_MB = 2.0**20

# Dense tensor-core (or FP32 unit) peaks from the vendors' datasheets, in TFLOP/s, per GPU: the sparse
# figures the datasheets headline are halved. Matched against the CUDA device name in this order (the
# first pattern found in the lower-cased name wins, so "a100" comes before "a10", "l40s" before "l4").
# fp16 and bf16 are with FP32 accumulation (what PyTorch uses); on GeForce cards that is half the FP16-
# accumulate figure. tf32 is what FP32 matmuls run at when `torch.backends.cuda.matmul.allow_tf32` is on.
DATASHEET_TFLOPS: dict[str, dict[str, float]] = {
    "h100 nvl": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "h100 pcie": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "h100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM
    "h200 nvl": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "h200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM
    "b200": {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0, "fp32": 75.0},
    "a100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "a10": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "l40s": {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6},
    "l4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "t4": {"fp16": 65.0, "fp32": 8.1},
    "v100": {"fp16": 125.0, "fp32": 15.7},
    "rtx 4090": {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6},
    "rtx 3090": {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6},
}

_DTYPE_KEYS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def datasheet_peak(gpu_name: str, dtype: torch.dtype = torch.float32, tf32: bool | None = None) -> float | None:
    """The GPU's dense peak FLOP/s for matmuls in `dtype` (FP32 as TF32 when `tf32`, by default when
    PyTorch allows it), or None for a GPU or precision the table lacks."""
    name = gpu_name.lower()
    key = _DTYPE_KEYS.get(dtype)
    if key == "fp32":
        if tf32 is None:
            tf32 = torch.backends.cuda.matmul.allow_tf32
        key = "tf32" if tf32 else "fp32"
    for pattern, peaks in DATASHEET_TFLOPS.items():
        if pattern in name:
            value = peaks.get(key) if key else None
            if value is None and key == "tf32":
                value = peaks.get("fp32")  # a GPU without TF32 runs FP32 matmuls at its FP32 rate
            return None if value is None else value * 1e12
    return None


@functools.cache
def _measured_cpu_peak(dtype: torch.dtype, threads: int, size: int, seconds: float) -> float:
    a = torch.randn(size, size, generator=torch.Generator().manual_seed(0)).to(dtype)
    b = a.clone()
    a @ b  # warm-up: thread pool and kernels
    best, spent = 0.0, 0.0
    while spent < seconds:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        dt = time.perf_counter() - t0
        spent += dt
        best = max(best, 4 * 2 * size**3 / dt)
    return best


def measured_cpu_peak(dtype: torch.dtype = torch.float32, size: int = 512, seconds: float = 0.2) -> float:
    """FLOP/s of a square `size` matmul in `dtype` on this CPU with torch's current thread count (the best
    of repeats over about `seconds`); measured once per process and setting, then cached."""
    return _measured_cpu_peak(dtype, torch.get_num_threads(), size, seconds)


def peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[float | None, str]:
    """The device's peak FLOP/s for `dtype` and where it comes from: a datasheet for known GPUs, a
    measured matmul on the CPU, None (with the reason) otherwise."""
    device = torch.device(device)
    key = _DTYPE_KEYS.get(dtype, str(dtype))
    if device.type == "cuda":
        name = torch.cuda.get_device_properties(device).name
        peak = datasheet_peak(name, dtype)
        if peak is None:
            return None, f"{name} ({key}) is not in the datasheet table: pass peak_flops="
        tf32 = " as TF32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else ""
        return peak, f"datasheet: {name}, {key}{tf32} dense"
    if device.type == "cpu":
        n = torch.get_num_threads()
        return measured_cpu_peak(dtype), f"measured: {key} 512x512 matmul, {n} thread{'s' * (n > 1)}"
    return None, f"no peak known for {device.type}: pass peak_flops="


def _largest_cuda_tensors(device: torch.device, n: int = 10) -> list[dict]:
    """The largest live CUDA tensors that Python can still reach (gc), with shape and dtype."""
    found, seen = [], set()
    for obj in gc.get_objects():
        try:
            if not (isinstance(obj, torch.Tensor) and obj.is_cuda) or obj.device.index != device.index:
                continue
            storage = obj.untyped_storage()
            if storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            found.append({"mb": storage.nbytes() / _MB, "shape": tuple(obj.shape), "dtype": str(obj.dtype),
                          "is_param": isinstance(obj, torch.nn.Parameter), "grad": obj.grad is not None
                          if isinstance(obj, torch.nn.Parameter) else False})
        except Exception:  # objects half torn down, or tensor subclasses without storage
            continue
    return sorted(found, key=lambda t: -t["mb"])[:n]


def oom_report(stats: dict, segments: list[dict] | None = None, tensors: list[dict] | None = None,
               requested: int | None = None, device_total: int | None = None, device_free: int | None = None) -> dict:
    """What held the memory when an allocation failed, from `torch.cuda.memory_stats` (`stats`), the
    allocator's segments (`torch.cuda.memory_snapshot()`) and the largest live tensors."""
    def get(key):
        return stats.get(key, 0) / _MB

    allocated, reserved = get("allocated_bytes.all.current"), get("reserved_bytes.all.current")
    report = {"requested_mb": None if requested is None else requested / _MB,
              "allocated_mb": allocated, "reserved_mb": reserved, "peak_allocated_mb": get("allocated_bytes.all.peak"),
              "cached_free_mb": reserved - allocated, "alloc_retries": stats.get("num_alloc_retries", 0),
              "device_total_mb": None if device_total is None else device_total / _MB,
              "device_free_mb": None if device_free is None else device_free / _MB}
    blocks = []
    for seg in segments or []:
        for b in seg.get("blocks", []):
            if b.get("state") == "active_allocated":
                frames = (b.get("frames") or [{}])
                where = next((f"{f.get('filename')}:{f.get('line')}" for f in frames
                              if "torch/" not in str(f.get("filename", ""))), None)
                blocks.append({"mb": b.get("size", 0) / _MB, "stream": seg.get("stream"), "where": where})
    report["largest_blocks"] = sorted(blocks, key=lambda b: -b["mb"])[:10]
    report["largest_tensors"] = list(tensors or [])
    params = sum(t["mb"] for t in report["largest_tensors"] if t.get("is_param"))
    lines = [f"CUDA out of memory{'' if requested is None else f' allocating {requested / _MB:.1f} MB'}: "
             f"{allocated:.1f} MB held by tensors, {reserved:.1f} MB reserved by PyTorch's allocator "
             f"({reserved - allocated:.1f} MB cached but free, possibly fragmented)"
             + ("" if device_total is None else f", device total {device_total / _MB:.0f} MB")
             + ("" if device_free is None else f", free {device_free / _MB:.0f} MB") + "."]
    if report["largest_tensors"]:
        lines.append("Largest live tensors: " + "; ".join(
            f"{t['mb']:.1f} MB {t['dtype']} {list(t['shape'])}{' (parameter)' if t.get('is_param') else ''}"
            for t in report["largest_tensors"][:5]) + f" (parameters among them: {params:.1f} MB).")
    if report["largest_blocks"]:
        lines.append("Largest allocated blocks: " + "; ".join(
            f"{b['mb']:.1f} MB" + (f" from {b['where']}" if b["where"] else "") for b in report["largest_blocks"][:5]))
    if reserved - allocated > 0.25 * max(reserved, 1e-9):
        lines.append("Much cached memory is free but unusable: try "
                     "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True.")
    lines.append("To fit: a smaller batch, mixed precision (bf16), activation checkpointing, or gradient "
                 "accumulation; SystemMonitor(memory_snapshot='mem.pickle') records where each block came from "
                 "(open it at https://pytorch.org/memory_viz).")
    report["text"] = "\n".join(lines)
    return report


def full_epoch_samples(dl) -> int | None:
    """What a full pass of the training loader forwards (its last partial batch dropped or not)."""
    n, bs = getattr(dl, "n", None), getattr(dl, "bs", None)
    if n is None or bs is None:
        return None
    return len(dl) * bs if getattr(dl, "drop_last", False) else n


class SystemMonitor(EffilabCallback):
    """How the fit uses the machine: samples/s, time waiting for data, process and GPU memory.

    **What it measures.** Every `every_s` seconds (host clock): training samples per second over the
    interval, the fraction of it the loop waited for the data loader (from the end of one batch, or the
    start of training, to the start of the next batch), the process's resident memory (RSS) and, on CUDA,
    PyTorch's allocated / reserved / peak memory and (with `nvidia-ml-py`) GPU utilisation. Per epoch:
    samples forwarded against what the full data would have forwarded, time, waiting fraction, peaks.

    **Why host timing, without syncs.** CUDA kernels run asynchronously: the host queues work and moves
    on, so its clock only shows a device stall once the queue is full and it has to wait. Timing each
    step exactly would need `torch.cuda.synchronize()`, which removes the very overlap being measured.
    Averaged over an interval of many steps the host's rate equals the device's (the queue is bounded);
    a high `data_wait_frac` means the loader is the bottleneck only if the GPU also idles
    (`gpu_util` low). With fastai's Recorder, which copies each step's loss to the CPU, host and device
    stay within a step of each other anyway; with `SyncFreeRecorder` the host runs ahead by up to the
    queue's depth, which averaging over `every_s` absorbs.

    **Overhead.** Two clock reads and a batch-size lookup per training batch, about 10-20 us on a busy
    2-core CPU (the per-batch handlers are called directly, not through fastai's per-event dispatch); one
    psutil (~25 us), allocator and NVML read every `every_s`. Validation batches are not
    timed. CUDA's peak-memory statistic is reset at each epoch (process-wide).

    **Model FLOPs utilisation.** At the first training step of each epoch the step's forward and backward
    are counted by PyTorch's `FlopCounterMode` on the meta device (`effilab.core.budget.StepFlops`: shapes
    only, no memory, no host read, counted again only when the batch shape or the trainable parameters
    change). Not in the step itself: a backward run under a dispatch mode turns the gradients of fastai's
    `TensorBase` inputs into `TensorBase`, and every optimiser op after that pays its `__torch_function__`
    (+30-50% on a 1-ms step). The FLOPs per sample times the samples per second, over the device's peak, is the MFU.
    The peak (`peak_flops=` overrides it) is the dense datasheet figure for known GPUs (`DATASHEET_TFLOPS`,
    in the precision the fit computes in: bf16/fp16 under fastai's `MixedPrecision`, TF32 or FP32
    otherwise) and, on a CPU, a measured 512x512 matmul (once per process). Extra passes a technique
    makes (SAM's second step, recomputation) are work the MFU does not count: they lower it.

    **Memory on CUDA.** `memory_snapshot="mem.pickle"` records the allocator's history (with the Python
    stack of every allocation) for the first `snapshot_steps` training steps and saves it for PyTorch's
    memory viewer (https://pytorch.org/memory_viz, which runs in the browser and uploads nothing).
    When an allocation fails during the fit, `oom` (on by default) reports what held the memory before
    the `OutOfMemoryError` propagates: allocator statistics, the largest allocated blocks (with where they
    were allocated, when a snapshot is being recorded), the largest live tensors, and what to try; the
    report is printed, kept in `monitor.oom_report` and written to telemetry.

    **Use.** `Learner(..., cbs=SystemMonitor())`; inactive during `lr_find`.

    **Telemetry** (source `"system"`): meta `device`, `has_gpu`, `gpu_name`, `nvml`, `total_memory_mb`
    (GPU memory on CUDA, host RAM otherwise), `note`. Stream `"step"`: `time_s` (since the fit began),
    `iter` (the step just taken), `samples_per_s`, `data_wait_frac`, `rss_mb`, `flops_per_s` and `mfu` (once
    measured; `mfu` needs a peak), and on CUDA
    `cuda_allocated_mb`, `cuda_reserved_mb`, `cuda_peak_mb` (since the epoch began), `gpu_util` (0-1,
    NVML). Stream `"epoch"`: `epoch`, `samples`, `samples_total`, `full_samples_total` (totals over the
    Learner's fits), `time_s`, `data_wait_frac`, `peak_rss_mb`, `flops_per_sample`, `mfu` (once measured),
    `cuda_peak_mb` (CUDA).
    """

    # Late in each event: the waiting window then starts after every callback's after_batch (fastai's
    # Recorder copies the loss to the host there) and ends at this before_batch.
    order, run_valid = 90, False

    def __init__(self, every_s: float = 0.5, peak_flops: float | None = None, count_flops: bool = True,
                 memory_snapshot: str | Path | None = None, snapshot_steps: int = 10, oom: bool = True):
        if isinstance(every_s, bool) or not isinstance(every_s, (int, float)) or not every_s >= 0:
            raise TypeError(f"every_s must be a number of seconds >= 0, got {every_s!r}")
        if peak_flops is not None and (isinstance(peak_flops, bool) or not isinstance(peak_flops, (int, float))
                                       or not (peak_flops > 0 and math.isfinite(peak_flops))):
            raise TypeError(f"peak_flops must be None or a positive number of FLOP/s, got {peak_flops!r}")
        if not isinstance(count_flops, bool) or not isinstance(oom, bool):
            raise TypeError(f"count_flops and oom must be True or False, got {count_flops!r} and {oom!r}")
        if memory_snapshot is not None and not isinstance(memory_snapshot, (str, Path)):
            raise TypeError(f"memory_snapshot must be None or a file path, got {memory_snapshot!r}")
        if isinstance(snapshot_steps, bool) or not isinstance(snapshot_steps, int) or snapshot_steps < 1:
            raise TypeError(f"snapshot_steps must be a positive int, got {snapshot_steps!r}")
        self.every_s, self.peak_flops, self.count_flops, self.oom = every_s, peak_flops, count_flops, oom
        self.memory_snapshot, self.snapshot_steps = memory_snapshot, snapshot_steps
        self.oom_report: dict | None = None

    # No run outside a fit (a class default survives unpickling). Per-fit state lives in a plain namespace:
    # setting a Callback attribute costs a Learner lookup (~8 us), too much per step.
    _run: SimpleNamespace | None = None
    _direct = frozenset(("before_batch", "after_batch"))  # they check `run.training` themselves

    def __getstate__(self):  # a pickle taken mid-fit (an export from a callback) leaves the run behind
        return {k: v for k, v in self.__dict__.items() if k != "_run"}

    def __setattr__(self, name, value):
        # fastai removes a callback with `cb.learn = None`, also after an exception ends a fit with no event:
        # a memory recording it left running stops then.
        if name == "learn" and value is None and self.__dict__.get("_run") is not None:
            self._end()
        super().__setattr__(name, value)

    def before_fit(self):
        self._end()  # the last fit ended in an exception (no event): close what it left open

    def _start_fit(self):
        param = next(self.learn.model.parameters(), None)
        device = param.device if param is not None else getattr(self.learn.dls, "device", None)
        probe = MemoryProbe(device)
        device = probe.device
        peak, source = (self.peak_flops, "given") if self.peak_flops else peak_flops(device, self._dtype(device))
        self.telemetry.set_meta("system", **probe.info(), peak_flops=peak, peak_source=source)
        t0 = time.perf_counter()
        self._run = SimpleNamespace(probe=probe, meter=ThroughputMeter(), t0=t0, last=t0, in_epoch=False, peak=peak,
                                    step_flops=StepFlops(), flops_per_sample=None, count_next=self.count_flops,
                                    snapshot=None, steps=0, training=False)
        if probe.is_cuda and self.memory_snapshot is not None:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
            self._run.snapshot = Path(self.memory_snapshot)
        if probe.is_cuda and self.oom:
            _watch_oom(self)

    def _dtype(self, device: torch.device) -> torch.dtype:
        """The precision the fit's matmuls run in: fastai's MixedPrecision autocasts on CUDA only."""
        mp = self.learn.__dict__.get("mixed_precision")
        mode = str(getattr(mp, "amp_mode", "")).lower()
        if mp is not None and device.type == "cuda":
            return torch.bfloat16 if "bf16" in mode else torch.float16
        p = next(self.learn.model.parameters(), None)
        return p.dtype if p is not None and p.is_floating_point() else torch.float32

    def before_train(self):
        if hasattr(self.learn, "lr_finder"):
            return
        if self._run is None:
            self._start_fit()
        run = self._run
        run.probe.reset_peak()
        run.meter.reset()
        run.meter.resume()
        run.in_epoch = run.training = True
        run.count_next = self.count_flops  # the epoch's first step: sizes may change between epochs

    def before_batch(self):
        run = self._run
        if run is not None and run.training and run.in_epoch:
            run.meter.batch_start()
            if run.count_next:
                run.count_next = False
                flops = run.step_flops(get_model(self.learn.model), self.learn.xb)
                if flops is not None:
                    run.flops_per_sample = flops / max(1, find_bs(self.learn.xb))

    def _flops(self, samples_per_s: float) -> dict:
        run = self._run
        if run.flops_per_sample is None:
            return {}
        flops = run.flops_per_sample * samples_per_s
        return {"flops_per_s": flops, "mfu": flops / run.peak if run.peak else None}

    def after_batch(self):
        run = self._run
        if run is None or not (run.training and run.in_epoch):
            return
        now = run.meter.batch_end(find_bs(self.learn.xb))
        if run.snapshot is not None:
            run.steps += 1
            if run.steps >= self.snapshot_steps:
                self._dump_snapshot()
        if now - run.last >= self.every_s:
            run.last = now
            st = run.meter.interval()
            self.telemetry.record("system", "step", time_s=now - run.t0, iter=self.learn.train_iter - 1,
                                  samples_per_s=st["samples_per_s"], data_wait_frac=st["data_wait_frac"],
                                  **self._flops(st["samples_per_s"]), **run.probe.read())

    def _dump_snapshot(self):
        run = self._run
        path, run.snapshot = run.snapshot, None
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(path))
        torch.cuda.memory._record_memory_history(enabled=None)
        self.telemetry.set_meta("system", memory_snapshot=str(path))

    def after_train(self):
        if self._run is not None:
            self._run.training = False
            if self._run.in_epoch:
                self._run.meter.pause()

    def after_epoch(self):
        run = self._run
        if run is None or not run.in_epoch:
            return  # a skipped epoch (resume) or `validate()`, which fires epoch events too
        run.in_epoch = False
        stats, mem = run.meter.total(), run.probe.read()
        prev = self.telemetry.latest("system", "epoch") or {}
        full = full_epoch_samples(self.learn.dls.train)
        rec = {"epoch": self.learn.epoch, "samples": stats["samples"],
               "samples_total": prev.get("samples_total", 0) + stats["samples"],
               "full_samples_total": None if full is None else (prev.get("full_samples_total") or 0) + full,
               "time_s": time.perf_counter() - run.t0, "data_wait_frac": stats["data_wait_frac"],
               "peak_rss_mb": run.probe.peak_rss_mb}
        if run.flops_per_sample is not None:
            rec.update(flops_per_sample=run.flops_per_sample, mfu=self._flops(stats["samples_per_s"])["mfu"])
        if "cuda_peak_mb" in mem:
            rec["cuda_peak_mb"] = mem["cuda_peak_mb"]
        self.telemetry.record("system", "epoch", **rec)

    def after_fit(self):
        self._end()

    def after_cancel_fit(self):
        self._end()

    def _end(self):
        run = self._run
        if run is None:
            return
        if run.snapshot is not None:  # a fit shorter than snapshot_steps
            self._dump_snapshot()
        _ACTIVE.pop(id(self), None)
        self._run = None  # a psutil process and NVML handles: nothing of them is kept with the Learner

    def _on_oom(self, device, requested, device_total, device_free):
        run = self._run
        if run is None:
            return
        dev = run.probe.device
        try:
            segments = torch.cuda.memory_snapshot()
        except Exception:
            segments = None
        report = oom_report(torch.cuda.memory_stats(dev), segments, _largest_cuda_tensors(dev), requested,
                            device_total, device_free)
        self.oom_report = report
        self.telemetry.record("system", "oom", **{k: v for k, v in report.items() if not isinstance(v, list)})
        warnings.warn(report["text"], ResourceWarning, stacklevel=1)
        if run.snapshot is not None:  # what was recorded up to the failure
            self._dump_snapshot()


# Monitors of running fits, by id: PyTorch can attach an out-of-memory observer but not remove one, so one
# observer, attached once, calls whichever monitors are running.
_ACTIVE: dict[int, SystemMonitor] = {}
_OBSERVING = False


def _observe_oom(device, alloc, device_alloc, device_free):
    for monitor in list(_ACTIVE.values()):
        try:
            monitor._on_oom(device, alloc, device_alloc, device_free)
        except Exception as e:  # the report must never hide the out-of-memory error itself
            warnings.warn(f"SystemMonitor could not report the out-of-memory error: {e!r}", stacklevel=1)


def _watch_oom(monitor: SystemMonitor) -> None:
    global _OBSERVING
    _ACTIVE[id(monitor)] = monitor
    if not _OBSERVING:
        torch._C._cuda_attach_out_of_memory_observer(_observe_oom)
        _OBSERVING = True


register("system_monitor", SystemMonitor, "system", stateful=False)
