"""Telemetry -> plotly: the dashboard's panels as pure functions, shared by the live widget and the static
figure / HTML report.

The figure is one `make_subplots` grid of cells, grouped in panels (`PANELS`); a panel appears only when
its telemetry has something to show. Traces are named `"<cell>: <series>"` (e.g. `"loss: valid"`,
`"scores/infobatch: pruned"`, `"schedule/lr: planned"`) so that tests and browsers can find them.

Only telemetry is read (see the telemetry contract): sources `"fit"`, `"schedule"`, `"system"`, and any
source whose `"epoch"` records carry a score histogram and a threshold (a data-decision source, such as
`"infobatch"`). A Learner fitted several times holds every fit's records; the figures show the latest.
"""

from __future__ import annotations

import copy
import json
import math
import uuid
from dataclasses import dataclass, field
from statistics import median

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs_version
from plotly.subplots import make_subplots

from ..core.telemetry import Telemetry
from .static import KEPT, PRUNED, RESCALED

__all__ = ["PANELS", "PANEL_TITLES", "Cell", "Snapshot", "build_figure", "cells", "data_sources", "epoch_number",
           "figure_bundle", "informative_epoch", "layout_key", "lr_find_figure", "panels", "report_html", "snapshot",
           "status", "status_line", "summary_text", "apply_delta", "figure_delta", "figure_dict"]

PANELS = ("training", "data", "schedules", "memory", "throughput")
PANEL_TITLES = {"training": "Training", "data": "Data decisions", "schedules": "Schedules",
                "memory": "Memory", "throughput": "Throughput, MFU, data wait and savings"}
DATA_KEYS = ("hist_kept", "hist_pruned", "hist_edges", "threshold")
MAX_POINTS = 1500  # per trace: a long fit is thinned for drawing (the telemetry keeps everything)
ROW_PX = 250
_NOT_METRICS = ("epoch", "train_loss", "valid_loss", "time_s", "fit")
_DATA_FIELDS = ("x", "y", "width")  # what a live update changes in a trace; names and styles stay
# From zero: autoscaled to its own span, a 0.8 MB change of a 500 MB process would fill the axis.
MEMORY_YAXIS = {"title": "MB", "rangemode": "tozero"}
# One line each that says what the memory panel plots.
MEMORY_RSS_TITLE = ("Memory: process RSS, the RAM this Python process holds (model, optimiser state, batches, "
                    "activations), MB")
MEMORY_CUDA_TITLE = ("Memory, MB: CUDA allocated (held by tensors now), reserved (held by PyTorch's caching "
                     "allocator), peak (most allocated since the epoch began)")
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")


@dataclass
class Cell:
    """One subplot: `traces` are plain dicts (`type`, `name`, data, style) turned into plotly traces."""

    panel: str
    key: str
    title: str
    traces: list[dict] = field(default_factory=list)
    xaxis: dict = field(default_factory=dict)
    yaxis: dict = field(default_factory=dict)

    @property
    def trace_names(self) -> tuple[str, ...]:
        return tuple(t["name"] for t in self.traces)


# ---- reading telemetry


def _latest_run(recs: list[dict], *keys: str, strict: bool = True) -> list[dict]:
    """The records of the latest fit in a stream shared by several fits: a new fit starts where the
    ordering keys go back (`strict`) or stop increasing (`strict=False`, for one record per epoch)."""
    if recs and "fit" in recs[-1]:
        last = recs[-1]["fit"]
        recs = [r for r in recs if r.get("fit") == last]
    # From the end backwards: only the latest fit's records are looked at.
    key = (lambda r: r.get(keys[0], 0)) if len(keys) == 1 else (lambda r: tuple(r.get(k, 0) for k in keys))
    start = len(recs) - 1
    while start > 0:
        prev, cur = key(recs[start - 1]), key(recs[start])
        if cur < prev if strict else cur <= prev:
            break
        start -= 1
    return recs[max(start, 0):]


class Snapshot:
    """One read of a telemetry store for one drawing: each stream is copied (and split into fits) once,
    however many cells read it. Has the reading half of `Telemetry`'s interface."""

    def __init__(self, t: Telemetry):
        self.telemetry, self.version = t, t.version
        self._recs: dict = {}
        self._runs: dict = {}
        self._meta: dict = {}
        self._sources = None
        self.status = None  # filled by `status()`

    def records(self, source: str, stream: str) -> list[dict]:
        key = (source, stream)
        if key not in self._recs:
            self._recs[key] = self.telemetry.records(source, stream)
        return self._recs[key]

    def run(self, source: str, stream: str, *keys: str, strict: bool = True) -> list[dict]:
        key = (source, stream, keys, strict)
        if key not in self._runs:
            self._runs[key] = _latest_run(self.records(source, stream), *keys, strict=strict)
        return self._runs[key]

    def meta(self, source: str) -> dict:
        if source not in self._meta:
            self._meta[source] = self.telemetry.meta(source)
        return self._meta[source]

    def latest(self, source: str, stream: str) -> dict | None:
        recs = self.records(source, stream)
        return recs[-1] if recs else None

    @property
    def sources(self) -> list[str]:
        if self._sources is None:
            self._sources = self.telemetry.sources
        return self._sources


def snapshot(t: Telemetry | Snapshot) -> Snapshot:
    """A `Snapshot` of `t` (or `t` itself if it is one): pass it to several functions of this module to
    read the store once."""
    return t if isinstance(t, Snapshot) else Snapshot(t)


def _records(t: Snapshot, source: str, stream: str, *keys: str, strict: bool = True) -> list[dict]:
    return t.run(source, stream, *keys, strict=strict)


