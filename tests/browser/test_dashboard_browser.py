"""The live dashboard in a real browser: JupyterLab and Notebook 7 each run `dashboard_live.ipynb`
(InfoBatch on MNIST-1D, ~30-40 s of training) in headless Chromium, and the page is read while the fit runs
and after it.

Checked in the page: the dashboard's plotly figure is drawn inside its `effilab-dashboard` box with every
panel's traces, histogram bars of non-zero height, a figure as wide as its box; between two reads the
schedule and memory traces, the progress bar and the status line move; the front end shows the kernel busy
while the fit runs; at the end the widget is gone and one static plotly figure (with its epoch slider) and
the text summary stand in its place. Screenshots go to `tests/artifacts/` (git-ignored).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from . import lab as L

NOTEBOOK = Path(__file__).with_name("dashboard_live.ipynb")
ARTIFACTS = L.ROOT / "tests" / "artifacts"
EPOCHS = 30  # the notebook's default: ~30-40 s of (paced) training, long enough to read it twice

_missing = L.missing_browser()
pytestmark = pytest.mark.skipif(_missing is not None, reason=f"real-browser test: {_missing}")

# Traces each panel must have drawn (names are "<cell>: <series>", see effilab.viz.figures).
EXPECTED = ("loss: train (steps)", "loss: valid", "metrics: accuracy", "scores/infobatch: kept",
            "scores/infobatch: rescaled", "scores/infobatch: pruned", "scores/infobatch: threshold",
            "kept: infobatch", "schedule/lr: planned", "schedule/lr: actual", "schedule/mom: actual",
            "memory: rss", "speed: samples/s", "samples: forwarded", "samples: full data")


def _wait(what: str, fn, timeout_s: float, page=None, every_s: float = 0.25):
    """Poll `fn` until it returns something truthy; fail with `what` (and notebook errors) after a while."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            errors = L.cell_errors(page) if page is not None else []
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}"
                                 + (f"; notebook errors:\n{errors}" if errors else ""))
        time.sleep(every_s)


def _assert_histogram_fits(state: dict) -> None:
    """The histogram's y axis reaches its highest stack (the threshold line's top), not an empty axis's range
    left over from the panel that sat there before the figure grew."""
    hist = state["hist"]
    assert hist and 0.9 * hist["line"] <= hist["top"] <= 2 * hist["line"], hist


