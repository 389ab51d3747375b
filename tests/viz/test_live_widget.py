"""The live widget's front end (`effilab.viz.live._ESM`) run by Node.js against a recording stand-in for plotly.js
and the widget model: what it draws first, how updates that arrive while it draws are merged, what a new
figure does to updates not drawn yet, the header, and the clean-up. (The real browser test draws it in
JupyterLab and Notebook 7.)"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from effilab.viz import live

NODE = shutil.which("node") or shutil.which("nodejs")
pytestmark = pytest.mark.skipif(NODE is None, reason="Node.js is not installed")

# A page without a DOM: the elements the widget looks up, a model that records handlers and replays messages,
# and a plotly.js whose calls are recorded and each take one turn of the event loop (as drawing does).
HARNESS = r"""
import widget from "./widget.mjs";
const calls = [];
const later = () => new Promise((r) => setTimeout(r, 0));
globalThis.Plotly = {
  version: "VERSION",
  react: async (gd, data, layout) => {
    calls.push(["react", data.map((t) => t.name), layout.title, layout.uirevision]); await later();
  },
  update: async (gd, style, layout, idx) => {
    const s = Object.fromEntries(Object.entries(style).map(([k, v]) => [k, v.map((a) => Array.from(a))]));
    calls.push(["update", s, layout, idx]); await later();
  },
  relayout: async (gd, layout) => { calls.push(["relayout", layout]); await later(); },
  purge: () => calls.push(["purge"]),
  Plots: { resize: () => calls.push(["resize"]) },
};
globalThis.ResizeObserver = class {
  observe() {}
  disconnect() { calls.push(["disconnect"]); }
};
globalThis.requestAnimationFrame = (f) => setTimeout(f, 0);
globalThis.cancelAnimationFrame = (t) => clearTimeout(t);
const parts = {};
const part = (sel) => (parts[sel] ??= { style: {}, textContent: "", classList: { add() {} } });
const el = { classList: { names: [], add(c) { this.names.push(c); } }, set innerHTML(v) { this.html = v; },
             querySelector: part };
const handlers = {};
const state = { plotly_version: "VERSION", header: { status: "epoch 1/3", progress: 0.25 },
  figure: { data: [{ name: "a" }, { name: "b" }, { name: "c" }], layout: { title: "first" } } };
const model = { get: (k) => state[k], on: (e, f) => { handlers[e] = f; }, off: (e) => { delete handlers[e]; } };
// A float32 buffer at an odd offset of a larger one, as a websocket message's buffers are.
const buffer = (values) => {
  const raw = new ArrayBuffer(1 + 4 * values.length);
  new Uint8Array(raw).set(new Uint8Array(new Float32Array(values).buffer), 1);
  return new DataView(raw, 1, 4 * values.length);
};
const message = (groups, layout, header) => {
  const bufs = [], out = [];
  for (const [traces, fields] of groups) {
    const f = {};
    for (const [k, arrays] of Object.entries(fields)) f[k] = arrays.map((a) => (bufs.push(buffer(a)), bufs.length - 1));
    out.push({ traces, fields: f });
  }
  handlers["msg:custom"]({ groups: out, layout, header }, bufs);
};
const idle = async () => { for (let i = 0; i < 20; i++) await later(); };
const cleanup = widget.render({ model, el });
message([[[0], { y: [[1, 2]] }]], { "title.text": "t1" });   // before plotly.js is ready: kept
await idle();
message([[[1], { y: [[3]] }]], {});                         // drawn at once
message([[[0, 2], { x: [[5], [5]], y: [[6], [6]] }]], { "title.text": "t2" });  // arrive while drawing: merged
message([[[1, 0], { y: [[7, 8], [4]] }]], {});             // trace 0's y again: only the latest drawn
await idle();
state.figure = { data: [{ name: "a" }, { name: "d" }], layout: { title: "second" } };
message([[[2], { y: [[11]] }]], {});                        // drawn at once
message([[[0], { y: [[9]] }]], {}, { status: "epoch 2/3", progress: 0.5 });  // waits, then a new figure: dropped
handlers["change:figure"]();
message([[[1], { y: [[10]] }]], {});                        // after it: drawn on it
await idle();
cleanup();
console.log(JSON.stringify({ calls, classes: el.classList.names, bar: part(".progress-bar").style.width,
  status: part(".effilab-dashboard-status").textContent, handlers: Object.keys(handlers) }));
"""


def _run(tmp_path) -> dict:
    (tmp_path / "widget.mjs").write_text(live._ESM)
    (tmp_path / "harness.mjs").write_text(HARNESS.replace("VERSION", "9.9.9"))
    out = subprocess.run([NODE, str(tmp_path / "harness.mjs")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_the_front_end_draws_merges_updates_while_busy_and_restarts_on_a_new_figure(tmp_path):
    r = _run(tmp_path)
    calls = r["calls"]
    assert r["classes"] == ["effilab-dashboard"]
    draws = [c for c in calls if c[0] in ("react", "update", "relayout")]
    assert draws == [
        ["react", ["a", "b", "c"], "first", 1],
        ["update", {"y": [[1, 2]]}, {"title.text": "t1"}, [0]],  # came before plotly.js was ready: kept
        ["update", {"y": [[3]]}, {}, [1]],
        # The next two came while that one was drawn: merged (trace 0's latest y only), one update per set
        # of fields, the layout with the first.
        ["update", {"x": [[5], [5]], "y": [[4], [6]]}, {"title.text": "t2"}, [0, 2]],
        ["update", {"y": [[7, 8]]}, {}, [1]],
        ["update", {"y": [[11]]}, {}, [2]],
        # A new figure (a new uirevision: axes are ranged afresh): the update still waiting is never drawn
        # (y 9); the one after it is, on the new figure.
        ["react", ["a", "d"], "second", 2],
        ["update", {"y": [[10]]}, {}, [1]],
    ], draws
    # The header follows the messages, also one whose data was dropped; closing the view lets go of everything.
    assert r["bar"] == "50.0%" and r["status"] == "epoch 2/3"
    assert calls[-2:] == [["disconnect"], ["purge"]] and r["handlers"] == []
