"""The live training dashboard: one widget (`effilab.viz.live.LiveFigure`) updated while fastai trains, or a
static figure and a text summary at the end of the fit where no front end draws widgets."""

from __future__ import annotations

import sys
import time
import warnings

from fastai.learner import Learner

from ..callback import EffilabCallback, telemetry_of
from . import figures as F
from .mode import ModeChoice, decide_mode, in_kernel

__all__ = ["NO_WIDGETS_NOTE", "Dashboard", "Throttle", "announce_busy", "enable_colab_widgets"]

# What a front end that can't draw widgets shows in the widget's place (instead of an empty box or a repr).
NO_WIDGETS_NOTE = ("effilab dashboard: this front end does not draw widgets; the figure appears here at the end "
                   "of the fit")
BUSY_EVERY_S = 1.0  # how often a running fit re-states that the kernel is busy (see `announce_busy`)


class Throttle:
    """Lets through at most `max_per_s` calls per second; a forced call always passes (and restarts the
    interval). `clock` is injectable for tests."""

    def __init__(self, max_per_s: float = 2.0, clock=time.monotonic):
        self.interval = 1.0 / max_per_s if max_per_s > 0 else 0.0
        self.clock = clock
        self.last = float("-inf")

    def __call__(self, force: bool = False) -> bool:
        now = self.clock()
        if force or now - self.last >= self.interval:
            self.last = now
            return True
        return False


