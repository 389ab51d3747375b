"""How training uses the machine, measured from the host without stalling the device.

Plain PyTorch + psutil. `MemoryProbe` reads process memory (RSS), CUDA allocator statistics and, when
`nvidia-ml-py` is installed, GPU utilisation; `ThroughputMeter` times batches with the host clock only;
`HostCopy` brings a device scalar to the host without waiting for it. None of them synchronises with
the device on the per-step path.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import psutil
import torch

__all__ = ["HostCopy", "MemoryProbe", "ThroughputMeter"]

_MB = 2.0**20


def _nvml_handle(device: torch.device):
    """An NVML handle for a CUDA device, or None (no `nvidia-ml-py`, no driver, no such device)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        index = torch.cuda.current_device() if device.index is None else device.index
        # CUDA and NVML may number devices differently (CUDA_VISIBLE_DEVICES): match by UUID when possible.
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        if uuid is not None:
            try:
                return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
            except Exception:
                pass
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:
        return None


class MemoryProbe:
    """Memory of the training process and, on CUDA, of the device; all reads are host-side.

    `read()` returns `rss_mb` and, on CUDA, `cuda_allocated_mb`, `cuda_reserved_mb`, `cuda_peak_mb`
    (PyTorch's caching allocator: `torch.cuda.memory_stats`, no device sync) and `gpu_util` (fraction of
    the last NVML sample period a kernel ran; only with `nvidia-ml-py`). Peaks run from the last
    `reset_peak()`; `peak_rss_mb` is the largest RSS seen by `read()`.
    """

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device if device is not None else "cpu")
        self.is_cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self._process = psutil.Process()
        self._nvml = _nvml_handle(self.device) if self.is_cuda else None
        self.peak_rss_mb = 0.0

    @property
    def nvml(self) -> bool:
        return self._nvml is not None

    def rss_mb(self) -> float:
        rss = self._process.memory_info().rss / _MB
        self.peak_rss_mb = max(self.peak_rss_mb, rss)
        return rss

    def cuda_mb(self) -> dict[str, float]:
        if not self.is_cuda:
            return {}
        stats = torch.cuda.memory_stats(self.device)
        return {"cuda_allocated_mb": stats.get("allocated_bytes.all.current", 0) / _MB,
                "cuda_reserved_mb": stats.get("reserved_bytes.all.current", 0) / _MB,
                "cuda_peak_mb": stats.get("allocated_bytes.all.peak", 0) / _MB}

    def gpu_util(self) -> float | None:
        if self._nvml is None:
            return None
        try:
            import pynvml

            return pynvml.nvmlDeviceGetUtilizationRates(self._nvml).gpu / 100.0
        except Exception:
            return None

    def read(self) -> dict[str, float]:
        values = {"rss_mb": self.rss_mb(), **self.cuda_mb()}
        util = self.gpu_util()
        if util is not None:
            values["gpu_util"] = util
        return values

    def reset_peak(self) -> None:
        self.peak_rss_mb = self._process.memory_info().rss / _MB
        if self.is_cuda:
            # Process-wide for this device: another user of max_memory_allocated() sees the reset too.
            torch.cuda.reset_peak_memory_stats(self.device)

    def info(self) -> dict:
        """What the probe measures, for a dashboard's legend (`total_memory_mb`: the GPU's memory on
        CUDA, the host's RAM otherwise, i.e. the ceiling of what `read()` shows)."""
        if self.is_cuda:
            props = torch.cuda.get_device_properties(self.device)
            note = "" if self.nvml else "GPU utilisation unavailable: install nvidia-ml-py"
            return {"device": str(self.device), "has_gpu": True, "gpu_name": props.name, "nvml": self.nvml,
                    "total_memory_mb": props.total_memory / _MB, "note": note}
        what = "no GPU" if self.device.type == "cpu" else f"no CUDA memory statistics on {self.device.type}"
        return {"device": str(self.device), "has_gpu": False, "gpu_name": None, "nvml": False,
                "total_memory_mb": psutil.virtual_memory().total / _MB,
                "note": f"{what}: showing process memory (RSS)"}