def _thin(xs: list, ys: list, max_points: int = MAX_POINTS) -> tuple[list, list]:
    if len(xs) <= max_points:
        return list(xs), list(ys)
    step = math.ceil(len(xs) / max_points)
    idx = list(range(0, len(xs), step))
    if idx[-1] != len(xs) - 1:
        idx.append(len(xs) - 1)  # always draw the latest point
    return [xs[i] for i in idx], [ys[i] for i in idx]


def _round(values: list) -> list:
    """Five significant digits: plenty on screen, and half the size of a saved figure."""
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        return []
    mag = np.zeros_like(a)
    ok = np.isfinite(a) & (a != 0)
    mag[ok] = np.floor(np.log10(np.abs(a[ok])))
    scale = 10.0 ** (4 - mag)
    return (np.round(a * scale) / scale).tolist()  # host: numpy


def epoch_number(epoch: int) -> int:
    """The number an epoch has in every label and axis of the dashboard: 1 for the first (fastai counts
    from 0 internally). On the x axes epoch `k` ends at `x = k`, so steps (at `pct_train * n_epoch`) and
    per-epoch points line up."""
    return epoch + 1


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def data_sources(t: Telemetry | Snapshot) -> list[str]:
    """Sources whose `"epoch"` records carry a score histogram and a threshold (data decisions)."""
    t = snapshot(t)
    out = []
    for s in t.sources:
        rec = t.latest(s, "epoch")
        if rec is not None and all(k in rec for k in DATA_KEYS):
            out.append(s)
    return out


def _n_epoch(t: Snapshot) -> int | None:
    n = t.meta("fit").get("n_epoch")
    return n if isinstance(n, int) and n > 0 else None


def _step_x(r: dict, n_epoch: int | None) -> float:
    # Steps sit at fractional epochs (pct_train * n_epoch) so that they line up with the epoch records,
    # drawn at the end of their epoch (epoch + 1).
    if n_epoch and "pct" in r:
        return r["pct"] * n_epoch
    return r.get("pct", r.get("iter", 0))


def _line(name: str, x, y, color: str | None = None, dash: str | None = None, mode: str = "lines",
          **extra) -> dict:
    x, y = _thin(x, y)
    d = {"type": "scatter", "name": name, "x": _round(x), "y": _round(y), "mode": mode, "line": {"width": 2}}
    if color:
        d["line"]["color"] = color
        d["marker"] = {"color": color}
    if dash:
        d["line"]["dash"] = dash
    return d | extra


# ---- cells, panel by panel


def _recorder_reads(t: Snapshot, n_epoch: int | None, n_iter) -> tuple[list, list] | None:
    """The smoothed training loss as `SyncFreeRecorder` read it (source `"recorder"`, stream `"read"`), at
    fractional epochs; None when this fit has no such reads.

    A read covers the `n` steps up to step `iter` and the last read of an epoch comes at its end, so an
    epoch's reads span it: a read sits at `epoch + (steps of the epoch read so far) / (steps of the epoch)`,
    the epoch's length taken from its reads once it has ended, from `n_iter` (the first epoch's) before."""
    if t.meta("fit").get("train_loss_from") != "recorder":  # FitRecorder says where this fit's loss is
        return None
    reads = _records(t, "recorder", "read", "epoch", "iter")
    if not n_epoch:
        return None
    ended = {r["epoch"] for r in _records(t, "fit", "epoch", "epoch", strict=False)}
    by_epoch: dict[int, list[dict]] = {}
    for r in reads:
        by_epoch.setdefault(r["epoch"], []).append(r)
    last_epoch = reads[-1]["epoch"] if reads else None
    xs, ys = [], []
    for e, rs in by_epoch.items():
        start = rs[0]["iter"] - rs[0]["n"] + 1
        length = rs[-1]["iter"] - start + 1
        if e == last_epoch and e not in ended and _num(n_iter) and n_iter > length:
            length = n_iter  # the epoch is still running
        for r in rs:
            if _num(r.get("smooth_loss")):
                xs.append(e + min(1.0, (r["iter"] - start + 1) / length))
                ys.append(r["smooth_loss"])
    return xs, ys


def _training_cells(t: Snapshot) -> list[Cell]:
    meta = t.meta("fit")
    steps = _records(t, "fit", "step", "epoch", "iter")
    epochs = _records(t, "fit", "epoch", "epoch", strict=False)
    if not (meta or steps or epochs):
        return []
    n_epoch = _n_epoch(t)
    xaxis = {"title": "epoch"}
    loss = Cell("training", "loss", "Training: loss", xaxis=xaxis, yaxis={"title": "loss"})
    reads = _recorder_reads(t, n_epoch, meta.get("n_iter"))
    if reads is not None:  # a SyncFreeRecorder: its host reads, the only ones of the loss during training
        x, y = reads
    else:
        s = [r for r in steps if _num(r.get("train_loss"))]
        x, y = [_step_x(r, n_epoch) for r in s], [r["train_loss"] for r in s]
    loss.traces.append(_line("loss: train (steps)", x, y, color=_PALETTE[0], opacity=0.5))
    for i, key in enumerate(("train_loss", "valid_loss")):
        e = [r for r in epochs if _num(r.get(key))]
        loss.traces.append(_line(f"loss: {key.split('_')[0]}", [epoch_number(r["epoch"]) for r in e],
                                 [r[key] for r in e], color=_PALETTE[i], mode="lines+markers"))
    out = [loss]
    names = list(meta.get("metric_names") or [])
    for r in epochs:
        names += [k for k in r if k not in names and k not in _NOT_METRICS and _num(r[k])]
    if names:
        metrics = Cell("training", "metrics", "Training: metrics (validation)", xaxis=xaxis,
                       yaxis={"title": "value"})
        for i, name in enumerate(names):
            e = [r for r in epochs if _num(r.get(name))]
            metrics.traces.append(_line(f"metrics: {name}", [epoch_number(r["epoch"]) for r in e], [r[name] for r in e],
                                        color=_PALETTE[(i + 2) % len(_PALETTE)], mode="lines+markers"))
        out.append(metrics)
    if last := (epochs[-1] if epochs else None):
        parts = [f"{k.split('_')[0]} {last[k]:.3g}" for k in ("train_loss", "valid_loss")
                 if _num(last.get(k))]
        loss.title += f" (epoch {epoch_number(last['epoch'])}: {', '.join(parts)})" if parts else ""
    return out