class Dashboard(EffilabCallback):
    """A live panel of the fit in the notebook: training curves, data decisions, schedules, memory and
    throughput, drawn from `learn.telemetry` only.

    **Use.** `Learner(dls, model, cbs=[InfoBatch(0.5), Dashboard()])`, or `learn.dashboard()` (adds it
    and returns the Learner). It adds the telemetry writers it draws from (`FitRecorder`,
    `SystemMonitor`) when the Learner lacks them: for good when it comes with the Learner (or through
    `learn.dashboard()`), for one fit when it is passed to `fit(cbs=...)` (they leave with it, also after an
    interruption). A panel appears only when it has data: training loss (with a `SyncFreeRecorder`, its
    host reads: the dashboard makes none of its own) and metrics; data decisions (score histogram kept /
    rescaled / pruned with the threshold, kept fraction per epoch) for InfoBatch and any technique reporting
    a score histogram; planned (dashed) vs actual (solid) schedules; memory (CUDA allocated / reserved /
    peak, or process RSS without a GPU, said in the panel's title); throughput, model FLOPs utilisation and
    data-wait fraction, samples forwarded vs full data, time left. After the fit, a slider scrubs the
    histogram through the epochs.

    **Mode** (`mode=None` chooses; first match wins): the `mode` argument (`"live"`, `"static"`,
    `"off"`) > environment variable `EFFILAB_DASHBOARD` > `CI` set: static > not in a Jupyter kernel:
    static > a widget front end (`JPY_SESSION_NAME`: JupyterLab / Notebook 7, `VSCODE_PID`: VS Code,
    Colab): live > static (papermill, nbclient). See `effilab.viz.mode`.

    - *live*: one widget (`effilab.viz.live.LiveFigure`: a plotly.js figure of subplots under a header
      line with a progress bar and the status, CSS class `effilab-dashboard`); redrawn when the telemetry
      changed, at most `max_per_s` times per second and only while the CPU time spent drawing stays within
      `budget` (a share, default 1%) of the fit's time so far: the drawing rate follows the measured cost of
      a draw against the training steps, on any machine (sending a new figure when a panel appears, a few
      times per fit, is not held against the budget). A draw sends only the traces whose data changed, as
      binary arrays, in one message; the figure fills its box's width. At the end of the fit the widget is
      replaced, through its display handle, by the static figure, so a saved notebook shows the result.
    - *static*: no widget; at the end of the fit the figure (when in a kernel) and a text summary.
    - *off*: nothing.

    `save_html(path)` writes a self-contained report of the latest fit (`effilab.viz.report_html`).
    Drawing never stops training: a failure is reported once per fit as a warning. The last fit's figure
    and summary stay in `final_figure` and `final_summary`.
    """

    order, run_valid = 95, False  # after the telemetry writers (FitRecorder 55, SystemMonitor 90)
    _direct = frozenset({"before_batch"})  # called without fastai's dispatch: it checks that the fit trains
    # Widgets, display handles and the last figure stay out of pickles (`learn.export`).
    _stateattrs = ("_widget", "_handle", "final_figure", "_added")

    def __init__(self, mode: str | None = None, max_per_s: float = 4.0, clock=time.monotonic,
                 budget: float = 0.01):
        # Types are checked from the annotations (EffilabCallback); the values here.
        decide_mode(mode, env={}, kernel=False)  # a wrong mode fails here, not in the middle of a fit
        for name, v in (("max_per_s", max_per_s), ("budget", budget)):
            if not (0 <= v < float("inf")):
                raise ValueError(f"Dashboard({name}=...) must be a finite number >= 0, got {v!r}")
        self.mode_arg, self.max_per_s, self.clock, self.budget = mode, max_per_s, clock, budget
        self.mode, self.mode_reason, self.final_summary = None, "", ""
        self.n_pushes = self.n_rebuilds = self.n_failures = 0
        self._init_state()

    def _init_state(self):
        super()._init_state()
        self.final_figure = self._widget = self._handle = None
        self._running, self._warned, self._seen, self._key, self._sent = False, False, -1, None, {}
        self._added = []  # the writers this fit added, removed when it ends
        self._throttle = Throttle(self.max_per_s, self.clock) if hasattr(self, "max_per_s") else None
        # Drawing budget: CPU seconds spent drawing this fit, since when (wall-clock), and when a draw may start.
        self._busy_s, self._t_start, self._next_t = 0.0, 0.0, float("-inf")
        self._busy_t = self._due = float("-inf")
        self._max_draw_s = 0.0

    # `learn.dashboard()` when the Learner already has one: adjust it, return the Learner.
    def __call__(self, event_name: str | None = None, mode: str | None = None,
                 max_per_s: float | None = None):
        if event_name is not None:
            return super().__call__(event_name)
        if mode is not None:
            decide_mode(mode, env={}, kernel=False)
            self.mode_arg = mode
        if max_per_s is not None:
            self.max_per_s = max_per_s
        return self.learn

    # ---- events
    def after_create(self):
        self._guard("adding the telemetry writers", self._ensure_writers)

    def before_fit(self):
        if self._running:  # the last fit was interrupted: close its widget, show what it recorded
            self._running = False
            self._guard("finishing the interrupted fit's dashboard", self._finish)
        if self._lr_finding():
            return
        self._guard("adding the telemetry writers", self._ensure_writers, True)
        try:
            self.mode, self.mode_reason = decide_mode(self.mode_arg)
        except ValueError as e:  # a bad EFFILAB_DASHBOARD: say so, don't stop the fit
            warnings.warn(f"Dashboard: {e}; using the static dashboard", RuntimeWarning, stacklevel=2)
            self.mode, self.mode_reason = ModeChoice("static", "invalid environment setting")
        self._warned, self._seen, self._key = False, -1, None
        self._throttle = Throttle(self.max_per_s, self.clock)
        self._busy_s, self._t_start, self._next_t = 0.0, time.perf_counter(), float("-inf")
        self._busy_t = self._due = float("-inf")
        self._max_draw_s = 0.0
        if self.mode == "live":
            self._guard("loading the live widget", self._preload)

    def before_train(self):
        # Started here, not in before_fit: `validate()` and `get_preds()` fire before_fit too.
        if self.mode in (None, "off") or self._lr_finding():
            return
        if not self._running:
            self._running = True
            if self.mode == "live":
                # Not counted against the drawing budget: on a short fit it would hold back the first draw.
                self._guard("opening the live dashboard", self._open_widget)
                if self._widget is None:  # no widget after all: the static figure at the end instead
                    self.mode, self.mode_reason = "static", "the live widget could not be opened"

    def before_batch(self):
        # Here rather than in after_batch: SystemMonitor counts the time between a batch's end and the next
        # batch's start as waiting for data, and drawing is not the loader's fault. One clock read per batch
        # until something is due; `learn.training` (two delegations) is read only then.
        if self._widget is not None and (now := self.clock()) >= self._due and self.run and self.learn.training:
            if now >= self._busy_t:
                self._busy_t = now + BUSY_EVERY_S
                self._guard("telling the front end the kernel is busy", announce_busy)
            if now >= self._next_t:
                self._push()
            self._schedule()

    def after_epoch(self):
        if self._widget is not None and self._running and self.clock() >= self._next_t:
            self._push(force=True)

    def after_fit(self):
        if self._running:
            self._running = False
            # No last update: the widget is replaced by the final figure right away.
            self._guard("drawing the final figure", self._finish)
        self._remove_writers()

    def after_cancel_fit(self):
        # An interrupted fit (an error, Ctrl-C, CancelFitException): what it recorded replaces the widget.
        self.after_fit()

    # ---- public
    def save_html(self, path) -> str:
        """Write the latest fit's report (figure and summary, plotly.js embedded) to `path`."""
        if self.learn is None:
            raise ValueError("this Dashboard is not attached to a Learner: call effilab.viz.report_html("
                             "learn.telemetry, path) instead")
        return F.report_html(telemetry_of(self.learn), path)

    def state_dict(self) -> dict:
        return {}  # nothing to resume: the telemetry travels with checkpoints

    def load_state_dict(self, state: dict) -> None:
        pass

    # ---- internals
    def _lr_finding(self) -> bool:
        return hasattr(self.learn, "lr_finder")

    def _guard(self, what: str, fn, *args):
        """Run a drawing step; a failure becomes one warning per fit, never an exception in training."""
        try:
            return fn(*args)
        except Exception as e:
            self.n_failures += 1
            if not self._warned:
                self._warned = True
                warnings.warn(f"Dashboard: {what} failed ({type(e).__name__}: {e}); training goes on without "
                              "the dashboard's update", RuntimeWarning, stacklevel=3)
            return None

    def _ensure_writers(self, in_fit: bool = False):
        """Add the writers the Learner lacks: for good when the Dashboard is created with the Learner (or
        by `learn.dashboard()`), for this fit only when it joins at a fit (`fit(cbs=...)`, `add_cb`)."""
        try:
            from ..system.fit_recorder import FitRecorder
            from ..system.monitor import SystemMonitor
        except ImportError:
            return
        for cls in (FitRecorder, SystemMonitor):
            if not any(isinstance(cb, cls) for cb in self.learn.cbs):
                cb = cls()
                self.learn.add_cb(cb)
                if in_fit:  # the Learner is past this event for the callbacks it had when it started
                    self._added.append(cb)
                    cb("before_fit")

    def _remove_writers(self):
        added, self._added = self._added, []
        for cb in added:
            if cb.learn is not None:
                cb("after_fit")  # after an interruption its own after_fit would come too late (or never)
                self.learn.remove_cb(cb)

    @staticmethod
    def _preload():
        # Importing anywidget and reading plotly.js take ~1 s the first time: paid before training starts,
        # where the system monitor would count it as time spent waiting for data.
        from . import live

        live._plotly_js()
        enable_colab_widgets()

    def _open_widget(self):
        t = F.snapshot(telemetry_of(self.learn))
        cs = F.cells(t)
        try:
            from .live import LiveFigure
        except ImportError as e:
            warnings.warn(f"Dashboard: the live widget needs anywidget and ipywidgets ({e}); showing a "
                          "static figure at the end of the fit instead", RuntimeWarning, stacklevel=2)
            self._warned = True
            return
        widget = LiveFigure(F.figure_dict(t, scrub=False, cell_list=cs, live=True), F.status_line(t),
                            _progress(F.status(t)))
        self._widget, self._key, self._seen, self._sent = widget, F.layout_key(cs), t.version, {}
        F.figure_delta(t, cs, self._sent)  # what the new figure holds: sent
        if in_kernel():
            from IPython.display import display

            # The standard widget mime type, and a one-line note as the text a front end without widgets
            # shows instead (the final figure replaces both through the display handle).
            # (Built here: ipywidgets' own bundle would pretty-print the whole figure for a text/plain part
            # that is replaced anyway, ~10 ms per fit.)
            bundle = {"application/vnd.jupyter.widget-view+json": {"version_major": 2, "version_minor": 0,
                                                                    "model_id": widget.model_id},
                      "text/plain": NO_WIDGETS_NOTE}
            self._handle = display(bundle, raw=True, display_id=True)

    def _push(self, force: bool = False):
        t = telemetry_of(self.learn)
        if t.version == self._seen:
            return
        if not self._throttle(force):
            self._next_t = max(self._next_t, self._throttle.last + self._throttle.interval)
            return
        self._seen = t.version
        # The draw's CPU time, not its wall-clock: on a shared machine a draw that waits while another
        # process has the CPU took nothing from training, and charging the wait held draws back for seconds.
        t0, rebuilds = time.thread_time(), self.n_rebuilds
        self._guard("updating the live dashboard", self._redraw, t)
        self._spent(t0, counted=self.n_rebuilds == rebuilds)

    def _spent(self, t0: float, counted: bool = True) -> None:
        """Count a draw that started at thread CPU time `t0` against the budget; the next may start once the
        CPU time spent drawing is back within `budget` of the fit's wall-clock time (and, by `max_per_s`, not
        before the throttle allows).

        A draw that sent a new figure (panels appeared: a few times per fit, most in its first seconds, like
        opening the widget) is not `counted`: in a kernel it takes ~20-25 ms (the whole figure as JSON), which
        at 1% held back every draw for the next 2-2.5 s, just when the panels fill."""
        cpu = time.thread_time() - t0
        self._busy_s += cpu if counted else 0.0
        self._max_draw_s = max(self._max_draw_s, cpu)
        if self.budget > 0:
            wait = self._t_start + self._busy_s / self.budget - time.perf_counter()  # seconds until within budget
            self._next_t = self.clock() + max(0.0, wait)
        self._schedule()

    def _schedule(self) -> None:
        """When `before_batch` next has something to do: a draw (budget and throttle) or a busy status."""
        draw = max(self._next_t, self._throttle.last + self._throttle.interval)
        self._due = min(draw, self._busy_t)

    def _redraw(self, t):
        widget = self._widget
        if widget is None:
            return
        snap = F.snapshot(t)  # one read of the store for this push
        cs = F.cells(snap)
        key = F.layout_key(cs)
        if key != self._key:  # panels appeared: same widget, new subplot grid
            widget.figure = F.figure_dict(snap, scrub=False, cell_list=cs, live=True)
            self._key, self._sent = key, {}
            F.figure_delta(snap, cs, self._sent)  # what the new figure holds: sent
            groups, layout = [], {}
            self.n_rebuilds += 1
        else:
            groups, layout = F.figure_delta(snap, cs, self._sent)
        widget.update(groups, layout, F.status_line(snap), _progress(F.status(snap)))
        self.n_pushes += 1

    def _finish(self):
        t = F.snapshot(telemetry_of(self.learn))
        fig = summary = None
        try:
            summary = F.summary_text(t)
            fig = F.build_figure(t)
        finally:
            self.final_figure, self.final_summary = fig, summary or ""
            if self.mode == "live":
                handle, self._handle = self._handle, None
                try:
                    if handle is not None and fig is not None:
                        # Replaces the widget's output: a saved notebook keeps the figure, not the widget.
                        handle.update(F.figure_bundle(fig), raw=True)
                finally:
                    self._close_widget()
            elif self.mode == "static" and fig is not None and in_kernel():
                from IPython.display import display

                display(F.figure_bundle(fig), raw=True)
            if summary and self.mode != "off":
                print(summary)

    def _close_widget(self):
        widget, self._widget = self._widget, None
        if widget is not None:
            widget.layout.close()  # a widget's layout is a widget of its own, with a comm of its own
            widget.close()


