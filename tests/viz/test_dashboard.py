"""The Dashboard callback on real tiny fits: static and live (headless) modes, throttling, failures that
must not stop training, a second fit, and the dashboard notebook run by papermill."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
from fastai.callback.core import Callback

from effilab.callback import telemetry_of
from effilab.data import InfoBatch
from effilab.system.fit_recorder import FitRecorder
from effilab.system.monitor import SystemMonitor
from effilab.viz import figures as F
from effilab.viz.dashboard import Dashboard, Throttle
from effilab.viz.mode import ENV_VAR

from ..conftest import make_learner

ROOT = Path(__file__).resolve().parents[2]
N, BS = 128, 32  # 4 training batches per epoch: the fits below take a second or two


@pytest.fixture(autouse=True)
def _no_mode_from_the_environment(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv("CI", raising=False)


@pytest.fixture(autouse=True)
def _one_thread():
    # These models are tiny: extra intra-op threads only add contention, which on a busy 2-core machine
    # made a fit 25x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _widget_count() -> int:
    from ipywidgets.widgets import widget

    return len(widget._instances)


class FakeClock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_throttle_lets_two_per_second_through_plus_forced():
    clock = FakeClock()
    th = Throttle(max_per_s=2.0, clock=clock)
    passed = 0
    for i in range(100):  # 100 calls within one second
        clock.t = i / 100
        passed += th()
    assert passed == 2
    assert th(force=True) and th(force=True)  # epoch ends and the final push always go
    clock.t = 0.995
    assert not th()  # ...and restart the interval
    clock.t = 1.5
    assert th()
    assert sum(Throttle(0, clock)() for _ in range(10)) == 10  # max_per_s=0: no throttling


def test_static_fit_draws_no_widget_and_prints_a_summary(monkeypatch, capsys, tmp_path):
    from effilab.viz import live

    def no_widget(*a, **k):
        raise AssertionError("a live widget was created in static mode")

    monkeypatch.setattr(live.LiveFigure, "__init__", no_widget)
    before = _widget_count()
    dash = Dashboard()  # auto: pytest is no kernel, so static
    learn = make_learner([InfoBatch(0.5, delta=0.75, seed=0), dash], n=N, bs=BS)
    assert sum(isinstance(cb, (FitRecorder, SystemMonitor)) for cb in learn.cbs) == 2  # writers added
    # A memory reading every step: this fit is shorter than the monitor's default interval, and a panel
    # without a reading is not drawn.
    next(cb for cb in learn.cbs if isinstance(cb, SystemMonitor)).every_s = 0.0
    learn.fit_one_cycle(3, 1e-2)
    assert dash.mode == "static" and "kernel" in dash.mode_reason
    assert _widget_count() == before and dash.n_pushes == 0
    out = capsys.readouterr().out
    assert "Training (fit 0): 3 of 3 epochs" in out and "Data decisions (infobatch)" in out
    fig = dash.final_figure
    names = {tr.name for tr in fig.data}
    assert {"loss: valid", "scores/infobatch: threshold", "schedule/lr: planned", "memory: rss"} <= names
    assert len(fig.layout.sliders[0].steps) == 3  # the epochs can be scrubbed
    path = dash.save_html(tmp_path / "run.html")
    html = Path(path).read_text()
    assert "plotly.js v" in html
    for title in ("Training: loss", "Data decisions (infobatch)", "Schedule: lr", "Memory", "Throughput"):
        assert title in html
    # validate() fires before_fit/after_fit too: no second summary, the figure stays
    learn.validate()
    assert capsys.readouterr().out == "" and dash.final_figure is fig


class _Probe(Callback):
    """Looks at the live widget at each epoch's end (after the Dashboard's push)."""

    order = 99

    def __init__(self, dash):
        self.dash, self.seen = dash, []

    def after_epoch(self):
        widget = self.dash._widget
        if widget is not None:
            valid = next(tr for tr in widget.figure["data"] if tr["name"] == "loss: valid")
            self.seen.append((len(valid["x"]), widget.header["status"], widget.header["progress"]))


def test_live_fit_headless_updates_throttled_then_second_fit(capsys):
    pytest.importorskip("anywidget")
    # The fit recorder writes every step, so every batch finds the telemetry changed.
    writers = [FitRecorder(every=1, max_per_s=1e9)]
    learn = make_learner([InfoBatch(0.5, delta=0.75, seed=0), *writers], n=N, bs=BS)
    # A fake clock that moves 0.01 s per training step: the fit lasts a "tenth of a second".
    dash = Dashboard(mode="live", clock=lambda: learn.train_iter * 0.01, budget=0)
    probe = _Probe(dash)
    learn.add_cbs([dash, probe])
    learn.fit_one_cycle(3, 1e-2)
    assert dash.mode == "live" and dash.n_failures == 0
    assert [n for n, _, _ in probe.seen] == [1, 2, 3]  # the widget followed every epoch
    assert probe.seen[-1][1].startswith("epoch 3/3 · 100%"), probe.seen  # the header's status line
    assert probe.seen[-1][2] == pytest.approx(1.0)
    # one unforced push (the first), three epoch ends, no final push (the final figure replaces the widget)
    assert dash.n_pushes == 4, dash.n_pushes
    assert dash._widget is None and dash.final_figure is not None  # the widget is closed, the figure stays
    assert "Training (fit 0)" in capsys.readouterr().out

    # Without throttling every telemetry change is drawn: many more pushes.
    dash.max_per_s, dash.clock = 0.0, lambda: 0.0
    pushes = dash.n_pushes
    learn.fit(2, 1e-3)  # a second fit on the same Learner
    assert dash.n_pushes - pushes >= 2 * 4 and dash.n_failures == 0  # at least one per step
    assert [n for n, _, _ in probe.seen[3:]] == [1, 2]  # a fresh widget for the second fit
    assert "Training (fit 1): 2 of 2 epochs" in capsys.readouterr().out
    assert list(next(tr for tr in dash.final_figure.data if tr.name == "loss: valid").x) == [1, 2]


def test_a_drawing_failure_warns_once_and_training_completes(monkeypatch):
    pytest.importorskip("anywidget")

    def broken(*a, **k):
        raise RuntimeError("boom")

    learn = make_learner([], n=N, bs=BS)
    dash = Dashboard(mode="live", max_per_s=0.0, budget=0)
    learn.add_cb(dash)
    monkeypatch.setattr(F, "build_figure", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        learn.fit(2, 1e-2)
    ours = [w for w in caught if "Dashboard" in str(w.message)]
    assert len(ours) == 1 and "boom" in str(ours[0].message)
    assert len(telemetry_of(learn).records("fit", "epoch")) == 2  # training went on
    monkeypatch.undo()
    # the failure does not stick: the next fit draws again, in live mode
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        learn.fit(1, 1e-2)
    assert not [w for w in caught if "Dashboard" in str(w.message)]
    assert dash.final_figure is not None and dash.n_pushes > 0


def test_live_draws_send_only_changed_traces_as_arrays(monkeypatch):
    """A draw is one message: the traces whose data changed (the planned schedules never again after the widget
    opened) as float32 binary buffers, and the header; the widget's own figure stays equal to the one built
    from the same telemetry (what a view opened later draws)."""
    pytest.importorskip("anywidget")
    import numpy as np

    from effilab.viz.live import LiveFigure

    sent = []
    original = LiveFigure.send

    def spy(self, content, buffers=None):
        names = [self.figure["data"][i]["name"] for g in content.get("groups", []) for i in g["traces"]]
        sent.append((content, list(buffers or []), names))
        return original(self, content, buffers)

    monkeypatch.setattr(LiveFigure, "send", spy)
    learn = make_learner([InfoBatch(0.5, seed=0), FitRecorder(every=1, max_per_s=1e9), SystemMonitor(every_s=0.0)],
                         n=N, bs=BS)
    dash = Dashboard(mode="live", max_per_s=0.0, budget=0)
    learn.add_cb(dash)
    compared = []

    class Compare(Callback):
        order = 94  # before the dashboard replaces its widget

        def after_fit(self):
            t = telemetry_of(self.learn)
            dash._seen = -1
            dash._push(force=True)
            built = F.figure_dict(F.snapshot(t), scrub=False, live=True)
            mine = dash._widget.figure
            assert [tr["name"] for tr in mine["data"]] == [tr["name"] for tr in built["data"]]
            for a, b in zip(mine["data"], built["data"]):
                for k in ("x", "y"):
                    assert np.allclose(np.asarray(a[k], dtype=float), np.asarray(b[k], dtype=float)), (a["name"], k)
            assert mine["layout"]["title"] == built["layout"]["title"]
            assert [x["text"] for x in mine["layout"]["annotations"]] == \
                [x["text"] for x in built["layout"]["annotations"]]
            compared.append(len(mine["data"]))

    learn.fit_one_cycle(2, 1e-2, cbs=Compare())
    assert compared and compared[0] > 10
    assert sent and dash.n_pushes > dash.n_rebuilds
    names = [n for *_, ns in sent for n in ns]
    assert "loss: train (steps)" in names and "schedule/lr: actual" in names
    assert not [n for n in names if n.endswith("planned")], "a planned schedule does not change"
    assert all(len(ns) < compared[0] for *_, ns in sent), "only the traces that changed"
    for content, buffers, _ in sent:
        slots = [k for g in content.get("groups", []) for v in g["fields"].values() for k in v]
        assert sorted(slots) == list(range(len(buffers)))  # every array is a buffer, none in the JSON
        assert all(isinstance(b, np.ndarray) and b.dtype == np.float32 for b in buffers)
    assert any("status" in c.get("header", {}) for c, *_ in sent)


def test_the_live_widget_sends_plotly_js_as_one_binary_buffer():
    """Opening the widget JSON-encodes the figure only: plotly.js (~5 MB) goes as a binary buffer, which the
    kernel sends without encoding it."""
    pytest.importorskip("anywidget")
    from ipywidgets.widgets.widget import _remove_buffers

    from effilab.viz.live import LiveFigure
    from tests.viz import synthetic_telemetry

    t = F.snapshot(synthetic_telemetry(n_epoch=4, epochs_done=2))
    widget = LiveFigure(F.figure_dict(t, scrub=False, live=True), F.status_line(t), 0.5)
    try:
        state, paths, buffers = _remove_buffers(widget.get_state())
        assert paths == [["plotly_js"]] and len(buffers[0]) > 3_000_000
        assert len(json.dumps(state)) < 100_000, len(json.dumps(state))
        assert state["plotly_version"] and state["header"] == {"status": F.status_line(t), "progress": 0.5}
        assert not widget.update([], {}, F.status_line(t), 0.5)  # nothing changed: nothing sent
    finally:
        widget.layout.close()
        widget.close()


def test_live_updates_failing_midway_warn_once(monkeypatch):
    pytest.importorskip("anywidget")

    # Every step recorded: the layout settles in the first steps, and later updates go through figure_delta.
    learn = make_learner([FitRecorder(every=1, max_per_s=1e9), SystemMonitor(every_s=0.0)], n=N, bs=BS)
    dash = Dashboard(mode="live", max_per_s=0.0, budget=0)
    learn.add_cb(dash)
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise ValueError("bad trace")

    monkeypatch.setattr(F, "figure_delta", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        learn.fit(2, 1e-2)
    assert len([w for w in caught if "Dashboard" in str(w.message)]) == 1
    assert len(calls) > 1 and dash.n_failures == len(calls)
    assert dash.final_figure is not None  # the final figure does not go through figure_delta


def test_live_without_anywidget_falls_back_to_static(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "effilab.viz.live", None)  # importing it fails, as without anywidget
    learn = make_learner([], n=N, bs=BS)
    dash = Dashboard(mode="live")
    learn.add_cb(dash)
    with pytest.warns(RuntimeWarning, match="anywidget"):
        learn.fit(1, 1e-2)
    assert dash.mode == "static" and dash.final_figure is not None
    assert "Training (fit 0)" in capsys.readouterr().out


def test_off_mode_environment_and_convenience(monkeypatch, capsys):
    learn = make_learner([FitRecorder()], n=N, bs=BS)
    assert learn.dashboard(mode="off") is learn
    dash = learn.dashboard
    assert isinstance(dash, Dashboard)
    assert sum(isinstance(cb, FitRecorder) for cb in learn.cbs) == 1  # not duplicated
    assert any(isinstance(cb, SystemMonitor) for cb in learn.cbs)
    learn.fit(1, 1e-2)
    assert dash.mode == "off" and dash.final_figure is None and capsys.readouterr().out == ""
    assert learn.dashboard(mode="auto") is learn  # already there: adjusts it
    monkeypatch.setenv(ENV_VAR, "static")
    learn.fit(1, 1e-2)
    assert dash.mode == "static" and f"{ENV_VAR}=static" == dash.mode_reason
    assert "Training (fit 1)" in capsys.readouterr().out
    monkeypatch.setenv(ENV_VAR, "nonsense")
    with pytest.warns(RuntimeWarning, match="nonsense"):
        learn.fit(1, 1e-2)
    assert dash.mode == "static"
    with pytest.raises(ValueError):
        Dashboard(mode="sometimes")


def test_pickles_without_widgets_and_skips_lr_find():
    pytest.importorskip("anywidget")
    learn = make_learner([], n=N, bs=BS)
    dash = Dashboard(mode="live")
    learn.add_cb(dash)
    learn.lr_find(num_it=5, show_plot=False)
    assert dash.n_pushes == 0 and dash._widget is None and dash.final_figure is None
    dash._widget = object()  # as if in the middle of a live fit
    state = dash.__getstate__()
    assert "_widget" not in state and "_handle" not in state
    clone = Dashboard.__new__(Dashboard)
    clone.__setstate__(state)
    assert clone._widget is None and clone.mode_arg == "live"


def _kernel_env(tmp_path) -> dict:
    """A `python3` kernelspec running this interpreter on this checkout, found before any other; the front-end
    markers are blanked so that the dashboard's mode is what papermill (or CI) would get."""
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
           "JPY_SESSION_NAME": "", "VSCODE_PID": "", "COLAB_RELEASE_TAG": "", "OMP_NUM_THREADS": "1"}
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (effilab viz tests)", "language": "python", "env": env}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    paths = (str(tmp_path / "jupyter"), os.environ.get("JUPYTER_PATH", ""))
    return {"JUPYTER_PATH": os.pathsep.join(p for p in paths if p)}