def _data_records(t: Snapshot, source: str) -> list[dict]:
    return [r for r in _records(t, source, "epoch", "epoch", strict=False) if all(k in r for k in DATA_KEYS)]


def informative_epoch(recs: list[dict]) -> int:
    """The epoch a static figure opens on: the latest that pruned something (annealing epochs keep
    everything and show nothing of the decisions), else the latest."""
    pruning = [r for r in recs if r.get("pruned")]
    return (pruning or recs)[-1]["epoch"]


def _pick_epoch(recs: list[dict], epoch: int | None) -> dict:
    if epoch is None:
        return recs[-1]
    before = [r for r in recs if r["epoch"] <= epoch]
    return before[-1] if before else recs[0]


def _histogram_traces(cell_key: str, rec: dict) -> list[dict]:
    """Kept (weight 1), kept and rescaled (below the threshold), pruned, and the threshold line.

    A plan reports kept and pruned per bin and the total rescaled: the kept samples of bins entirely
    below the threshold are rescaled ones, and the bin holding the threshold gets the rest, so the bars
    add up exactly to the plan's counts.
    """
    edges, kept, pruned = rec["hist_edges"], list(rec["hist_kept"]), list(rec["hist_pruned"])
    thr, n_rescaled = rec["threshold"], int(rec.get("rescaled") or 0)
    rescaled = [0] * len(kept)
    if n_rescaled > 0:
        left = [i for i in range(len(kept)) if edges[i + 1] <= thr]
        for i in left:
            rescaled[i] = kept[i]
        if sum(rescaled) > n_rescaled:  # fewer rescaled than the bins suggest: scale the left bins down
            scale = n_rescaled / sum(rescaled)
            rescaled = [math.floor(v * scale) for v in rescaled]
        # The rest goes to the bin holding the threshold, then to the nearest bins with room (the edges
        # are rounded floats): the bars always add up to the plan's counts.
        middle = next((i for i in range(len(kept)) if edges[i] <= thr < edges[i + 1]), len(kept) - 1)
        rest = n_rescaled - sum(rescaled)
        for i in sorted(range(len(kept)), key=lambda i: abs(i - middle)):
            take = min(rest, kept[i] - rescaled[i])
            rescaled[i] += take
            rest -= take
            if rest <= 0:
                break
    plain = [k - r for k, r in zip(kept, rescaled)]
    centers = _round([(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])])
    widths = _round([b - a for a, b in zip(edges[:-1], edges[1:])])
    top = max([k + p for k, p in zip(kept, pruned)] or [1]) * 1.05
    bar = {"type": "bar", "x": centers, "width": widths, "marker_line_width": 0}
    return [
        bar | {"name": f"{cell_key}: kept", "y": plain, "marker": {"color": KEPT}},
        bar | {"name": f"{cell_key}: rescaled", "y": rescaled, "marker": {"color": RESCALED}},
        bar | {"name": f"{cell_key}: pruned", "y": pruned, "marker": {"color": PRUNED}},
        {"type": "scatter", "name": f"{cell_key}: threshold", "x": [thr, thr], "y": [0, top], "mode": "lines",
         "line": {"color": "black", "dash": "dash", "width": 2}},
    ]


def _scores_title(source: str, rec: dict) -> str:
    note = ", annealing: all kept" if rec.get("annealing") else ""
    return (f"Data decisions ({source}), epoch {epoch_number(rec['epoch'])}: {rec['kept']:,} kept "
            f"({rec.get('rescaled', 0):,} rescaled), {rec['pruned']:,} pruned{note}")


def _data_cells(t: Snapshot, epoch: int | None = None) -> list[Cell]:
    out, kept = [], Cell("data", "kept", "Data decisions: kept fraction per epoch", xaxis={"title": "epoch"},
                         yaxis={"title": "kept / all", "range": [0, 1.05]})
    for i, src in enumerate(data_sources(t)):
        recs = _data_records(t, src)
        if not recs:
            continue
        if any(any(r["hist_kept"]) or any(r["hist_pruned"]) for r in recs):
            rec = _pick_epoch(recs, epoch)
            key = f"scores/{src}"
            out.append(Cell("data", key, _scores_title(src, rec), _histogram_traces(key, rec),
                            xaxis={"title": "score (latest loss)"}, yaxis={"title": "samples"}))
        frac = [(r["epoch"], r["kept"] / max(1, r["kept"] + r["pruned"])) for r in recs]
        kept.traces.append(_line(f"kept: {src}", [epoch_number(e) for e, _ in frac], [f for _, f in frac],
                                 color=_PALETTE[(i + 4) % len(_PALETTE)], mode="lines+markers"))
    return out + [kept] if kept.traces else out


