"""SystemMonitor: throughput, data-loader stalls and memory of a fastai fit, for the live dashboard."""

from __future__ import annotations

import time
from types import SimpleNamespace

from fastai.torch_core import find_bs

from ..callback import EffilabCallback
from ..core.probe import MemoryProbe, ThroughputMeter
from ..registry import register

__all__ = ["SystemMonitor"]


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
    stay within a step of each other anyway.

    **Overhead.** Two clock reads and a batch-size lookup per training batch, about 10-20 us on a busy
    2-core CPU; one psutil (~25 us), allocator and NVML read every `every_s`. Validation batches are not
    timed. CUDA's peak-memory statistic is reset at each epoch (process-wide).

    **Use.** `Learner(..., cbs=SystemMonitor())`; inactive during `lr_find`.

    **Telemetry** (source `"system"`): meta `device`, `has_gpu`, `gpu_name`, `nvml`, `total_memory_mb`
    (GPU memory on CUDA, host RAM otherwise), `note`. Stream `"step"`: `time_s` (since the fit began),
    `iter` (the step just taken), `samples_per_s`, `data_wait_frac`, `rss_mb`, and on CUDA
    `cuda_allocated_mb`, `cuda_reserved_mb`, `cuda_peak_mb` (since the epoch began), `gpu_util` (0-1,
    NVML). Stream `"epoch"`: `epoch`, `samples`, `samples_total`, `full_samples_total` (totals over the
    Learner's fits), `time_s`, `data_wait_frac`, `peak_rss_mb`, `cuda_peak_mb` (CUDA).
    """

    # Late in each event: the waiting window then starts after every callback's after_batch (fastai's
    # Recorder copies the loss to the host there) and ends at this before_batch.
    order, run_valid = 90, False

    def __init__(self, every_s: float = 0.5):
        self.every_s = every_s

    # No run outside a fit (a class default survives unpickling). Per-fit state lives in a plain namespace:
    # setting a Callback attribute costs a Learner lookup (~8 us), too much per step.
    _run: SimpleNamespace | None = None

    def __getstate__(self):  # a pickle taken mid-fit (an export from a callback) leaves the run behind
        return {k: v for k, v in self.__dict__.items() if k != "_run"}

    def _start_fit(self):
        param = next(self.learn.model.parameters(), None)
        device = param.device if param is not None else getattr(self.learn.dls, "device", None)
        probe = MemoryProbe(device)
        self.telemetry.set_meta("system", **probe.info())
        t0 = time.perf_counter()
        self._run = SimpleNamespace(probe=probe, meter=ThroughputMeter(), t0=t0, last=t0, in_epoch=False)

    def before_train(self):
        if hasattr(self.learn, "lr_finder"):
            return
        if self._run is None:
            self._start_fit()
        run = self._run
        run.probe.reset_peak()
        run.meter.reset()
        run.meter.resume()
        run.in_epoch = True

    def before_batch(self):
        run = self._run
        if run is not None and run.in_epoch:
            run.meter.batch_start()

    def after_batch(self):
        run = self._run
        if run is None or not run.in_epoch:
            return
        now = run.meter.batch_end(find_bs(self.learn.xb))
        if now - run.last >= self.every_s:
            run.last = now
            st = run.meter.interval()
            self.telemetry.record("system", "step", time_s=now - run.t0, iter=self.learn.train_iter - 1,
                                  samples_per_s=st["samples_per_s"], data_wait_frac=st["data_wait_frac"],
                                  **run.probe.read())

    def after_train(self):
        if self._run is not None and self._run.in_epoch:
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
        if "cuda_peak_mb" in mem:
            rec["cuda_peak_mb"] = mem["cuda_peak_mb"]
        self.telemetry.record("system", "epoch", **rec)

    def after_fit(self):
        self._run = None  # a psutil process and NVML handles: nothing of them is kept with the Learner


register("system_monitor", SystemMonitor, "system", stateful=False)