class ThroughputMeter:
    """Samples per second and the fraction of time spent waiting for the data loader, host clock only.

    Call `resume()` when training batches start flowing (e.g. at the start of an epoch's training),
    `batch_start()` / `batch_end(n)` around each batch, `pause()` when they stop (validation is not
    counted). The time from `resume()` or the last `batch_end` to the next `batch_start` is time spent
    waiting for the loader. `interval()` returns the statistics since its previous call, `total()` since
    `reset()`.

    >>> t = iter([0.0, 0.0, 0.1, 1.0, 1.0])
    >>> m = ThroughputMeter(clock=lambda: next(t))
    >>> m.resume(); m.batch_start(); m.batch_end(32); m.interval()["samples_per_s"]
    32.0
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.reset()

    def reset(self) -> None:
        self.samples, self.wait_s, self._active_s = 0, 0.0, 0.0
        self._since: float | None = None  # clock at resume() while running
        self._last_end: float | None = None  # clock at the last batch_end (or resume) while running
        self._mark = (0, 0.0, 0.0)

    @property
    def running(self) -> bool:
        return self._since is not None

    def resume(self) -> None:
        if self._since is None:
            self._since = self._last_end = self.clock()

    def pause(self) -> None:
        if self._since is not None:
            self._active_s += self.clock() - self._since
            self._since = self._last_end = None

    def batch_start(self) -> float:
        now = self.clock()
        if self._last_end is not None:
            self.wait_s += now - self._last_end
        self._last_end = None
        return now

    def batch_end(self, n_samples: int) -> float:
        now = self._last_end = self.clock()
        self.samples += n_samples
        return now

    def _totals(self) -> tuple[int, float, float]:
        active = self._active_s
        if self._since is not None:
            now = self.clock()
            active += now - self._since
            self._active_s, self._since = active, now  # fold it in so that one clock read serves both
        return self.samples, self.wait_s, active

    @staticmethod
    def _stats(samples: int, wait_s: float, active_s: float) -> dict[str, float]:
        return {"samples": samples, "elapsed_s": active_s, "wait_s": wait_s,
                "samples_per_s": samples / active_s if active_s > 0 else 0.0,
                "data_wait_frac": min(1.0, wait_s / active_s) if active_s > 0 else 0.0}

    def interval(self) -> dict[str, float]:
        totals = self._totals()
        stats = self._stats(*(t - m for t, m in zip(totals, self._mark)))
        self._mark = totals
        return stats

    def total(self) -> dict[str, float]:
        return self._stats(*self._totals())


class HostCopy:
    """A scalar brought to the host without waiting for the device.

    `put(x)` starts the copy (CUDA: `copy_(non_blocking=True)` into a pinned buffer, plus an event);
    `get()` returns it as a float, waiting only if the copy has not landed yet, which it has when `get`
    comes a few steps after `put`. CPU tensors and Python numbers are read at `put` (no device to wait for).
    """

    def __init__(self):
        self._buf: torch.Tensor | None = None
        self._event = None
        self._value: float | None = None

    @property
    def deferred(self) -> bool:
        return self._event is not None

    def put(self, x) -> None:
        if isinstance(x, torch.Tensor) and x.is_cuda:
            if self._buf is None:
                self._buf = torch.empty((), dtype=torch.float32, pin_memory=True)
            self._buf.copy_(x.detach().reshape(()), non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            self._value = None
        else:
            self._event = None
            self._value = None if x is None else float(x)  # sync-ok: a host tensor or number

    def get(self) -> float | None:
        if self._event is not None:
            self._event.synchronize()  # sync-ok: issued at the previous record point, done by now
            self._value, self._event = float(self._buf), None  # sync-ok: pinned host buffer
        return self._value