def _schedule_cells(t: Snapshot) -> list[Cell]:
    planned = t.meta("schedule").get("planned") or {}
    steps = _records(t, "schedule", "step", "pct", strict=True)
    keys = list(planned)
    for r in steps:
        keys += [k for k in r if k not in keys and k not in ("iter", "pct", "epoch", "fit") and _num(r[k])]
    n_epoch = _n_epoch(t)
    scale = n_epoch or 1
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(k.split("/")[0], []).append(k)
    out = []
    for base, ks in groups.items():
        cell = Cell("schedules", f"schedule/{base}", f"Schedule: {base} (dashed: planned, solid: actual)",
                    xaxis={"title": "epoch" if n_epoch else "fraction of training"}, yaxis={"title": base})
        values = []
        for i, k in enumerate(ks):
            color = _PALETTE[i % len(_PALETTE)]
            suffix = f" ({k.split('/', 1)[1]})" if "/" in k else ""
            if k in planned:
                p = planned[k]
                cell.traces.append(_line(f"{cell.key}: planned{suffix}", [x * scale for x in p["pct"]],
                                         p["value"], color=color, dash="dash"))
                values += p["value"]
            s = [r for r in steps if _num(r.get(k))]
            actual = _line(f"{cell.key}: actual{suffix}", [r["pct"] * scale for r in s], [r[k] for r in s],
                           color=color)
            # A value holds until the next record (writers record on change or every N steps): steps, not ramps.
            actual["line"]["shape"] = "hv"
            cell.traces.append(actual)
            values += [r[k] for r in s]
        # Learning rates span decades under one-cycle / cosine schedules.
        if base == "lr" and values and min(values) > 0:
            cell.yaxis["type"] = "log"
        out.append(cell)
    return out


def _memory_cells(t: Snapshot) -> list[Cell]:
    meta = t.meta("system")
    steps = _records(t, "system", "step", "time_s")
    if not (meta or steps):
        return []
    xaxis = {"title": "seconds"}
    cuda = meta.get("has_gpu") or any("cuda_allocated_mb" in r for r in steps)
    out = []
    if cuda:
        mem = Cell("memory", "memory", MEMORY_CUDA_TITLE, xaxis=xaxis, yaxis=dict(MEMORY_YAXIS))
        series = (("cuda_allocated_mb", "cuda allocated"), ("cuda_reserved_mb", "cuda reserved"),
                  ("cuda_peak_mb", "cuda peak"))
        for i, (k, label) in enumerate(series):
            s = [r for r in steps if _num(r.get(k))]
            mem.traces.append(_line(f"memory: {label}", [r["time_s"] for r in s], [r[k] for r in s],
                                    color=_PALETTE[i], dash="dot" if k == "cuda_peak_mb" else None))
        if meta.get("gpu_name"):
            mem.title += f", {meta['gpu_name']}"
    else:
        note = meta.get("note") or "no GPU: showing process memory (RSS)"
        mem = Cell("memory", "memory", f"{MEMORY_RSS_TITLE} ({note})", xaxis=xaxis, yaxis=dict(MEMORY_YAXIS))
        s = [r for r in steps if _num(r.get("rss_mb"))]
        mem.traces.append(_line("memory: rss", [r["time_s"] for r in s], [r["rss_mb"] for r in s],
                                color=_PALETTE[0]))
    out.append(mem)
    if meta.get("nvml") or any("gpu_util" in r for r in steps):
        gpu = Cell("memory", "gpu", "GPU utilisation (%)", xaxis=xaxis,
                   yaxis={"title": "%", "range": [0, 105]})
        s = [r for r in steps if _num(r.get("gpu_util"))]
        gpu.traces.append(_line("gpu: utilisation", [r["time_s"] for r in s], [r["gpu_util"] for r in s],
                                color=_PALETTE[2]))
        out.append(gpu)
    return out


def _samples_series(t: Snapshot) -> tuple[list[int], list[float], list[float]]:
    """Per epoch of the latest fit: samples forwarded so far and what full data would have forwarded
    (from the system monitor, else from the first data technique's own counts)."""
    every = t.records("system", "epoch")
    run = [r for r in _latest_run(every, "epoch", strict=False)
           if _num(r.get("samples_total")) and _num(r.get("full_samples_total"))]
    if run:
        # Totals run over the Learner's life: this fit starts where the record before it ended.
        before = every[:len(every) - len(_latest_run(every, "epoch", strict=False))]
        prev = before[-1] if before else {}
        fwd0 = prev.get("samples_total") if _num(prev.get("samples_total")) else 0
        full0 = prev.get("full_samples_total") if _num(prev.get("full_samples_total")) else 0
        return ([epoch_number(r["epoch"]) for r in run], [r["samples_total"] - fwd0 for r in run],
                [r["full_samples_total"] - full0 for r in run])
    for src in data_sources(t):
        recs = _records(t, src, "samples", "epoch", strict=False)
        if recs:
            first = recs[0]
            plans = [r for r in t.records(src, "epoch")
                     if r.get("fit") == first.get("fit") and r.get("epoch") == first["epoch"]]
            fwd0 = first["forwarded_total"] - first["forwarded"]
            full0 = first["full_total"] - (plans[-1].get("full_epoch", 0) if plans else 0)
            return ([epoch_number(r["epoch"]) for r in recs], [r["forwarded_total"] - fwd0 for r in recs],
                    [r["full_total"] - full0 for r in recs])
    return [], [], []


def _system_cell(t: Snapshot, steps: list[dict]) -> Cell:
    """Model FLOPs utilisation and the fraction of time waiting for data: two shares, on one axis."""
    meta = t.meta("system")
    title = "System: time waiting for data"
    cell = Cell("throughput", "system", title, xaxis={"title": "seconds"},
                yaxis={"title": "fraction", "range": [0, 1.05]})
    s = [r for r in steps if _num(r.get("mfu"))]
    if s:
        source = meta.get("peak_source")
        cell.title = (f"System: model FLOPs utilisation (of the peak: {source})" if source else
                      "System: model FLOPs utilisation") + " and time waiting for data"
        # The latest values are in the traces: a title that changed with every point would relayout the
        # live figure at every draw.
        cell.traces.append(_line("system: mfu", [r["time_s"] for r in s], [r["mfu"] for r in s], color=_PALETTE[4]))
    s = [r for r in steps if _num(r.get("data_wait_frac"))]
    cell.traces.append(_line("system: data wait", [r["time_s"] for r in s], [r["data_wait_frac"] for r in s],
                             color=_PALETTE[1]))
    return cell


