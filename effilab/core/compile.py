"""What `torch.compile` costs and when it pays: step timing without per-step syncs, the break-even step,
and plain-language reasons for recompilations. Plain PyTorch only."""

from __future__ import annotations

import math
import re
import statistics
import time

import torch

__all__ = ["StepTimer", "break_even_step", "compile_events", "explain_recompile", "new_guard_failures"]


def break_even_step(compile_s: float, eager_step_s: float, compiled_step_s: float) -> int | None:
    """The first step n at which the compiled run's cumulative time (compile + n compiled steps) is at most
    the eager run's (n eager steps); None when compiled steps are not faster (it never pays)."""
    saving = eager_step_s - compiled_step_s
    if saving <= 0:
        return None
    return max(1, math.ceil(compile_s / saving))


_GRAD_MODE = "gradients were switched off (validation runs under torch.no_grad): a graph of its own"
_EXPLAIN = (
    (r"size mismatch at index 0\b", "the batch size changed (a partial last batch, a batch-size schedule)"),
    (r"size mismatch at index [1-9]", "an input's shape changed (progressive resizing, sequence-length warmup)"),
    (r"requires_grad mismatch", "a parameter's requires_grad changed (freezing)"),
    (r"dtype mismatch", "an input's dtype changed (autocast switched on or off?)"),
    (r"stride mismatch", "an input's memory layout changed (channels-last?)"),
    (r"grad_mode", _GRAD_MODE),
    (r"training", "the model switched between train and eval mode"),
    (r"___check_obj_id|id\(|ID_MATCH", "a different object (model, module or parameter) was passed"),
    (r"shape|size", "a tensor's shape changed"),
)


def explain_recompile(reasons: str | list[str] | None) -> str:
    """A short plain-language cause for dynamo's guard-failure message(s). Dynamo tries every cached graph
    and reports each one's failure; a graph that differs only in grad mode (the validation graph) explains
    nothing about a training recompile, so another cause is preferred when there is one."""
    if isinstance(reasons, str):
        reasons = [reasons]
    whys = [_explain_one(r) for r in reasons or [] if r]
    if not whys:
        return "first compilation"
    return next((w for w in whys if w != _GRAD_MODE), whys[0])


def _explain_one(reason: str) -> str:
    for pattern, text in _EXPLAIN:
        if re.search(pattern, reason):
            return text
    return "a guard failed: " + reason.splitlines()[0][:160]


def new_guard_failures(seen: dict) -> list[str]:
    """Dynamo's guard-failure messages recorded since the last call with the same `seen` dict."""
    from torch._dynamo.utils import guard_failures

    new = []
    for code, reasons in list(guard_failures.items()):
        new += reasons[seen.get(code, 0):]
        seen[code] = len(reasons)
    return new


def compile_events(since_us: int) -> list[dict]:
    """The compilations dynamo recorded since `since_us` (microseconds since the epoch), oldest first:
    compile id, seconds, the guard that failed and its explanation. Dynamo keeps the latest 64 only."""
    from torch._dynamo.utils import get_compilation_metrics

    events = []
    for m in get_compilation_metrics():
        start = getattr(m, "start_time_us", None) or 0
        if start < since_us:
            continue
        reason = getattr(m, "recompile_reason", None)
        events.append({"compile_id": str(getattr(m, "compile_id", "")),
                       "seconds": getattr(m, "entire_frame_compile_time_s", None),
                       "reason": reason, "why": explain_recompile(reason),
                       "failed": getattr(m, "fail_reason", None)})
    return events


class StepTimer:
    """Wall-clock per step. On CUDA through events read once at `collect()` (no sync per step); elsewhere
    `time.perf_counter` (CPU work is synchronous)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._pending: list = []
        self._start = None

    def start(self):
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self, tag=None):
        if self._start is None:
            return
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((self._start, end, tag))
        else:
            self._pending.append((time.perf_counter() - self._start, None, tag))
        self._start = None

    def collect(self) -> list[tuple[float, object]]:
        """(seconds, tag) of every step since the last call."""
        if self.cuda and self._pending:
            self._pending[-1][1].synchronize()  # sync-ok: once per epoch
        out = [(s.elapsed_time(e) / 1000 if self.cuda else s, tag) for s, e, tag in self._pending]
        self._pending = []
        return out


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
