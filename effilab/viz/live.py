"""The live dashboard's widget: a plotly.js figure in a notebook output, drawn by anywidget, that a running fit
updates with the arrays that changed.

Why not plotly's own `FigureWidget`: it validates every property it is given (the layout and ~25 traces again
each time a panel appears, ~20 ms), and each new one JSON-encodes its 5 MB front-end bundle into the kernel's
message; on a fit of a few seconds those fixed costs alone were ~5% of the training time. This widget takes the
figures `effilab.viz.figures` builds, as plain dicts; plotly.js travels as one binary buffer (no JSON encoding,
and the page evaluates it once: later widgets reuse it); a draw is one message with the changed arrays as
float32 buffers, which the page merges while it is busy drawing, so it never falls behind by more than a draw.
The widget also fits the figure to its box's width whenever the box changes (a `ResizeObserver`).
"""

from __future__ import annotations

import functools

import anywidget
import numpy as np
import traitlets
from plotly.offline import get_plotlyjs, get_plotlyjs_version

from .figures import apply_delta

__all__ = ["LiveFigure"]

_ESM = r"""
// plotly.js, once per page and version: the first widget evaluates the buffer it was sent, later ones reuse it.
function loadPlotly(model) {
  const version = model.get("plotly_version");
  const cache = (globalThis.__effilabPlotly ??= {});
  if (!cache[version]) {
    if (globalThis.Plotly && globalThis.Plotly.version === version) {
      cache[version] = Promise.resolve(globalThis.Plotly);
    } else {
      const text = new TextDecoder().decode(model.get("plotly_js"));
      // plotly.min.js is a UMD script: given a `module`, it exports Plotly there.
      const url = URL.createObjectURL(new Blob(
        ["const module = {exports: {}};\n", text, "\nexport default module.exports;\n"], {type: "text/javascript"}));
      cache[version] = import(url).then((m) => m.default).finally(() => URL.revokeObjectURL(url));
    }
  }
  return cache[version];
}

// A buffer (a DataView, or an ArrayBuffer in some widget managers) as float32 values, copied: a message's
// buffers need not start on a 4-byte boundary.
const floats = (b) => new Float32Array(ArrayBuffer.isView(b)
  ? b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength) : b.slice(0));

function render({ model, el }) {
  el.classList.add("effilab-dashboard");
  el.innerHTML = '<div class="effilab-dashboard-header"><div class="effilab-dashboard-progress">'
    + '<div class="progress-bar"></div></div><span class="effilab-dashboard-status"></span></div>'
    + '<div class="effilab-dashboard-figure"></div>';
  const bar = el.querySelector(".progress-bar");
  const status = el.querySelector(".effilab-dashboard-status");
  const gd = el.querySelector(".effilab-dashboard-figure");
  const setHeader = (h) => {
    if (h.progress != null) bar.style.width = `${(100 * h.progress).toFixed(1)}%`;
    if (h.status != null) status.textContent = h.status;
  };
  setHeader(model.get("header"));

  let Plotly = null, drawing = false, stale = true, closed = false, revision = 0;
  let pending = null; // updates not drawn yet, merged: trace -> {field: array}, and layout paths
  const config = { displaylogo: false, responsive: false };

  async function draw() {
    if (drawing || !Plotly || closed) return;
    drawing = true;
    try {
      while ((stale || pending) && !closed) {
        if (stale) {
          // A new figure is a new grid of panels: a new `uirevision`, or Plotly.react would keep the range of
          // an axis for the panel that now sits on it (as it keeps a user's zoom across updates).
          stale = false;
          const f = model.get("figure");
          await Plotly.react(gd, f.data || [], { ...f.layout, uirevision: ++revision }, config);
          continue;
        }
        const p = pending;
        pending = null;
        // One Plotly.update per set of fields: a restyle can't leave one trace's field alone and set another's.
        const groups = new Map();
        for (const [i, fields] of p.traces) {
          const key = Object.keys(fields).sort().join(",");
          if (!groups.has(key)) groups.set(key, { idx: [], style: {} });
          const g = groups.get(key);
          g.idx.push(i);
          for (const [k, v] of Object.entries(fields)) (g.style[k] ??= []).push(v);
        }
        let layout = p.layout;
        for (const g of groups.values()) {
          await Plotly.update(gd, g.style, layout, g.idx);
          layout = {};
        }
        if (Object.keys(layout).length) await Plotly.relayout(gd, layout);
      }
    } catch (e) {
      console.error("effilab dashboard:", e);
      status.textContent = `effilab dashboard: drawing failed (${e})`;
    } finally {
      drawing = false;
    }
  }

  const onFigure = () => { stale = true; pending = null; draw(); };
  const onMessage = (msg, buffers) => {
    if (msg.header) setHeader(msg.header);
    if (!msg.groups) return;
    pending ??= { traces: new Map(), layout: {} };
    for (const { traces, fields } of msg.groups) {
      for (const [k, slots] of Object.entries(fields)) {
        traces.forEach((i, j) => {
          if (!pending.traces.has(i)) pending.traces.set(i, {});
          pending.traces.get(i)[k] = floats(buffers[slots[j]]);
        });
      }
    }
    Object.assign(pending.layout, msg.layout || {});
    draw();
  };
  model.on("change:figure", onFigure);
  model.on("msg:custom", onMessage);
  let frame = 0;
  const resized = new ResizeObserver(() => {
    cancelAnimationFrame(frame);
    frame = requestAnimationFrame(() => { if (Plotly && gd._fullLayout && !closed) Plotly.Plots.resize(gd); });
  });
  resized.observe(el);
  loadPlotly(model).then((P) => { Plotly = P; draw(); }, (e) => {
    console.error("effilab dashboard:", e);
    status.textContent = `effilab dashboard: plotly.js could not be loaded (${e})`;
  });
  return () => {
    closed = true;
    resized.disconnect();
    model.off("change:figure", onFigure);
    model.off("msg:custom", onMessage);
    if (Plotly) Plotly.purge(gd);
  };
}

export default { render };
"""