def _throughput_cells(t: Snapshot) -> list[Cell]:
    steps = _records(t, "system", "step", "time_s")
    out = []
    xaxis = {"title": "seconds"}
    if steps or t.meta("system"):
        speed = Cell("throughput", "speed", "Throughput: samples per second", xaxis=xaxis,
                     yaxis={"title": "samples/s"})
        s = [r for r in steps if _num(r.get("samples_per_s"))]
        speed.traces.append(_line("speed: samples/s", [r["time_s"] for r in s],
                                  [r["samples_per_s"] for r in s], color=_PALETTE[0]))
        out += [speed, _system_cell(t, steps)]
    epochs, fwd, full = _samples_series(t)
    if epochs or t.meta("system") or data_sources(t):
        title = "Samples forwarded (cumulative)"
        if fwd and full and full[-1]:
            frac = fwd[-1] / full[-1]
            title += f": {fwd[-1]:,.0f} of {full[-1]:,.0f} ({frac:.1%}; saved {1 - frac:.1%})"
        samples = Cell("throughput", "samples", title, xaxis={"title": "epoch"},
                       yaxis={"title": "samples"})
        samples.traces += [
            _line("samples: forwarded", epochs, fwd, color=KEPT, mode="lines+markers"),
            _line("samples: full data", epochs, full, color="grey", dash="dash", mode="lines+markers")]
        out.append(samples)
    return out


def cells(t: Telemetry | Snapshot, epoch: int | None = None) -> list[Cell]:
    """Every cell that has data (or that the writers' metadata announce), in panel order.

    `epoch` (fastai's `learn.epoch`, from 0) picks the data-decision histogram shown (default: the latest
    epoch). A cell appears with its first point."""
    t = snapshot(t)
    every = (_training_cells(t) + _data_cells(t, epoch) + _schedule_cells(t) + _memory_cells(t)
             + _throughput_cells(t))
    # A cell without a single point would be an empty frame: it appears with its first point.
    return [c for c in every if any(len(tr.get("y") or ()) for tr in c.traces)]


def panels(t: Telemetry | Snapshot) -> list[str]:
    """The panels (of `PANELS`) that this telemetry fills."""
    present = {c.panel for c in cells(t)}
    return [p for p in PANELS if p in present]


def layout_key(cs: list[Cell]) -> tuple:
    """Cells and trace names: a live figure is rebuilt only when this changes."""
    return tuple((c.key, c.trace_names) for c in cs)


# ---- status and summary


def status(t: Telemetry | Snapshot) -> dict:
    """Numbers for a progress line: epoch, pct, elapsed and estimated time left, speed, samples saved."""
    t = snapshot(t)
    if t.status is not None:
        return t.status
    meta = t.meta("fit")
    steps = _records(t, "fit", "step", "epoch", "iter")
    epochs = _records(t, "fit", "epoch", "epoch", strict=False)
    sys_steps = _records(t, "system", "step", "time_s")
    sys_epochs = _records(t, "system", "epoch", "epoch", strict=False)
    n_epoch = _n_epoch(t)
    pct = steps[-1].get("pct") if steps else None
    if epochs and n_epoch:
        pct = max(pct or 0.0, (epochs[-1]["epoch"] + 1) / n_epoch)
    elapsed = None
    if sys_steps or sys_epochs:
        elapsed = max([r.get("time_s", 0) for r in sys_steps[-1:] + sys_epochs[-1:]])
    elif epochs:
        elapsed = sum(r.get("time_s", 0) for r in epochs if _num(r.get("time_s")))
    eta = None
    if pct is not None and elapsed is not None and 0 < pct < 1:
        eta = elapsed * (1 - pct) / pct
    done = bool(n_epoch and epochs and epochs[-1]["epoch"] + 1 >= n_epoch)
    speed = [r["samples_per_s"] for r in sys_steps if _num(r.get("samples_per_s"))]
    _, fwd, full = _samples_series(t)
    t.status = {"fit_index": meta.get("fit_index"), "epoch": steps[-1].get("epoch") if steps else None,
                "epochs_done": len(epochs), "n_epoch": n_epoch, "pct": 1.0 if done else pct,
                "elapsed_s": elapsed, "eta_s": 0.0 if done else eta,
                "samples_per_s": speed[-1] if speed else None,
                "median_samples_per_s": median(speed) if speed else None,
                "forwarded": fwd[-1] if fwd else None, "full": full[-1] if full else None, "done": done}
    return t.status


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "?"
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    return f"{m} min {sec:02d} s" if m < 60 else f"{m // 60} h {m % 60:02d} min"


def status_line(t: Telemetry | Snapshot) -> str:
    """One line for the live header and the figure's title: epoch, progress, time, speed, savings."""
    st = status(t)
    parts = []
    if st["n_epoch"]:
        current = min(st["epochs_done"] + (0 if st["done"] else 1), st["n_epoch"])
        parts.append(f"epoch {current}/{st['n_epoch']}")
    if st["pct"] is not None:
        parts.append(f"{st['pct']:.0%}")
    if st["elapsed_s"] is not None:
        parts.append(f"elapsed {_fmt_s(st['elapsed_s'])}")
    if st["eta_s"] is not None and not st["done"]:
        parts.append(f"about {_fmt_s(st['eta_s'])} left")
    if st["samples_per_s"] is not None:
        parts.append(f"{st['samples_per_s']:,.0f} samples/s")
    if st["forwarded"] is not None and st["full"]:
        parts.append(f"forwarded {st['forwarded'] / st['full']:.0%} of full data")
    return " · ".join(parts) if parts else "waiting for telemetry"