def test_dashboard_notebook_headless(tmp_path, monkeypatch):
    import nbformat
    import papermill

    for k, v in _kernel_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    src = ROOT / "notebooks" / "dashboard.ipynb"
    out = tmp_path / "dashboard.ipynb"
    papermill.execute_notebook(str(src), str(out), parameters={"QUICK": True}, kernel_name="python3",
                               cwd=str(tmp_path), progress_bar=False, execution_timeout=600)
    size = out.stat().st_size
    assert size < 500_000, f"executed notebook is {size / 1e3:.0f} KB"
    nb = nbformat.read(out, as_version=4)
    assert "widgets" not in nb.metadata  # no widget state saved
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    kinds = [set(o.get("data", {})) for o in outputs]
    assert not any("application/vnd.jupyter.widget-view+json" in k for k in kinds)
    fit_cell = next(c for c in nb.cells if c.cell_type == "code" and "fit_one_cycle" in c.source)
    figures = [o for o in fit_cell.outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(figures) == 1  # the static figure, once, at the end of the fit
    names = [tr["name"] for tr in figures[0]["data"]["application/vnd.plotly.v1+json"]["data"]]
    assert "scores/infobatch: threshold" in names and "text/html" in figures[0]["data"]
    text = "".join(o.get("text", "") for o in fit_cell.outputs if o.get("output_type") == "stream")
    assert "Data decisions (infobatch)" in text
    assert (tmp_path / "dashboard_report.html").stat().st_size > 1_000_000  # plotly.js embedded


def _live_with_slow_draws(monkeypatch, budget: float, delay) -> tuple:
    """A Learner whose telemetry changes every step and a live Dashboard whose every draw runs `delay()`
    first."""
    pytest.importorskip("anywidget")
    learn = make_learner([FitRecorder(every=1, max_per_s=1e9)], n=4 * N, bs=BS)
    dash = Dashboard(mode="live", max_per_s=0.0, budget=budget)
    learn.add_cb(dash)
    redraw = Dashboard._redraw

    def slow_redraw(self, *a, **k):
        delay()
        return redraw(self, *a, **k)

    monkeypatch.setattr(Dashboard, "_redraw", slow_redraw)
    return learn, dash


def test_live_drawing_stays_within_its_budget(monkeypatch):
    import time

    def busy():  # a draw that costs as much CPU as several training steps
        t0 = time.thread_time()
        while time.thread_time() - t0 < 0.02:
            pass

    learn, dash = _live_with_slow_draws(monkeypatch, 0.05, busy)
    t0 = time.perf_counter()
    learn.fit(3, 1e-3)
    fit_s = time.perf_counter() - t0
    steps = 3 * 4 * N // BS
    assert dash.n_failures == 0 and 1 <= dash.n_pushes < steps // 2, dash.n_pushes
    # Drawing took at most the budget's share of the fit, plus the one draw that went past it.
    assert dash._busy_s <= 0.05 * fit_s + dash._max_draw_s, (dash._busy_s, fit_s, dash._max_draw_s)
    # Without a budget every step's telemetry is drawn.
    dash.budget = 0
    learn.fit(1, 1e-3)
    assert dash.n_pushes >= 4 * N // BS


def test_a_draw_is_charged_its_cpu_time_not_time_spent_waiting_for_the_cpu(monkeypatch):
    import time

    # Another process had the CPU for 50 ms in the middle of every draw.
    learn, dash = _live_with_slow_draws(monkeypatch, 0.02, lambda: time.sleep(0.05))
    learn.fit(1, 1e-3)
    # Charged by wall-clock, 50 ms per draw against 2% of the fit would allow one draw in 2.5 s.
    assert dash.n_failures == 0 and dash.n_pushes >= 0.8 * (4 * N // BS), dash.n_pushes


def test_wrong_settings_are_errors():
    from effilab.callback import ArgumentTypeError

    for kwargs in ({"budget": -0.1}, {"max_per_s": float("inf")}):
        with pytest.raises(ValueError, match="must be a finite number"):
            Dashboard(**kwargs)
    for kwargs in ({"budget": True}, {"max_per_s": "2"}, {"budget": float("nan")}, {"mode": 1}):
        with pytest.raises(ArgumentTypeError, match=next(iter(kwargs))):
            Dashboard(**kwargs)


def test_writers_added_for_one_fit_leave_with_it():
    """A Dashboard passed to `fit(cbs=...)` adds the writers it draws from for that fit only; one created with
    the Learner keeps them."""
    learn = make_learner([], n=N, bs=BS)
    learn.fit(1, 1e-2, cbs=Dashboard(mode="static"))
    assert not any(isinstance(cb, (FitRecorder, SystemMonitor, Dashboard)) for cb in learn.cbs)
    assert len(telemetry_of(learn).records("fit", "epoch")) == 1  # they wrote while the fit ran
    learn.fit(1, 1e-2, cbs=Dashboard(mode="static"))
    assert [r["epoch"] for r in telemetry_of(learn).records("fit", "epoch")] == [0, 0]
    assert telemetry_of(learn).meta("fit")["fit_index"] == 1
    kept = make_learner([Dashboard(mode="static")], n=N, bs=BS)
    kept.fit(1, 1e-2)
    assert sum(isinstance(cb, (FitRecorder, SystemMonitor)) for cb in kept.cbs) == 2


def _fake_colab(monkeypatch) -> list:
    """`google.colab.output` as Colab has it, recording calls to `enable_custom_widget_manager`."""
    import types

    calls = []
    google, colab, output = (types.ModuleType(n) for n in ("google", "google.colab", "google.colab.output"))
    output.enable_custom_widget_manager = lambda: calls.append("enabled")
    colab.output, google.colab = output, colab
    for name, mod in (("google", google), ("google.colab", colab), ("google.colab.output", output)):
        monkeypatch.setitem(sys.modules, name, mod)
    return calls


def test_front_ends_get_standard_mimetypes_colab_its_widget_manager(monkeypatch):
    pytest.importorskip("anywidget")
    import IPython.display

    from effilab.viz import dashboard as D
    from effilab.viz.mode import decide_mode

    calls = _fake_colab(monkeypatch)
    monkeypatch.setattr(D, "_colab_widgets_enabled", False)
    assert decide_mode(None, env={}, kernel=True).mode == "live"  # Colab detected by its module
    shown, updated = [], []

    class Handle:
        def update(self, obj, raw=False):
            updated.append(obj)

    def display(obj, raw=False, display_id=False):
        shown.append(obj)
        calls.append("displayed")
        return Handle()

    monkeypatch.setattr(IPython.display, "display", display)
    monkeypatch.setattr(D, "in_kernel", lambda: True)
    learn = make_learner([], n=N, bs=BS)
    dash = Dashboard(mode="live")
    learn.add_cb(dash)
    learn.fit(1, 1e-3)
    # Colab's custom widget manager, on before the widget was shown (anywidget enables it too, once more)
    assert calls[0] == "enabled" and calls.count("displayed") == 1
    (live,) = shown
    # Only the standard widget mime type, and a note, not an empty box, where widgets can't be drawn.
    assert set(live) == {"application/vnd.jupyter.widget-view+json", "text/plain"}
    assert live["text/plain"] == D.NO_WIDGETS_NOTE and "\n" not in D.NO_WIDGETS_NOTE
    assert live["application/vnd.jupyter.widget-view+json"]["model_id"]
    # At the end the same output becomes the static figure: plotly's mime type, HTML for viewers, text.
    (final,) = updated
    assert set(final) == {"application/vnd.plotly.v1+json", "text/html", "text/plain"}
    assert final["application/vnd.plotly.v1+json"]["data"]
    assert not D.enable_colab_widgets(modules={})  # elsewhere: nothing to enable


def test_colab_widget_manager_enabled_once_when_colab_is_detected(monkeypatch):
    from effilab.viz import dashboard as D

    calls = _fake_colab(monkeypatch)
    monkeypatch.setattr(D, "_colab_widgets_enabled", False)
    assert D.enable_colab_widgets() and D.enable_colab_widgets()
    assert calls == ["enabled"]


def test_a_live_fit_keeps_telling_the_front_end_the_kernel_is_busy(monkeypatch):
    pytest.importorskip("anywidget")
    import types

    import IPython

    published = []
    kernel = types.SimpleNamespace(_publish_status=lambda status, channel: published.append((status, channel)))
    monkeypatch.setattr(IPython, "get_ipython", lambda: types.SimpleNamespace(kernel=kernel))
    learn = make_learner([], n=N, bs=BS)
    # A fake clock at 0.5 s per training step: "busy" is re-stated every second, every other step.
    dash = Dashboard(mode="live", clock=lambda: learn.train_iter * 0.5)
    learn.add_cb(dash)
    learn.fit(2, 1e-3)
    steps = 2 * N // BS
    assert set(published) == {("busy", "shell")}
    assert steps // 2 - 1 <= len(published) <= steps // 2 + 1, (len(published), steps)
    published.clear()
    dash.mode_arg = "static"  # a static dashboard leaves the status alone
    learn.fit(1, 1e-3)
    assert published == []
