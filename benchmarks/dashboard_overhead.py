"""What the live dashboard costs the training loop, and how far the browser's drawing lags behind it.

Part 1, in this process (no browser): the same fit (MNIST-1D 20k, the 256-wide MLP, InfoBatch(0.5),
`fit_one_cycle(6)`, then 24 epochs, batch 128, one thread) with no dashboard, with only the telemetry
writers a Dashboard adds (`FitRecorder`, `SystemMonitor`), with `Dashboard(mode="static")`, with
`Dashboard(mode="live")` at its defaults (at most 4 draws/s, and drawing within 1% of the fit's time) and
without the rate limit (`max_per_s=0`: the time budget only). In live mode the widget
(`effilab.viz.live.LiveFigure`) is created and updated as in a notebook; there is no front end, so the
widget's comm is replaced by one that JSON-encodes every message as a kernel would (jupyter_client's
packer) and counts the bytes (JSON and binary buffers apart), but sends nothing. Fits are interleaved
(A B C D E, then rotated), timed whole (wall and process CPU), and each callback's own time is measured
around the events it handles (garbage from the previous fit is collected before each one). Overhead =
median fit time / median fit time with no dashboard - 1.

Part 2, in a real browser: JupyterLab runs `tests/browser/dashboard_live.ipynb` in headless Chromium
(the test suite's launcher, `tests/browser/lab.py`). The kernel logs when each schedule record reached
the telemetry and when each update was sent; the page samples, every 50 ms, how many points of
`schedule/lr: actual` it has drawn. Lag = records the kernel had and the page had not drawn, and for
how long the oldest of them had been waiting.

    python -m benchmarks.dashboard_overhead [--quick] [--repeats N] [--epochs N ...] [--no-browser | --browser-only]
    python -m benchmarks.dashboard_overhead --draw-only   # part 0: the widget's open / rebuild / draw, no training
    python -m benchmarks.dashboard_overhead --dispatch-only   # fastai's call of a callback for an unhandled event
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `tests.browser.lab` is imported from the checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    add_common_args,
    apply_threads,
    machine,
    machine_line,
    make_learner,
    median,
    pct,
    table,
    write_json,
)

BS, LR = 128, 3e-3
ARMS = ("none", "writers", "static", "live", "live_unthrottled")
ARM_TITLES = {"none": "no dashboard", "writers": "telemetry writers only (FitRecorder, SystemMonitor)",
              "static": "Dashboard(mode='static')",
              "live": "Dashboard(mode='live') (default: <= 4 draws/s, within 1% of the fit's time)",
              "live_unthrottled": "Dashboard(mode='live', max_per_s=0) (the 1% budget only)"}


# ---- part 1: in-process overhead


def _timed(cls):
    """`cls` with the time spent in each call fastai makes to it for an event it handles added up per event in
    `busy`, and in all in `busy_s`.

    The per-batch events a callback has no handler for pass through as in `EffilabCallback.__call__`, untimed:
    0.1-0.2 us a call (`python -m benchmarks.dashboard_overhead --dispatch-only`), less than the two clock reads
    that would time it. The sums live in the instance's `__dict__`: setting a fastai Callback's attribute
    looks the name up on the Learner (~8 us), which would add to the fit what it measures."""

    class Timed(cls):
        @property
        def busy_s(self) -> float:
            return sum(self.__dict__.get("busy", {}).values())

        def __call__(self, event_name=None, *args, **kwargs):
            if event_name in self._ignored:
                return None
            t0 = time.perf_counter()
            try:
                return cls.__call__(self, event_name, *args, **kwargs)
            finally:
                busy = self.__dict__.setdefault("busy", {})
                busy[event_name] = busy.get(event_name, 0.0) + time.perf_counter() - t0

    Timed.__name__ = Timed.__qualname__ = cls.__name__
    return Timed


class _Wire:
    """Stands for the kernel's comm: encodes each message as the kernel's session would, sends nothing."""

    bytes = buffer_bytes = messages = 0  # JSON bytes, binary buffer bytes
    seconds = 0.0


def _install_encoding_comm():
    import comm
    from comm.base_comm import BaseComm
    from jupyter_client.session import json_packer

    class EncodingComm(BaseComm):
        def publish_msg(self, msg_type, data=None, metadata=None, buffers=None, **keys):
            t0 = time.perf_counter()
            n = len(json_packer({"data": data or {}, "comm_id": self.comm_id})) + len(json_packer(metadata or {}))
            _Wire.seconds += time.perf_counter() - t0
            _Wire.bytes += n
            _Wire.buffer_bytes += sum(memoryview(b).nbytes for b in buffers or ())
            _Wire.messages += 1

    comm.create_comm = lambda *a, **k: EncodingComm(*a, **k)


def _learner(task, arm: str):
    from fastai.callback.progress import ProgressCallback
    from fastai.metrics import accuracy

    from effilab.data.infobatch import InfoBatch
    from effilab.system.fit_recorder import FitRecorder
    from effilab.system.monitor import SystemMonitor
    from effilab.viz.dashboard import Dashboard

    cbs = [InfoBatch(0.5, seed=0)]
    writers = dash = None
    if arm != "none":
        writers = [_timed(FitRecorder)(), _timed(SystemMonitor)()]
        cbs += writers
    if arm in ("static", "live", "live_unthrottled"):
        mode = "static" if arm == "static" else "live"
        dash = _timed(Dashboard)(mode=mode, **({"max_per_s": 0.0} if arm == "live_unthrottled" else {}))
        cbs.append(dash)
    learn = make_learner(task, BS, seed=0, cbs=cbs, metrics=[accuracy])
    learn.remove_cb(ProgressCallback)
    learn.logger = lambda *a, **k: None
    return learn, writers, dash


def _one_fit(task, arm: str, epochs: int) -> dict:
    # The previous fit's Learner (reference cycles, a figure) is collected here, not during this fit.
    gc.collect()
    learn, writers, dash = _learner(task, arm)
    wire0 = (_Wire.bytes, _Wire.messages, _Wire.seconds, _Wire.buffer_bytes)
    w0, c0 = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(io.StringIO()):  # the static summary
        learn.fit_one_cycle(epochs, LR)
    out = {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0,
           "writers_s": sum(w.busy_s for w in writers) if writers else 0.0}
    if dash is not None:
        busy = dash.__dict__.get("busy", {})
        # Opening the widget happens in before_train, updates in before_batch and after_epoch, the final
        # figure in after_fit.
        out |= {"dashboard_s": dash.busy_s, "dashboard_open_s": busy.get("before_train", 0.0),
                "dashboard_updates_s": busy.get("before_batch", 0.0) + busy.get("after_epoch", 0.0),
                "dashboard_finish_s": busy.get("after_fit", 0.0), "dashboard_busy": busy,
                "pushes": dash.n_pushes, "failures": dash.n_failures,
                "wire_bytes": _Wire.bytes - wire0[0], "wire_buffer_bytes": _Wire.buffer_bytes - wire0[3],
                "wire_messages": _Wire.messages - wire0[1],
                "wire_encode_s": _Wire.seconds - wire0[2]}
    return out


def overhead(n_samples: int, epochs: int, repeats: int, arms: tuple = ARMS) -> dict:
    from effilab.datasets import mnist1d

    _install_encoding_comm()
    task = mnist1d(n_samples=n_samples, seed=0)
    for arm in ("none", "live"):  # warm-up: imports, plotly.js read, the first widget
        _one_fit(task, arm, 1)
    runs = {arm: [] for arm in arms}
    for r in range(repeats):
        order = arms[r % len(arms):] + arms[:r % len(arms)]
        for arm in order:
            runs[arm].append(_one_fit(task, arm, epochs))
            print(f"  {epochs} epochs, repeat {r + 1}/{repeats} {arm:17s} {runs[arm][-1]['wall_s']:.2f} s",
                  flush=True)
    return {"n_samples": n_samples, "epochs": epochs, "repeats": repeats, "runs": runs}


def overhead_rows(res: dict) -> list[list]:
    runs = res["runs"]
    base_wall = median([r["wall_s"] for r in runs["none"]])
    base_cpu = median([r["cpu_s"] for r in runs["none"]])
    rows = []
    for arm in [a for a in ARMS if a in runs]:
        rs = runs[arm]
        wall, cpu = median([r["wall_s"] for r in rs]), median([r["cpu_s"] for r in rs])
        own = median([r.get("dashboard_s", 0.0) + r["writers_s"] for r in rs])
        parts = [median([r.get(f"dashboard_{k}_s", 0.0) for r in rs]) for k in ("open", "updates", "finish")]
        pushes = median([r.get("pushes", 0) for r in rs])
        per_update = median([1e3 * r["dashboard_updates_s"] / r["pushes"] for r in rs if r.get("pushes")]
                            or [0])
        kb = median([r.get("wire_bytes", 0) for r in rs]) / 1e3
        buffer_kb = median([r.get("wire_buffer_bytes", 0) for r in rs]) / 1e3
        live = arm in ("live", "live_unthrottled")
        # Paired: each repeat runs every arm once, back to back, so a ratio within a repeat cancels the
        # machine's slower and faster minutes, which move whole-fit medians by several percent here.
        ratios = [r["cpu_s"] / b["cpu_s"] - 1 for r, b in zip(rs, runs["none"])]
        lo, hi = _bootstrap_median_ci(ratios)
        rows.append([ARM_TITLES[arm], f"{wall:.2f}", pct(wall / base_wall - 1) if arm != "none" else "",
                     f"{cpu:.2f}", pct(cpu / base_cpu - 1) if arm != "none" else "",
                     f"{pct(median(ratios))} ({pct(lo)} to {pct(hi)})" if arm != "none" else "",
                     f"{own:.3f} ({own / wall:.1%})",
                     " / ".join(f"{x:.3f}" for x in parts) if arm in ("static", *ARMS[3:]) else "",
                     f"{pushes:.0f}" if live else "", f"{per_update:.1f}" if live else "",
                     f"{kb:,.0f} + {buffer_kb:,.0f}" if kb else ""])
    return rows


def _bootstrap_median_ci(xs: list, level: float = 0.9, n: int = 2000) -> tuple[float, float]:
    """A percentile bootstrap interval for the median of `xs` (seeded: the table is reproducible)."""
    import random

    rng = random.Random(0)
    meds = sorted(median(rng.choices(xs, k=len(xs))) for _ in range(n))
    return meds[int((1 - level) / 2 * n)], meds[int((1 + level) / 2 * n) - 1]


OVERHEAD_HEADERS = ["arm", "fit wall (s, median)", "vs none", "fit CPU (s)", "vs none",
                    "vs none, paired: median of per-repeat ratios (90% bootstrap interval)",
                    "in dashboard + writers (s, share of fit)", "dashboard: open / updates / end (s)",
                    "updates", "ms / update", "sent (KB, JSON + binary)"]


# ---- part 0: the cost of one draw, without training


def draw_cost(repeats: int, draws: int = 40) -> dict:
    """CPU time of the live widget's three kinds of work on synthetic telemetry (a 30-epoch fit, 10 epochs in,
    ~250 points per stream): opening it (figure and widget), rebuilding its figure (a panel appeared), and
    one draw with one record more per stream (`figure_delta` + `LiveFigure.update`). Medians over repeats."""
    from effilab.viz import figures as F
    from effilab.viz.live import LiveFigure
    from tests.viz import synthetic_telemetry

    _install_encoding_comm()

    def grow(t, i):
        t.record("schedule", "step", iter=10_000 + i, pct=0.4 + i * 1e-4, lr=1e-3, mom=0.9)
        t.record("fit", "step", iter=10_000 + i, epoch=10, pct=0.4 + i * 1e-4, train_loss=0.5)
        t.record("system", "step", time_s=100.0 + i, iter=10_000 + i, samples_per_s=2000.0, data_wait_frac=0.05,
                 rss_mb=500.0)

    def snap(t):
        s = F.snapshot(t)
        return s, F.cells(s)

    out = {k: [] for k in ("open_ms", "rebuild_ms", "draw_ms", "draw_json_kb", "draw_buffer_kb", "open_json_kb",
                           "open_buffer_kb")}
    LiveFigure(F.figure_dict(synthetic_telemetry())).close()  # imports, plotly.js read once
    for _ in range(repeats):
        t = synthetic_telemetry(n_epoch=30, epochs_done=10, steps_per_epoch=100)
        w0, c0 = (_Wire.bytes, _Wire.buffer_bytes), time.process_time()
        s, cs = snap(t)
        widget = LiveFigure(F.figure_dict(s, scrub=False, cell_list=cs, live=True), F.status_line(s), 0.3)
        sent = {}
        F.figure_delta(s, cs, sent)
        out["open_ms"].append(1e3 * (time.process_time() - c0))
        out["open_json_kb"].append((_Wire.bytes - w0[0]) / 1e3)
        out["open_buffer_kb"].append((_Wire.buffer_bytes - w0[1]) / 1e3)
        c0 = time.process_time()
        s, cs = snap(t)
        widget.figure = F.figure_dict(s, scrub=False, cell_list=cs, live=True)
        out["rebuild_ms"].append(1e3 * (time.process_time() - c0))
        w0, c0 = (_Wire.bytes, _Wire.buffer_bytes), time.process_time()
        for i in range(draws):
            grow(t, i)
            s, cs = snap(t)
            widget.update(*F.figure_delta(s, cs, sent), F.status_line(s), 0.3)
        out["draw_ms"].append(1e3 * (time.process_time() - c0) / draws)
        out["draw_json_kb"].append((_Wire.bytes - w0[0]) / draws / 1e3)
        out["draw_buffer_kb"].append((_Wire.buffer_bytes - w0[1]) / draws / 1e3)
        widget.layout.close()
        widget.close()
    return out


def dispatch_cost(calls: int = 200_000) -> list[list]:
    """What fastai's call of a callback costs for a per-batch event it has no handler for, per call (a hot loop,
    medians of 5): fastai calls every callback at every event, ~10 events a batch."""
    import timeit

    from fastai.callback.core import Callback

    from benchmarks.common import make_learner
    from effilab.datasets import mnist1d
    from effilab.system.fit_recorder import FitRecorder
    from effilab.system.monitor import SystemMonitor
    from effilab.viz.dashboard import Dashboard

    class PlainCallback(Callback):
        pass

    cbs = [FitRecorder(), SystemMonitor(), Dashboard(mode="static"), PlainCallback()]
    learn = make_learner(mnist1d(n_samples=1_000, seed=0), BS, seed=0, cbs=cbs)
    with contextlib.redirect_stdout(io.StringIO()):
        learn.fit(1, LR)
    learn.training = True
    rows = []
    for cb in cbs:
        call = functools.partial(cb, "after_pred")
        us = median([timeit.timeit(call, number=calls) / calls * 1e6 for _ in range(5)])
        rows.append([type(cb).__name__, f"{us:.2f}"])
    return rows


# ---- part 2: browser lag

JS_SAMPLER = """(selector) => {
  window.__effilabLag = [];
  window.__effilabTimer = setInterval(() => {
    const gd = document.querySelector(selector);
    let n = null;
    if (gd && gd.data) {
      const tr = gd.data.find(t => t.name === 'schedule/lr: actual');
      n = tr ? (tr.y || []).length : 0;
    }
    window.__effilabLag.push([Date.now() / 1000, n]);
  }, 50);
}"""


def _lag_stats(kernel: dict, samples: list) -> dict:
    recs = kernel["records"]  # (time, records so far), one per change
    fit_end = kernel["fit_start"] + kernel["fit_s"]
    seen = [(t, n) for t, n in samples if n is not None]
    if not seen:
        return {"error": "the page never drew the live dashboard"}
    first_seen = seen[0][0]
    pts, stale = [], []
    j = 0
    for t, n in seen:
        if t > fit_end:
            break
        while j + 1 < len(recs) and recs[j + 1][0] <= t:
            j += 1
        have = recs[j][1] if recs and recs[0][0] <= t else 0
        pts.append(have - n)
        # time since the oldest record not yet drawn reached the telemetry
        first_undrawn = next((rt for rt, rn in recs if rn > n), None)
        stale.append(max(0.0, t - first_undrawn) if have > n and first_undrawn is not None else 0.0)
    # update sent -> drawn: for updates that brought new schedule points
    latency, prev = [], None
    for tp, _, drawn in kernel["pushes"]:
        if tp < first_seen or drawn == prev:
            prev = drawn
            continue
        prev = drawn
        hit = next((t for t, n in seen if t >= tp and n >= drawn), None)
        if hit is not None:
            latency.append(hit - tp)

    def q(xs, p):
        if not xs:
            return None
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]

    half = len(stale) // 2
    return {"fit_s": kernel["fit_s"], "updates": kernel["n_pushes"],
            "updates_per_s": kernel["n_pushes"] / kernel["fit_s"],
            "first_drawn_after_fit_start_s": first_seen - kernel["fit_start"],
            "first_update_after_fit_start_s": (kernel["pushes"][0][0] - kernel["fit_start"]
                                               if kernel["pushes"] else None),
            "samples": len(pts), "lag_points_median": q(pts, 0.5), "lag_points_p95": q(pts, 0.95),
            "lag_points_max": max(pts) if pts else None, "stale_s_median": q(stale, 0.5),
            "stale_s_p95": q(stale, 0.95), "stale_s_max": max(stale) if stale else None,
            "stale_s_p95_first_half": q(stale[:half], 0.95), "stale_s_p95_second_half": q(stale[half:], 0.95),
            "update_to_drawn_s_median": q(latency, 0.5), "update_to_drawn_s_p95": q(latency, 0.95),
            "update_to_drawn_n": len(latency)}


def browser_lag(quick: bool, throttles: list[float]) -> dict:
    from tests.browser import lab as L

    if reason := L.missing_browser():
        return {"skipped": reason}
    nb = ROOT / "tests" / "browser" / "dashboard_live.ipynb"
    out = {}
    for max_per_s in throttles:
        env = {"EFFILAB_LIVE_EPOCHS": "12" if quick else "30", "EFFILAB_LIVE_MAX_PER_S": str(max_per_s)}
        with tempfile.TemporaryDirectory(prefix="effilab-lag-") as tmp:
            with L.Lab(Path(tmp), [nb], env=env) as lab, L.browser_page() as page:
                L.open_notebook(page, lab, nb.name)
                page.evaluate(JS_SAMPLER, L.LIVE_PLOT)
                L.run_all(page)
                log_path = lab.root / "kernel_log.json"
                deadline = time.monotonic() + 300
                while not log_path.exists() or L.kernel_busy(page):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the notebook did not finish: {L.cell_errors(page)}")
                    time.sleep(0.5)
                samples = page.evaluate(
                    "() => { clearInterval(window.__effilabTimer); return window.__effilabLag; }")
                kernel = json.loads(log_path.read_text())
        out[str(max_per_s)] = _lag_stats(kernel, samples) | {"max_per_s": max_per_s,
                                                             "min_step_ms": kernel.get("min_step_ms")}
        print(f"  browser, max_per_s={max_per_s}: {json.dumps(out[str(max_per_s)])}", flush=True)
    return out


def _f(v, fmt="{:.2f}"):
    return "" if v is None else fmt.format(v)


def lag_rows(res: dict) -> list[list]:
    rows = []
    for r in res.values():
        if "max_per_s" not in r:
            continue
        rows.append([("unthrottled" if r["max_per_s"] == 0 else f"{r['max_per_s']:g} / s"),
                     _f(r["fit_s"], "{:.1f}"), f"{r['updates']} ({r['updates_per_s']:.1f}/s)",
                     _f(r["first_drawn_after_fit_start_s"], "{:.1f}"),
                     f"{_f(r['lag_points_median'], '{:.0f}')} / {_f(r['lag_points_p95'], '{:.0f}')} / "
                     f"{_f(r['lag_points_max'], '{:.0f}')}",
                     f"{_f(r['stale_s_median'])} / {_f(r['stale_s_p95'])} / {_f(r['stale_s_max'])}",
                     f"{_f(r['stale_s_p95_first_half'])} / {_f(r['stale_s_p95_second_half'])}",
                     f"{_f(r['update_to_drawn_s_median'])} / {_f(r['update_to_drawn_s_p95'])}"])
    return rows


LAG_HEADERS = ["throttle", "fit (s)", "updates sent", "first drawn (s after fit start)",
               "lag, points (median / p95 / max)", "lag, s (median / p95 / max)",
               "lag p95, first / second half (s)", "update -> drawn (s, median / p95)"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--repeats", type=int, default=None, help="fits per arm (default 5; 2 with --quick)")
    p.add_argument("--epochs", type=int, nargs="+", default=None,
                   help="fit lengths for part 1 (default 6 and 24 epochs; 2 with --quick)")
    p.add_argument("--no-browser", action="store_true", help="skip part 2 (JupyterLab + Chromium)")
    p.add_argument("--browser-only", action="store_true", help="skip part 1 (the in-process overhead)")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS),
                   help="the arms of part 1 (default: all; 'none' is always run, as the reference)")
    p.add_argument("--draw-only", action="store_true", help="only the cost of one draw (no training, no browser)")
    p.add_argument("--dispatch-only", action="store_true",
                   help="only the cost of fastai calling a callback for an event it does not handle")
    p.add_argument("--throttles", type=float, nargs="+", default=[4.0, 0.0],
                   help="max_per_s values for the browser part (0: unthrottled)")
    args = p.parse_args(argv)
    apply_threads(args)
    repeats = args.repeats or (2 if args.quick else 5)
    m = machine()
    print(f"machine: {machine_line(m)}; load average {m['loadavg']}")
    t0 = time.time()
    n_samples = 4_000 if args.quick else 20_000
    payload = {"overhead": [], "overhead_tables": []}
    name = "dashboard_overhead" + ("_quick" if args.quick else "")
    if args.dispatch_only:
        rows = dispatch_cost()
        print("\nfastai calling a callback for a per-batch event it has no handler for (after_pred), per call\n")
        print(table(["callback", "us / call (median of 5 x 200,000)"], rows))
        write_json("dashboard_dispatch_cost", {"table": rows})
        return
    if args.draw_only:
        res = draw_cost(repeats)
        rows = [[k, f"{median(v):.2f}"] for k, v in res.items()]
        print("\nThe live widget's work (synthetic 30-epoch fit, 10 epochs in), CPU ms and KB sent, medians\n")
        print(table(["what", "median"], rows))
        write_json("dashboard_draw_cost", {"draw_cost": res, "table": rows, "loadavg_end": list(os.getloadavg())})
        return
    for epochs in [] if args.browser_only else args.epochs or ([2] if args.quick else [6, 24]):
        res = overhead(n_samples, epochs, repeats, tuple(a for a in ARMS if a == "none" or a in args.arms))
        rows = overhead_rows(res)
        print(f"\nPart 1: MNIST-1D {n_samples:,}, MLP 256, InfoBatch(0.5), fit_one_cycle({epochs}), "
              f"batch {BS}, {repeats} interleaved fits per arm\n")
        print(table(OVERHEAD_HEADERS, rows))
        payload["overhead"].append(res)
        payload["overhead_tables"].append(rows)
        write_json(name, payload)
    if not args.no_browser:
        lag = browser_lag(args.quick, args.throttles)
        payload |= {"browser": lag}
        if "skipped" in lag:
            print(f"\nPart 2 skipped: {lag['skipped']}")
        else:
            payload["browser_table"] = lrows = lag_rows(lag)
            print("\nPart 2: the real browser (JupyterLab, headless Chromium)\n")
            print(table(LAG_HEADERS, lrows))
    payload["total_s"] = time.time() - t0
    payload["loadavg_end"] = list(os.getloadavg())
    path = write_json(name, payload)
    print(f"\nwrote {path} ({payload['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