def summary_text(t: Telemetry | Snapshot) -> str:
    """A few lines on the latest fit: results, data decisions, savings, schedules, speed, memory."""
    t = snapshot(t)
    lines = []
    st = status(t)
    epochs = _records(t, "fit", "epoch", "epoch", strict=False)
    if epochs or t.meta("fit"):
        head = f"Training (fit {st['fit_index']})" if st["fit_index"] is not None else "Training"
        line = f"{head}: {st['epochs_done']} of {st['n_epoch'] or '?'} epochs"
        if st["elapsed_s"] is not None:
            line += f" in {_fmt_s(st['elapsed_s'])}"
        if epochs:
            last = epochs[-1]
            vals = [f"{k.replace('_', ' ')} {v:.4g}" for k, v in last.items()
                    if k not in ("epoch", "time_s", "fit") and _num(v)]
            line += f"; last epoch: {', '.join(vals)}"
        lines.append(line)
    for src in data_sources(t):
        recs = _data_records(t, src)
        if not recs:
            continue
        last = recs[-1]
        kept = sum(r["kept"] for r in recs)
        total = sum(r["kept"] + r["pruned"] for r in recs)
        lines.append(f"Data decisions ({src}): {len(recs)} epochs planned, {kept / max(1, total):.1%} of the "
                     f"samples kept; last epoch threshold {last['threshold']:.4g}, {last['kept']:,} kept "
                     f"({last.get('rescaled', 0):,} rescaled), {last['pruned']:,} pruned")
    if st["forwarded"] is not None and st["full"]:
        lines.append(f"Samples forwarded: {st['forwarded']:,.0f} of {st['full']:,.0f} with full data "
                     f"({st['forwarded'] / st['full']:.1%}; saved {1 - st['forwarded'] / st['full']:.1%})")
    planned = t.meta("schedule").get("planned") or {}
    if planned:
        desc = [f"{k} {min(p['value']):.3g}..{max(p['value']):.3g}" for k, p in planned.items()
                if p.get("value")]
        lines.append(f"Schedules (planned range): {', '.join(desc)}")
    sys_steps = _records(t, "system", "step", "time_s")
    if st["median_samples_per_s"] is not None:
        wait = [r["data_wait_frac"] for r in sys_steps if _num(r.get("data_wait_frac"))]
        mfu = [r["mfu"] for r in sys_steps if _num(r.get("mfu"))]
        line = f"Throughput: {st['median_samples_per_s']:,.0f} samples/s (median)"
        line += f", model FLOPs utilisation {median(mfu):.1%}" if mfu else ""
        lines.append(line + (f", waiting for data {median(wait):.1%} of the time" if wait else ""))
    meta = t.meta("system")
    if meta or sys_steps:
        peak_keys = ("cuda_peak_mb",) if meta.get("has_gpu") else ("rss_mb",)
        peaks = [r[k] for r in sys_steps for k in peak_keys if _num(r.get(k))]
        peaks += [r["peak_rss_mb"] for r in _records(t, "system", "epoch", "epoch", strict=False)
                  if not meta.get("has_gpu") and _num(r.get("peak_rss_mb"))]
        if meta.get("has_gpu"):
            what = f"CUDA peak on {meta.get('gpu_name') or meta.get('device', 'GPU')}"
        else:
            what = "peak process memory (RSS)"
        line = f"Memory: {what} {max(peaks):,.0f} MB" if peaks else "Memory: no readings yet"
        if not meta.get("has_gpu"):
            line += f" ({meta.get('note') or 'no GPU'})"
        lines.append(line)
    return "\n".join(lines) if lines else "No telemetry recorded yet."


# ---- figures


def _grid(cs: list[Cell]) -> tuple[list[list], list[tuple[int, int]]]:
    """Two columns; each panel starts a new row; a panel's odd last cell spans both columns."""
    specs, pos, row = [], [], 0
    for p in PANELS:
        mine = [c for c in cs if c.panel == p]
        for i in range(0, len(mine), 2):
            row += 1
            if i + 1 < len(mine):
                specs.append([{}, {}])
                pos += [(row, 1), (row, 2)]
            else:
                specs.append([{"colspan": 2}, None])
                pos.append((row, 1))
    return specs, pos


def _title(t: Snapshot, live: bool = False) -> str:
    """The live widget's header carries the status line: its figure's title does not repeat it."""
    st = status(t)
    head = "effilab dashboard" + (f" · fit {st['fit_index']}" if st["fit_index"] is not None else "")
    return head if live else f"{head} · {status_line(t)}"


def _slider(t: Snapshot, cs: list[Cell], trace_index: dict[str, list[int]], epoch: int | None) -> dict | None:
    """An epoch slider for the data-decision histograms (plotly `update` steps: works in static HTML)."""
    srcs = [c.key.split("/", 1)[1] for c in cs if c.key.startswith("scores/")]
    if not srcs:
        return None
    recs = {s: _data_records(t, s) for s in srcs}
    epochs = sorted({r["epoch"] for rs in recs.values() for r in rs})
    if len(epochs) < 2:
        return None
    steps = []
    for e in epochs:
        data: dict[str, list] = {"x": [], "y": [], "width": []}
        idx, layout = [], {}
        for s in srcs:
            rec = _pick_epoch(recs[s], e)
            for tr, i in zip(_histogram_traces(f"scores/{s}", rec), trace_index[f"scores/{s}"]):
                data["x"].append(tr["x"])
                data["y"].append(tr["y"])
                data["width"].append(tr.get("width"))
                idx.append(i)
            k = next(i for i, c in enumerate(cs) if c.key == f"scores/{s}")
            layout[f"annotations[{k}].text"] = _scores_title(s, rec)
        steps.append({"label": str(epoch_number(e)), "method": "update", "args": [data, layout, idx]})
    active = epochs.index(epoch) if epoch in epochs else len(steps) - 1
    return {"active": active, "steps": steps, "currentvalue": {"prefix": "data decisions at epoch "},
            "pad": {"t": 40}, "x": 0.0, "len": 1.0, "y": 0.0, "yanchor": "top"}