_CSS = """
.effilab-dashboard { width: 100%; }
.effilab-dashboard-header { display: flex; align-items: center; gap: 10px; margin: 2px 0 4px 0;
  font-family: monospace; font-size: 12px; }
.effilab-dashboard-progress { flex: 0 0 180px; height: 10px; border-radius: 3px; overflow: hidden;
  background: #e8e8e8; }
.effilab-dashboard-progress .progress-bar { height: 100%; width: 0; background: #2c7fb8; }
.effilab-dashboard-figure { width: 100%; }
"""


@functools.cache
def _plotly_js() -> bytes:
    return get_plotlyjs().encode()


class LiveFigure(anywidget.AnyWidget):
    """A plotly.js figure with a progress bar and a status line above it (CSS classes `effilab-dashboard`,
    `-progress`, `-status`, `-figure`: how a browser test finds them).

    `figure` is a `figures.figure_dict` (replace it when the layout changes); `update` sends what
    `figures.figure_delta` found changed and the header, and applies it to `figure` too, so a view opened later
    starts from the latest figure."""

    _esm = _ESM
    _css = _CSS
    plotly_js = traitlets.Bytes(b"").tag(sync=True)
    plotly_version = traitlets.Unicode("").tag(sync=True)
    figure = traitlets.Dict().tag(sync=True)
    header = traitlets.Dict().tag(sync=True)  # {"status": text, "progress": share of the fit done, 0..1}

    def __init__(self, figure: dict, status: str = "", progress: float = 0.0):
        super().__init__(plotly_js=_plotly_js(), plotly_version=get_plotlyjs_version(), figure=figure,
                         header={"status": status, "progress": progress})

    def update(self, groups: list, layout: dict, status: str, progress: float) -> bool:
        """Send one draw: `figure_delta`'s `(groups, layout)` (float arrays as binary buffers) and the header
        where it changed; returns whether anything was sent."""
        header = {k: v for k, v in (("status", status), ("progress", round(progress, 4)))
                  if self.header.get(k) != v}
        if not (groups or layout or header):
            return False
        msg, buffers = {"header": header} if header else {}, []
        if groups or layout:
            msg["groups"], msg["layout"] = [], layout
            for idx, style in groups:
                fields = {}
                for field, values in style.items():
                    fields[field] = list(range(len(buffers), len(buffers) + len(values)))
                    buffers += [np.asarray(v, dtype=np.float32) for v in values]
                msg["groups"].append({"traces": idx, "fields": fields})
        self.send(msg, buffers)
        # The synced state follows in place (nothing sent): what a view drawn from now on starts from.
        apply_delta(self.figure, groups, layout)
        self.header.update(header)
        return True