def _progress(status: dict) -> float:
    return float(min(1.0, max(0.0, status["pct"] or 0.0)))


def announce_busy() -> bool:
    """Publish the kernel's "busy" status for the running cell; returns whether there was a kernel to do it.

    JupyterLab shows the kernel status of the latest status message, and ipykernel publishes "idle" after
    every control-channel request, including the `create_subshell_request` that the widget manager sends
    when the dashboard's widget is first drawn: without this the kernel shows "Idle" for the rest of the
    fit. Re-stating "busy" (true: the cell still runs) while the live dashboard is open puts that right.
    """
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    publish = getattr(getattr(shell, "kernel", None), "_publish_status", None)
    if publish is None:
        return False
    publish("busy", "shell")
    return True


def enable_colab_widgets(modules=None) -> bool:
    """In Colab (`google.colab` imported), turn on its custom widget manager, which third-party widgets such
    as plotly's FigureWidget need; returns whether it did."""
    global _colab_widgets_enabled
    modules = sys.modules if modules is None else modules
    if "google.colab" not in modules:
        return False
    if not _colab_widgets_enabled:  # once per kernel
        from google.colab import output

        output.enable_custom_widget_manager()
        _colab_widgets_enabled = True
    return True


_colab_widgets_enabled = False


def dashboard(self: Learner, mode: str | None = None, max_per_s: float | None = None) -> Learner:
    """Add a `Dashboard` (and the telemetry writers it draws from) to this Learner; returns the Learner.

    Once added, `learn.dashboard` is the callback (`learn.dashboard.save_html(path)`), and calling it
    again (`learn.dashboard(mode="static")`) changes the settings given."""
    existing = next((cb for cb in self.cbs if isinstance(cb, Dashboard)), None)
    if existing is not None:
        return existing(None, mode=mode, max_per_s=max_per_s)
    cb = Dashboard(mode, 4.0 if max_per_s is None else max_per_s)
    self.add_cb(cb)
    cb._guard("adding the telemetry writers", cb._ensure_writers)
    return self


Learner.dashboard = dashboard