def build_figure(t: Telemetry | Snapshot, epoch: int | None = None, scrub: bool = True,
                 cell_list: list[Cell] | None = None, live: bool = False) -> go.Figure:
    """The whole dashboard as one plotly figure (the static figure, and the live widget's content).

    `epoch` picks the histogram's epoch (fastai's index, from 0). By default the live figure (`scrub=False`)
    shows the latest, and the static one the latest that pruned something (`informative_epoch`), with a
    slider under the figure that moves the histogram through the epochs. `cell_list`: `cells(t, epoch)`,
    when the caller has them already. `live`: the figure of the live widget, whose header has the status.
    """
    return go.Figure(figure_dict(t, epoch, scrub, cell_list, live), _validate=False)


def figure_dict(t: Telemetry | Snapshot, epoch: int | None = None, scrub: bool = True,
                cell_list: list[Cell] | None = None, live: bool = False) -> dict:
    """`build_figure`'s figure as plotly.js takes it (`{"data": [...], "layout": {...}}`, JSON-ready): what
    the live widget draws."""
    t = snapshot(t)
    if epoch is None and scrub and cell_list is None:
        recs = next((r for r in (_data_records(t, s) for s in data_sources(t)) if r), None)
        epoch = informative_epoch(recs) if recs else None
    cs = cells(t, epoch) if cell_list is None else cell_list
    if not cs:
        return {"data": [], "layout": {"title": {"text": "effilab dashboard: no telemetry yet"}, "height": 200,
                                       "template": _template(), "xaxis": {"visible": False},
                                       "yaxis": {"visible": False}}}
    specs, pos = _grid(cs)
    rows = len(specs)
    height = rows * ROW_PX + 140
    # The grid (axis domains, subplot titles) from plotly; traces and axes added as plain dicts to a figure
    # built without validation: validating ~25 traces one by one costs 10x more (0.1 s per figure, at the
    # end of every fit), and everything here is made by this module in plotly's own terms.
    layout, refs = _subplot_grid(specs, height)
    for a, c in zip(layout.get("annotations", []), cs):
        a["text"] = c.title
    data, trace_index = [], {}
    for c, (r, col) in zip(cs, pos):
        xkey, ykey, trace_axes = refs[(r, col)]
        for tr in c.traces:
            trace_index.setdefault(c.key, []).append(len(data))
            data.append(_plain(tr) | {"legendgroup": c.key} | trace_axes)
        layout[xkey] = layout.get(xkey, {}) | _plain_axis(c.xaxis)
        layout[ykey] = layout.get(ykey, {}) | _plain_axis(c.yaxis)
    for a in layout.get("annotations", []):
        a["font"] = {"size": 13}
    layout |= {"height": height, "template": _template(), "barmode": "stack", "bargap": 0,
               "title": {"text": _title(t, live), "x": 0.01, "font": {"size": 15}},
               "margin": {"t": 80, "b": 60, "l": 60, "r": 20},
               "legend": {"tracegroupgap": 8, "font": {"size": 11}, "traceorder": "grouped"},
               "uirevision": "effilab"}  # keeps a user's zoom across live updates
    if scrub and (slider := _slider(t, cs, trace_index, epoch)):
        layout["sliders"] = [slider]
        layout["height"] = height + 80
        layout["margin"]["b"] = 120
    return {"data": data, "layout": layout}


_TEMPLATE: dict = {}
_PLOTLY_CDN = f"https://cdn.plot.ly/plotly-{get_plotlyjs_version()}.min.js"
_GRIDS: dict = {}


def _subplot_grid(specs: list, height: int) -> tuple[dict, dict]:
    """`make_subplots`' layout for this grid (axis domains, one title annotation per cell) and, per
    (row, col), its axis layout keys and trace axis references; cached per grid, as panels come and go
    while a figure grows."""
    key = (repr(specs), height)
    if key not in _GRIDS:
        rows = len(specs)
        n = sum(1 for row in specs for s in row if s is not None)
        grid = make_subplots(rows=rows, cols=2, specs=specs, subplot_titles=[" "] * n,
                             vertical_spacing=min(0.3 / max(1, rows - 1), 90 / height), horizontal_spacing=0.08)
        refs = {}
        for r, row in enumerate(specs, 1):
            for col, spec in enumerate(row, 1):
                if spec is not None:
                    ref = grid._grid_ref[r - 1][col - 1][0]
                    refs[(r, col)] = (*ref.layout_keys, dict(ref.trace_kwargs))
        _GRIDS[key] = (grid.layout.to_plotly_json(), refs)
    layout, refs = _GRIDS[key]
    return copy.deepcopy(layout), refs


def _template() -> dict:
    """The layout part of `plotly_white`, as plotly.js wants it (a figure built without validation keeps a
    name as a name); its defaults for 40 trace types this figure never draws would be sent to the browser
    with every figure (20 KB)."""
    if not _TEMPLATE:
        _TEMPLATE.update({"layout": pio.templates["plotly_white"].layout.to_plotly_json()})
    return copy.deepcopy(_TEMPLATE)


def _plain(d: dict) -> dict:
    """A trace dict with plotly.py's shorthands spelled out as plotly.js reads them (`marker_line_width`
    -> `marker.line.width`)."""
    out: dict = {}
    for k, v in d.items():
        parts = k.split("_") if k.startswith("marker_") else [k]
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = (node.get(parts[-1], {}) | v) if isinstance(v, dict) else v
    return out


def _plain_axis(d: dict) -> dict:
    return {k: ({"text": v} if k == "title" and isinstance(v, str) else v) for k, v in d.items()}


