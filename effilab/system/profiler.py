"""The PyTorch profiler as a fastai callback: a Chrome trace of a few chosen training steps."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from ..callback import EffilabCallback
from ..core.distributed import is_distributed, rank
from ..registry import register

__all__ = ["Profiler"]


def _check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class Profiler(EffilabCallback):
    """The PyTorch profiler over a few training steps of the fit, written as a Chrome trace.

    **What it does.** Runs `torch.profiler.profile` from the first training batch with the schedule
    `skip_first` steps, then `wait` steps idle, `warmup` steps traced but discarded (the profiler's own
    start-up cost), and `active` steps recorded (steps = training batches; validation is not counted, but
    an active window that spans an epoch end records its validation too). When the active steps end it
    writes `trace_fit{N}[_rank{R}].json` into `path` (open it in `chrome://tracing` or
    https://ui.perfetto.dev) and puts a table of the most expensive ops in telemetry. The profiler stops on
    any exit of the fit (end, cancel, error); a fit shorter than the schedule writes no trace and says so.

    **Defaults and why.** `skip_first=0, wait=1, warmup=1, active=3`: the first step of a fit carries
    one-off costs (allocator growth, lazy initialisation), warm-up hides the profiler's start-up, three
    steps show the steady state. `profile_memory=True` (allocations per op), `record_shapes=False` and
    `with_stack=False` (both make traces large and slow). CUDA kernels are traced when CUDA is available.

    **What it SAVES: nothing; it costs.** Profiled steps run slower (tens of percent, more with shapes or
    stacks) and on CUDA the profiler synchronises; the other steps run at full speed. Use it to find where
    a step's time goes, not to time a run.

    **Interactions.** One profiler at a time per process (PyTorch's rule). Inactive during `lr_find`.
    Under DDP each rank writes its own trace.

    **Telemetry** (source `"profiler"`), stream `"trace"`: `fit`, `path`, `steps` (the profiled training
    steps of the fit, 1-based), `table` (`key_averages().table(...)`, a string), `top` (the `row_limit` ops
    with the most self time: `name`, `count`, `self_cpu_us`, `cpu_total_us`, and on CUDA `self_device_us`).
    Stream `"missed"`: `fit`, `steps_taken`, `steps_needed` when the fit ended before the active steps did.
    """

    order = -20  # its step count moves after every other callback's after_batch (see after_batch)
    run_valid = False

    def __init__(self, path: str | Path | None = None, skip_first: int = 0, wait: int = 1, warmup: int = 1,
                 active: int = 3, profile_memory: bool = True, record_shapes: bool = False, with_stack: bool = False,
                 row_limit: int = 15):
        if path is not None and not isinstance(path, (str, Path)):
            raise TypeError(f"path must be a folder (str or Path) or None, got {path!r}")
        self.skip_first, self.wait = _check_count("skip_first", skip_first, 0), _check_count("wait", wait, 0)
        self.warmup, self.active = _check_count("warmup", warmup, 0), _check_count("active", active, 1)
        self.row_limit = _check_count("row_limit", row_limit, 1)
        for name, flag in (("profile_memory", profile_memory), ("record_shapes", record_shapes),
                           ("with_stack", with_stack)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        self.path = None if path is None else Path(path)
        self.profile_memory, self.record_shapes, self.with_stack = profile_memory, record_shapes, with_stack
        self.fit_count = 0
        self.traces: list[Path] = []
        self._prof = None
        self._steps = 0

    @property
    def steps_needed(self) -> int:
        return self.skip_first + self.wait + self.warmup + self.active

    def _folder(self) -> Path:
        return self.path if self.path is not None else Path(self.learn.path) / "profiler"

    def _trace_ready(self, prof) -> None:
        folder = self._folder()
        folder.mkdir(parents=True, exist_ok=True)
        suffix = f"_rank{rank()}" if is_distributed() else ""
        file = folder / f"trace_fit{self.fit_count}{suffix}.json"
        prof.export_chrome_trace(str(file))
        self.traces.append(file)
        events = prof.key_averages()
        sort = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:self.row_limit]
        rows = []
        for e in top:
            row = {"name": e.key, "count": e.count, "self_cpu_us": e.self_cpu_time_total,
                   "cpu_total_us": e.cpu_time_total}
            if torch.cuda.is_available():
                row["self_device_us"] = getattr(e, "self_device_time_total", 0)
            rows.append(row)
        first = self.skip_first + self.wait + self.warmup + 1
        self.telemetry.record("profiler", "trace", fit=self.fit_count, path=str(file),
                              steps=list(range(first, min(self._steps, self.steps_needed) + 1)),
                              table=events.table(sort_by=sort, row_limit=self.row_limit), top=rows)

    def before_fit(self):
        self._stop()  # a profiler left running by a fit that an exception ended without any event

    def before_train(self):
        if self._prof is not None or hasattr(self.learn, "lr_finder"):
            return
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self._prof = profile(activities=activities,
                             schedule=schedule(skip_first=self.skip_first, wait=self.wait, warmup=self.warmup,
                                               active=self.active, repeat=1),
                             on_trace_ready=self._trace_ready, profile_memory=self.profile_memory,
                             record_shapes=self.record_shapes, with_stack=self.with_stack)
        self._steps = 0
        self._prof.start()

    def after_batch(self):
        # fastai calls after_batch in callback order; this runs early (order -20), so the rest of this batch's
        # after_batch work falls into the next profiler step. Steps still map one to one onto batches.
        if self._prof is not None and self.training and self._steps < self.steps_needed:
            self._steps += 1
            self._prof.step()

    def after_fit(self):
        self._stop()

    def after_cancel_fit(self):
        self._stop()

    def _stop(self):
        prof, self._prof = self._prof, None
        if prof is None:
            return
        prof.stop()
        if self._steps < self.steps_needed:
            self.telemetry.record("profiler", "missed", fit=self.fit_count, steps_taken=self._steps,
                                  steps_needed=self.steps_needed)
        self.fit_count += 1

    def __getstate__(self):  # a running profiler doesn't pickle (an export taken mid-fit)
        return self.__dict__ | {"_prof": None}


def _for_tests():
    import tempfile

    # One folder for the suite's many fits: each overwrites the last one's small traces.
    return Profiler(path=Path(tempfile.gettempdir()) / "effilab-profiler-tests", wait=1, warmup=1, active=2)


register("profiler", _for_tests, "system")
