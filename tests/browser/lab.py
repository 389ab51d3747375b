"""JupyterLab or Notebook 7 in a sandbox, driven by Playwright through Debian's Chromium: shared by the
real-browser dashboard test and `benchmarks/dashboard_overhead.py`.

Nothing global is touched: Jupyter's config, data, runtime, settings and workspaces live in a temporary
folder, the kernel is this interpreter on this checkout (`PYTHONPATH`), and Lab, its kernels and the
browser are ended when the `with` blocks exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-dev-shm-usage"]
# Environment variables that would choose the dashboard's mode instead of the front end (CI sets CI=true).
_MODE_VARS = ("CI", "EFFILAB_DASHBOARD", "VSCODE_PID", "COLAB_RELEASE_TAG", "JPY_SESSION_NAME")

# The graph div of the live dashboard (effilab.viz.live.LiveFigure).
LIVE_PLOT = ".effilab-dashboard .js-plotly-plot"

# What the page shows of the live dashboard, in one read (null when it is not on the page): points per
# trace (by name), histogram bars of non-zero height, the top of the histogram's y axis and of its threshold
# line, the progress bar's width (%), the status line, the drawn width against the box's width, and the
# browser's clock.
JS_LIVE_STATE = """(selector) => {
  const gd = document.querySelector(selector);
  if (!gd || !gd.data || !gd._fullLayout) return null;
  const traces = {};
  for (const tr of gd.data) traces[tr.name] = (tr.y || []).length;
  // A bar's path is "Mx0,y0Vy1Hx1Vy0Z": it has a height when y0 != y1 (read from the path, not the
  // layout: Lab skips laying out cells out of view).
  const bars = Array.from(document.querySelectorAll('.effilab-dashboard g.trace.bars path')).filter(p => {
    const m = /^M[^,]+,([-0-9.e]+)V([-0-9.e]+)H/.exec(p.getAttribute('d') || '');
    return m && Math.abs(parseFloat(m[1]) - parseFloat(m[2])) > 0.5;
  }).length;
  // The histogram's y axis: its top against the threshold line's (drawn as tall as the highest stack).
  const line = gd.data.find(t => t.name.startsWith('scores/') && t.name.endsWith(': threshold'));
  const axis = line ? gd._fullLayout['yaxis' + (line.yaxis || 'y').slice(1)] : null;
  const hist = axis ? {top: axis.range[1], line: Math.max(...Array.from(line.y || [0]))} : null;
  const bar = document.querySelector('.effilab-dashboard-progress .progress-bar');
  const status = document.querySelector('.effilab-dashboard-status');
  return {traces, bars, hist, progress: bar ? parseFloat(bar.style.width) : null,
          status: status ? status.textContent : null, width: gd._fullLayout.width, box: gd.clientWidth,
          svgs: gd.querySelectorAll('svg.main-svg').length, t: Date.now() / 1000};
}"""

# Every plotly figure drawn by JupyterLab's plotly renderer (the static figure), as trace names and
# slider count, plus how many live dashboards and widget outputs are left on the page.
JS_STATIC_STATE = """() => {
  const figs = Array.from(document.querySelectorAll('.jp-RenderedPlotly')).map(r => {
    const gd = r.classList.contains('js-plotly-plot') ? r : r.querySelector('.js-plotly-plot');
    return gd && gd.data ? {names: gd.data.map(t => t.name), points: Object.fromEntries(
      gd.data.map(t => [t.name, (t.y || []).length])), sliders: (gd.layout.sliders || []).length,
      width: gd._fullLayout.width} : null;
  });
  return {figures: figs, live: document.querySelectorAll('.effilab-dashboard').length,
          widgets: document.querySelectorAll('.jp-OutputArea-output .jupyter-widgets').length,
          text: Array.from(document.querySelectorAll(
            '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stdout"]'))
            .map(e => e.textContent).join('\\n')};
}"""


def missing_browser() -> str | None:
    """Why the real browser can't run here (None when it can)."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (Debian package chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the Python package playwright is missing"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc): kernels run in sessions of their own."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = [int(c) for c in f.read().split()]
            except OSError:
                kids = []
            out += kids
            todo += kids
    return out