def figure_delta(t: Telemetry | Snapshot, cs: list[Cell], sent: dict) -> tuple[list, dict]:
    """What changed since the last call with the same `sent` dict, for a figure built by `build_figure`
    with the same `layout_key`: `(groups, layout)`, where each group is `(trace_indexes, style)` in
    `Plotly.update`'s terms (`style[field][j]` is trace `trace_indexes[j]`'s new array; traces are grouped
    by the fields that changed, as a restyle cannot leave one trace's field alone while setting another's)
    and `layout` maps layout paths (`"annotations[2].text"`, `"title.text"`) to their new values. Only the
    traces whose data changed are in it; `sent` is updated as if it had been sent."""
    t = snapshot(t)
    groups: dict[tuple, tuple[list, dict]] = {}
    i = 0
    for c in cs:
        for tr in c.traces:
            changed = [k for k in _DATA_FIELDS if k in tr and sent.get((i, k)) != tr[k]]
            if changed:
                idx, style = groups.setdefault(tuple(changed), ([], {k: [] for k in changed}))
                idx.append(i)
                for k in changed:
                    style[k].append(tr[k])
                    sent[(i, k)] = tr[k]
            i += 1
    layout = {}
    for k, c in enumerate(cs):
        if sent.get(("annotation", k)) != c.title:
            layout[f"annotations[{k}].text"] = sent[("annotation", k)] = c.title
    title = _title(t, live=True)
    if sent.get("title") != title:
        layout["title.text"] = sent["title"] = title
    return list(groups.values()), layout


def apply_delta(fig: dict, groups: list, layout: dict) -> None:
    """Apply `figure_delta`'s `(groups, layout)` to `fig`, a `figure_dict` (what the live widget keeps of the
    figure its views draw)."""
    for idx, style in groups:
        for name, values in style.items():
            for i, v in zip(idx, values):
                fig["data"][i][name] = v
    for path, value in layout.items():  # "annotations[3].text", "title.text"
        node, parts = fig["layout"], path.split(".")
        for part in parts[:-1]:
            name, _, k = part.partition("[")
            node = node.setdefault(name, [] if k else {})
            if k:
                node = node[int(k[:-1])]
        node[parts[-1]] = value


# ---- lr_find


def lr_find_figure(lrs, losses, marks: dict[str, float] | None = None, title: str | None = None) -> go.Figure:
    """The learning-rate range test (`learn.lr_find()`): the smoothed loss against the learning rate on a
    log axis, with a dashed vertical line and a label at each of `marks` ({label: learning rate}, e.g.
    `{"valley": suggestion.valley}`).

    On a log axis plotly positions a shape by its value but an annotation by the value's log10
    (`fig.add_vline` gives both the same number, so one of the two lands elsewhere): each line is drawn
    at the rate and its label at log10 of the rate, and both stay on the rate.
    """
    lrs, losses = [float(v) for v in lrs], [float(v) for v in losses]
    if not lrs or len(lrs) != len(losses):
        raise ValueError(f"lr_find_figure needs as many losses as learning rates, got {len(lrs)} and {len(losses)}")
    fig = go.Figure(go.Scatter(x=lrs, y=losses, mode="lines", name="smoothed training loss", line_color=KEPT))
    dashes = ("dash", "dot", "dashdot", "longdash")
    for i, (label, lr) in enumerate((marks or {}).items()):
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr_find_figure mark {label!r} must be a positive learning rate, got {lr!r}")
        fig.add_shape(type="line", x0=lr, x1=lr, xref="x", y0=0, y1=1, yref="paper",
                      line={"dash": dashes[i % len(dashes)], "color": "black" if i == 0 else "grey"})
        fig.add_annotation(x=math.log10(lr), xref="x", y=1 - 0.08 * i, yref="paper", text=f"{label}: {lr:.1e}",
                           showarrow=False, xanchor="left", bgcolor="rgba(255,255,255,0.8)")
    fig.update_layout(template="plotly_white", height=340, xaxis={"type": "log", "title": "learning rate"},
                      yaxis_title="loss", title=title or "lr_find: the loss while the learning rate grows")
    return fig


# ---- outputs


def figure_bundle(fig: go.Figure, text: str = "") -> dict:
    """A display bundle for a notebook output: the plotly mime type (JupyterLab, VS Code, nteract), HTML
    that loads plotly.js from its CDN (nbconvert and other viewers) and plain text."""
    # Serialised once: the HTML embeds the same JSON (plotly's `to_html` would encode the figure again).
    fig_json = fig.to_plotly_json()
    fig_json["config"] = {"displaylogo": False}
    encoded = pio.to_json(fig_json, validate=False)
    div = f"effilab-{uuid.uuid4().hex}"
    html = (f'<div id="{div}" class="plotly-graph-div" style="height:{fig.layout.height or 450}px; width:100%;">'
            f'</div>\n<script src="{_PLOTLY_CDN}" charset="utf-8"></script>\n<script>(function(){{'
            f'var f = {encoded}; Plotly.newPlot("{div}", f.data, f.layout, f.config);}})();</script>')
    return {"application/vnd.plotly.v1+json": json.loads(encoded), "text/html": html,
            "text/plain": text or "effilab dashboard (a plotly figure)"}


def report_html(t: Telemetry | Snapshot, path, title: str = "effilab training report") -> str:
    """Write a self-contained HTML report (plotly.js embedded, no network needed to view it): the
    dashboard figure with its epoch slider and the text summary. Returns the path written."""
    import html as _html

    t = snapshot(t)
    fig = build_figure(t)
    body = pio.to_html(fig, include_plotlyjs=True, full_html=False, config={"displaylogo": False})
    doc = (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{_html.escape(title)}</title></head>\n"
           f"<body style='font-family:sans-serif;margin:1em 2em'>\n<h2>{_html.escape(title)}</h2>\n"
           f"<pre class='effilab-summary'>{_html.escape(summary_text(t))}</pre>\n{body}\n</body></html>\n")
    with open(path, "w", encoding="utf-8") as f:
        f.write(doc)
    return str(path)