@pytest.mark.timeout(300)
@pytest.mark.parametrize("app", L.FRONT_ENDS)
def test_live_dashboard_draws_and_moves(tmp_path, app):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    timings = {}
    page_errors: list[str] = []
    with L.Lab(tmp_path, [NOTEBOOK], env={"EFFILAB_LIVE_EPOCHS": str(EPOCHS)}, app=app) as lab:
        timings["lab"] = time.monotonic() - t0
        with L.browser_page(1400, 1000) as page:
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            try:
                L.open_notebook(page, lab, NOTEBOOK.name)
                timings["open"] = time.monotonic() - t0
                L.record_status(page)
                L.run_all(page)

                # -- while training: the widget appears, with every panel once an epoch has ended (a panel
                # appears with its first point: the metrics and the samples forwarded come at epoch ends)
                first = _wait("the live dashboard with schedule, memory, histogram and an epoch's end drawn",
                              lambda: ((s := L.live_state(page)) and s["traces"].get("schedule/lr: actual", 0) >= 2
                                       and s["traces"].get("memory: rss", 0) >= 2 and s["bars"] > 0
                                       and s["traces"].get("loss: valid", 0) >= 1 and s), 150, page)
                timings["widget"] = time.monotonic() - t0
                page.query_selector(".effilab-dashboard").evaluate("e => e.scrollIntoView({block: 'start'})")
                assert first["svgs"] >= 1, "no plotly svg inside the dashboard"
                missing = [n for n in EXPECTED if n not in first["traces"]]
                assert not missing, f"panels missing from the live figure: {missing}"
                assert first["status"] and "epoch" in first["status"], first["status"]
                assert first["progress"] is not None, "no progress bar in the dashboard"
                _assert_histogram_fits(first)
                # Wait for the moves with a deadline, not a fixed sleep: a loaded machine trains slower.
                second = _wait("the schedule, memory, progress and status to move", lambda: (
                    (s := L.live_state(page)) and s["t"] - first["t"] >= 2.0
                    and s["traces"]["schedule/lr: actual"] > first["traces"]["schedule/lr: actual"]
                    and s["traces"]["memory: rss"] > first["traces"]["memory: rss"]
                    and s["progress"] > first["progress"] and s["status"] != first["status"] and s), 30, page)
                _assert_histogram_fits(second)
                page.screenshot(path=str(ARTIFACTS / f"dashboard_browser_{app}_mid.png"))
                # The figure is fitted to its box (plotly.js draws 700 px wide when the box is not laid out
                # yet; the widget resizes it when its box changes).
                fitted = _wait("the live figure to fill its box", lambda: (
                    (s := L.live_state(page)) and abs(s["width"] - s["box"]) <= 2 and s), 15, page)
                assert fitted["box"] > 800, fitted["box"]
                timings["reads"] = time.monotonic() - t0
                # The whole dashboard, half-way (the fit runs on meanwhile: no time added to the test).
                half = _wait("half of the fit", lambda: "gone" if (s := L.live_state(page)) is None
                             else s["progress"] >= 50 and s, 150, page)
                if half != "gone":
                    L.screenshot_dashboard(page, ARTIFACTS / f"dashboard_browser_{app}_live.png")

                # -- after the fit: the widget's output replaced by the static figure
                log_path = lab.root / "kernel_log.json"
                _wait("the notebook to finish", lambda: log_path.exists() and not L.kernel_busy(page), 150,
                      page)
                timings["done"] = time.monotonic() - t0
                # Lab renders outputs asynchronously: wait for the figure and the printed summary.
                end = _wait("the static figure and the summary", lambda: (
                    (s := L.static_state(page)) and s["figures"] and all(s["figures"])
                    and "Data decisions (infobatch)" in s["text"] and s), 20, page)
                page.wait_for_timeout(500)
                page.screenshot(path=str(ARTIFACTS / f"dashboard_browser_{app}_end.png"))
                shown = L.status_log(page)
                assert not L.cell_errors(page), L.cell_errors(page)
                assert end["live"] == 0 and end["widgets"] == 0, end  # no live dashboard, no widget left
                assert len(end["figures"]) == 1, f"{len(end['figures'])} plotly outputs, expected one"
                fig = end["figures"][0]
                missing = [n for n in EXPECTED if n not in fig["names"]]
                assert not missing, f"panels missing from the static figure: {missing}"
                assert fig["sliders"] == 1  # the epoch slider of the data-decision histogram
                assert fig["points"]["loss: valid"] == EPOCHS
                assert fig["points"]["schedule/lr: actual"] > second["traces"]["schedule/lr: actual"]
                assert f"Training (fit 0): {EPOCHS} of {EPOCHS} epochs" in end["text"], end["text"][-2000:]
            except BaseException:
                page.screenshot(path=str(ARTIFACTS / f"dashboard_browser_{app}_failure.png"))
                (ARTIFACTS / f"dashboard_browser_{app}.log").write_text(lab.log(20_000))
                raise

    # The kernel's side: the front end was detected (auto mode), updates went out, none failed.
    log = json.loads(log_path.read_text())
    assert log["mode"] == "live" and "JPY_SESSION_NAME" in log["mode_reason"], log["mode_reason"]
    # Drawn all along (within its time budget, about one draw a second here), not only at the start.
    assert log["n_pushes"] >= 10, log["n_pushes"]
    # The front end showed the kernel busy while the fit ran. Without the dashboard re-stating it, the widget
    # manager's create_subshell_request (answered "idle" on the control channel) left it "Idle" from the
    # widget's first drawing to the end of the fit. A second of slack: the status is re-stated every second.
    fit_start, fit_end = log["fit_start"], log["fit_start"] + log["fit_s"]
    idle = L.idle_seconds(shown, fit_start, fit_end)
    assert idle <= 2.5, (idle, log["fit_s"], [e for e in shown if fit_start - 1 <= e[1] <= fit_end + 1])
    assert not [e for e in page_errors if "plotly" in e.lower() or "widget" in e.lower()], page_errors
    total = time.monotonic() - t0
    print(f"real-browser dashboard test: {total:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in
                                                                   timings.items()) + ")")