def _get_json(url: str, timeout: float = 2.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read().decode())


FRONT_ENDS = ("lab", "notebook")  # JupyterLab, Notebook 7


class Lab:
    """`with Lab(tmp_dir, notebooks) as lab:` a JupyterLab (`app="lab"`) or Notebook 7 (`app="notebook"`)
    server serving a copy of `notebooks` from `tmp_dir / "root"`; `lab.url`, `lab.root`. Extra kernel
    environment variables: `env`."""

    def __init__(self, tmp_dir: Path, notebooks=(), env: dict | None = None, start_timeout: float = 60.0,
                 app: str = "lab"):
        if app not in FRONT_ENDS:
            raise ValueError(f"app must be one of {FRONT_ENDS}, got {app!r}")
        self.app = app
        self.tmp, self.notebooks, self.extra_env = Path(tmp_dir), [Path(p) for p in notebooks], env or {}
        self.start_timeout = start_timeout
        self.root = self.tmp / "root"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = self.tmp / "jupyter-lab.log"

    def _environment(self) -> dict:
        jup = self.tmp / "jupyter"
        env = {k: v for k, v in os.environ.items() if k not in _MODE_VARS}
        pythonpath = [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env |= {"PYTHONPATH": os.pathsep.join(pythonpath), "OMP_NUM_THREADS": "1",
                "JUPYTER_CONFIG_DIR": str(jup / "config"), "JUPYTER_DATA_DIR": str(jup / "data"),
                "JUPYTER_RUNTIME_DIR": str(jup / "runtime"), "JUPYTERLAB_SETTINGS_DIR": str(jup / "settings"),
                "JUPYTERLAB_WORKSPACES_DIR": str(jup / "workspaces"), "JUPYTER_PLATFORM_DIRS": "1",
                "IPYTHONDIR": str(jup / "ipython"),
                "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
        return env | self.extra_env

    def _prepare(self, env: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for nb in self.notebooks:
            shutil.copy(nb, self.root / nb.name)
        # The kernel is this interpreter (the stock kernelspec runs whatever `python` is on PATH).
        spec = Path(env["JUPYTER_DATA_DIR"]) / "kernels" / "python3"
        spec.mkdir(parents=True, exist_ok=True)
        (spec / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (ipykernel)", "language": "python"}))
        # No news and update pop-ups over the notebook (and no network calls for them).
        settings = Path(env["JUPYTERLAB_SETTINGS_DIR"]) / "@jupyterlab" / "apputils-extension"
        settings.mkdir(parents=True, exist_ok=True)
        (settings / "notification.jupyterlab-settings").write_text(
            json.dumps({"fetchNews": "false", "checkForUpdates": False}))
        labconfig = Path(env["JUPYTER_CONFIG_DIR"]) / "labconfig"
        labconfig.mkdir(parents=True, exist_ok=True)
        (labconfig / "page_config.json").write_text(json.dumps(
            {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))

    def __enter__(self) -> Lab:
        env = self._environment()
        self._prepare(env)
        cmd = [sys.executable, "-m", "jupyterlab" if self.app == "lab" else "notebook", "--no-browser",
               "--ip=127.0.0.1", f"--port={self.port}", "--IdentityProvider.token=", "--ServerApp.password=",
               "--ServerApp.disable_check_xsrf=True", f"--ServerApp.root_dir={self.root}",
               "--expose-app-in-browser", "--ServerApp.terminals_enabled=False",
               "--KernelManager.shutdown_wait_time=2", "--allow-root"]
        if self.app == "lab":
            cmd += ["--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                    "--LabApp.extension_manager=readonly"]
        log = open(self.log_path, "w")
        try:
            self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited ({self.proc.returncode}):\n{self.log()}")
            with contextlib.suppress(OSError, ValueError):
                _get_json(f"{self.url}/api/status")
                return
            time.sleep(0.3)
        raise TimeoutError(f"jupyter lab did not answer within {self.start_timeout:.0f} s:\n{self.log()}")

    def log(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Shut the kernels down, then end Lab's process group and anything left below it."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        kids = _descendants(proc.pid)
        with contextlib.suppress(Exception):
            for k in _get_json(f"{self.url}/api/kernels"):
                req = urllib.request.Request(f"{self.url}/api/kernels/{k['id']}", method="DELETE")
                urllib.request.urlopen(req, timeout=5).close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        for pid in kids + _descendants(proc.pid):  # kernels start sessions of their own
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def browser_page(width: int = 1400, height: int = 1000):
    """A Playwright page in headless Chromium; the browser and Playwright's driver end on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            yield page
        finally:
            browser.close()


def open_notebook(page, lab: Lab, name: str, timeout_s: float = 60.0) -> None:
    """Open `name` in Lab or Notebook 7 and wait until its kernel is idle."""
    path = f"lab/tree/{name}" if lab.app == "lab" else f"notebooks/{name}"
    page.goto(f"{lab.url}/{path}", wait_until="domcontentloaded")
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                           " && window.jupyterapp.shell.currentWidget.sessionContext",
                           timeout=timeout_s * 1000)
    page.wait_for_function("""() => {
        const w = window.jupyterapp.shell.currentWidget;
        const k = w.sessionContext.session && w.sessionContext.session.kernel;
        return w.context.isReady && k && k.status === 'idle';
    }""", timeout=timeout_s * 1000)
    # The file browser closed: the notebook (and the figure in it) gets the width.
    page.evaluate("() => window.jupyterapp.shell.collapseLeft && window.jupyterapp.shell.collapseLeft()")


def run_all(page) -> None:
    """Clear the outputs (Lab saves them: a stale figure would pass for a new one), then run every cell."""
    page.evaluate("""async () => {
        const c = window.jupyterapp.commands;
        await c.execute('notebook:clear-all-cell-outputs');
        c.execute('notebook:run-all-cells');
    }""")


def live_state(page) -> dict | None:
    """The live dashboard as the browser draws it (`JS_LIVE_STATE`); None when it is not on the page."""
    return page.evaluate(JS_LIVE_STATE, LIVE_PLOT)


def static_state(page) -> dict:
    return page.evaluate(JS_STATIC_STATE)


def screenshot_dashboard(page, path, selector: str = ".effilab-dashboard") -> None:
    """A picture of the whole element: the viewport is made tall enough and the element scrolled to
    the top (JupyterLab scrolls the notebook inside its own panel, not the page)."""
    el = page.query_selector(selector)
    if el is None:
        return
    box = el.bounding_box()
    size = page.viewport_size
    page.set_viewport_size({"width": size["width"], "height": max(size["height"], int(box["height"]) + 160)})
    el.evaluate("e => e.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(300)
    page.screenshot(path=str(path), clip=el.bounding_box())
    page.set_viewport_size(size)


# Every kernel status the front end shows, with the browser's clock, from now on (`status_log` reads it).
JS_STATUS_RECORDER = """() => {
  const k = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
  window.__effilabStatus = [[k.status, Date.now() / 1000]];
  k.statusChanged.connect((_, s) => window.__effilabStatus.push([s, Date.now() / 1000]));
}"""


def record_status(page) -> None:
    page.evaluate(JS_STATUS_RECORDER)


def status_log(page) -> list:
    """[(status, time)] since `record_status`: what the front end showed of the kernel."""
    return page.evaluate("() => window.__effilabStatus || []")


def idle_seconds(log: list, start: float, end: float) -> float:
    """How long the front end showed the kernel idle between `start` and `end`."""
    total = 0.0
    for (status, t), (_, t_next) in zip(log, log[1:] + [(None, end)]):
        lo, hi = max(t, start), min(t_next, end)
        if status == "idle" and hi > lo:
            total += hi - lo
    return total


def kernel_busy(page) -> bool:
    return page.evaluate("""() => {
        const k = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
        return k.status !== 'idle';
    }""")


def cell_errors(page) -> list[str]:
    """Error outputs in the notebook, as text."""
    return page.evaluate("""() => Array.from(document.querySelectorAll(
        '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'))
        .map(e => e.textContent).filter(t => /Error|Traceback/.test(t))""")
