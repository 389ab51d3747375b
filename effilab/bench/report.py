"""The campaign report (stage 4 of the bench, beside the table): plotly figures and a self-contained
`report.html`, drawn from the results (`results.json`'s content) only,
so that the report always says what the JSON says.

Figures: accuracy against wall-clock and against training samples forwarded (one point per run, the
mean per recipe with its std as error bars), what each recipe saved against the baseline (samples,
wall-clock, CPU time, optimiser steps, and time to the target accuracy when one was set), and accuracy
against spend (training FLOPs, or the campaign's budget unit) with the Pareto front of the recipes' means
and each technique joined to its budget-matched baseline; and in words, per technique, whether it beat
that baseline (a paired test over seeds).
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from .store import RunFailure, RunResult
from .table import MATCHED, html_table, matched_text

__all__ = ["figures", "matched_verdicts", "pareto_figure", "pareto_front", "report_html", "write_report"]

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
           "#bcbd22")


def _colors(names: list[str]) -> dict[str, str]:
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}


def _runs(data: Mapping) -> list[RunResult]:
    return [RunResult.from_dict(r) for r in data.get("runs", []) if r.get("status", "ok") == "ok"]


def _order(data: Mapping) -> list[str]:
    names = [r["recipe"] for r in data.get("summary", [])]
    return names or list(dict.fromkeys(r["recipe"] for r in data.get("runs", [])))


def accuracy_figure(data: Mapping) -> go.Figure:
    """Accuracy (%) against wall-clock (s) and against samples forwarded: one point per run, the mean
    per recipe (diamond, ± std both ways)."""
    runs, names = _runs(data), _order(data)
    colors = _colors(names)
    summary = {s["recipe"]: s for s in data.get("summary", [])}
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1,
                        subplot_titles=("Accuracy vs wall-clock", "Accuracy vs training samples forwarded"))
    for name in names:
        rs = [r for r in runs if r.recipe == name]
        s = summary.get(name, {})
        if not rs:
            continue
        for col, xkey in enumerate(("wall_s", "samples"), start=1):
            fig.add_trace(go.Scatter(
                x=[getattr(r, xkey) for r in rs], y=[100 * r.accuracy for r in rs], mode="markers",
                name=f"{name}: runs", legendgroup=name, showlegend=False,
                marker={"color": colors[name], "size": 8, "opacity": 0.55},
                text=[f"{name}, seed {r.seed}" for r in rs],
                hovertemplate="%{text}<br>%{x:,.1f}<br>accuracy %{y:.2f}%<extra></extra>"), row=1, col=col)
            fig.add_trace(go.Scatter(
                x=[s[f"{xkey}_mean"]], y=[100 * s["accuracy_mean"]], mode="markers", name=name,
                legendgroup=name, showlegend=col == 1,
                marker={"color": colors[name], "size": 15, "symbol": "diamond",
                        "line": {"width": 1, "color": "black"}},
                error_x={"type": "data", "array": [s[f"{xkey}_std"]], "visible": True, "color": colors[name]},
                error_y={"type": "data", "array": [100 * s["accuracy_std"]], "visible": True,
                         "color": colors[name]},
                hovertemplate=f"{html.escape(name)} (mean of {len(rs)})<br>%{{x:,.1f}}<br>"
                              "accuracy %{y:.2f}%<extra></extra>"), row=1, col=col)
    target = data.get("config", {}).get("target_acc")
    if target is not None:
        for col in (1, 2):
            fig.add_hline(y=100 * target, line_dash="dash", line_color="gray", row=1, col=col,
                          annotation_text=f"target {100 * target:g}%", annotation_position="bottom right")
    fig.update_xaxes(title_text="wall-clock of the fit (s)", row=1, col=1)
    fig.update_xaxes(title_text="training samples forwarded", row=1, col=2)
    fig.update_yaxes(title_text="final validation accuracy (%)", row=1, col=1)
    title = "What each recipe cost, and what it reached (one dot per run; diamonds: mean ± std)"
    fig.update_layout(template="plotly_white", height=430,
                      title={"text": title, "x": 0.01, "font": {"size": 15}},
                      legend={"title": {"text": "recipe"}}, margin={"t": 80, "l": 60, "r": 20, "b": 60})
    return fig


_SAVINGS = (("samples forwarded", "samples_frac"), ("wall-clock", "wall_frac"), ("CPU time", "cpu_frac"),
            ("optimiser steps", "steps_frac"))


def savings_figure(data: Mapping) -> go.Figure:
    """Bars: what each recipe saved against the baseline, in % (negative: it cost more)."""
    summary = [s for s in data.get("summary", []) if s.get("n_runs")]
    ref = next((s.get("reference") for s in summary if s.get("reference")), None)
    colors = _colors(_order(data))
    metrics = list(_SAVINGS)
    if data.get("config", {}).get("target_acc") is not None:
        metrics.append(("time to target", "time_to_target_frac"))
    fig = go.Figure()
    for s in summary:
        if s["recipe"] == ref:
            continue
        xs, ys = [], []
        for label, key in metrics:
            frac = s.get(key)
            if frac is not None:
                xs.append(label)
                ys.append(100 * (1 - frac))
        hover = f"{html.escape(s['recipe'])}<br>%{{x}}: %{{y:.1f}}% saved<extra></extra>"
        fig.add_trace(go.Bar(x=xs, y=ys, name=s["recipe"], marker_color=colors.get(s["recipe"]),
                             text=[f"{y:+.0f}%" for y in ys], textposition="outside", hovertemplate=hover))
    title = (f"Saved against {ref} (%; negative: more than {ref})" if ref
             else "Saved against full data (%): no baseline recipe in this campaign")
    if not ref:
        for s in summary:
            fig.add_trace(go.Bar(x=["samples forwarded"], y=[100 * (1 - s["samples_frac"])], name=s["recipe"],
                                 marker_color=colors.get(s["recipe"])))
    fig.update_layout(template="plotly_white", barmode="group", height=380,
                      title={"text": title, "x": 0.01, "font": {"size": 15}}, yaxis_title="% saved",
                      margin={"t": 70, "l": 60, "r": 20, "b": 50}, legend={"title": {"text": "recipe"}})
    fig.add_hline(y=0, line_color="black", line_width=1)
    return fig


# The spend on the Pareto picture's x-axis: the campaign's budget unit, else training FLOPs.
_SPEND_AXES = {"samples": ("samples", "training samples forwarded"), "steps": ("steps", "optimiser steps"),
               "flops": ("flops", "training FLOPs (forward+backward)"),
               "time": ("train_s", "training wall-clock (s)")}


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (spend, accuracy) points no other point beats with less or equal spend, by increasing spend."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def pareto_figure(data: Mapping) -> go.Figure:
    """Accuracy (%) against spend: one point per run (every seed), the mean per recipe (diamond, ± std both
    ways), the Pareto front of the means, and a dotted line from each technique to its budget-matched
    baseline (`baseline@<name>`)."""
    runs, names = _runs(data), _order(data)
    colors = _colors(names)
    unit = data.get("config", {}).get("budget") or "flops"
    key, label = _SPEND_AXES[unit]
    if any(getattr(r, key) is None for r in runs):
        key, label = "samples", "training samples forwarded"
    fig = go.Figure()
    means: dict[str, tuple[float, float]] = {}
    for name in names:
        rs = [r for r in runs if r.recipe == name]
        if not rs:
            continue
        xs, ys = [float(getattr(r, key)) for r in rs], [100 * r.accuracy for r in rs]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", name=f"{name}: runs", legendgroup=name,
                                 showlegend=False, marker={"color": colors[name], "size": 8, "opacity": 0.55},
                                 text=[f"{name}, seed {r.seed}" for r in rs],
                                 hovertemplate="%{text}<br>%{x:,.4g}<br>accuracy %{y:.2f}%<extra></extra>"))
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        sx = (sum((x - mx) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
        sy = (sum((y - my) ** 2 for y in ys) / (len(ys) - 1)) ** 0.5 if len(ys) > 1 else 0.0
        means[name] = (mx, my)
        fig.add_trace(go.Scatter(
            x=[mx], y=[my], mode="markers", name=name, legendgroup=name,
            marker={"color": colors[name], "size": 15, "symbol": "square" if name.startswith(MATCHED) else "diamond",
                    "line": {"width": 1, "color": "black"}},
            error_x={"type": "data", "array": [sx], "visible": True, "color": colors[name]},
            error_y={"type": "data", "array": [sy], "visible": True, "color": colors[name]},
            hovertemplate=f"{html.escape(name)} (mean of {len(rs)})<br>%{{x:,.4g}}<br>accuracy %{{y:.2f}}%"
                          "<extra></extra>"))
    for name, (mx, my) in means.items():
        if MATCHED + name in means:
            bx, by = means[MATCHED + name]
            fig.add_trace(go.Scatter(x=[mx, bx], y=[my, by], mode="lines", name=f"{name} vs {MATCHED}{name}",
                                     showlegend=False, hoverinfo="skip",
                                     line={"color": colors[name], "dash": "dot", "width": 1.5}))
    front = pareto_front(list(means.values()))
    if front:
        fig.add_trace(go.Scatter(x=[p[0] for p in front], y=[p[1] for p in front], mode="lines",
                                 name="Pareto front (means)", line={"color": "gray", "dash": "dash"},
                                 hoverinfo="skip"))
    title = ("Accuracy against spend (one dot per run and seed; diamonds: mean ± std; squares: budget-matched "
             "baselines, dotted to their technique)")
    fig.update_layout(template="plotly_white", height=460, xaxis_title=label,
                      yaxis_title="final validation accuracy (%)",
                      title={"text": title, "x": 0.01, "font": {"size": 14}}, legend={"title": {"text": "recipe"}},
                      margin={"t": 80, "l": 60, "r": 20, "b": 60})
    return fig


def matched_verdicts(data: Mapping) -> list[tuple[str, str]]:
    """(technique, sentence) for each technique with a budget-matched baseline in the summary."""
    return [(s["recipe"], f"{s['recipe']}: {matched_text(s['matched'])}")
            for s in data.get("summary", []) if s.get("matched")]


def figures(data: Mapping) -> dict[str, go.Figure]:
    """The report's figures by name: "accuracy" (against wall-clock and samples), "savings" and "pareto"
    (accuracy against spend, with the budget-matched baselines)."""
    return {"accuracy": accuracy_figure(data), "savings": savings_figure(data), "pareto": pareto_figure(data)}


def _verdicts_html(data: Mapping) -> str:
    items = "".join(f"<li class='effilab-verdict' data-recipe='{html.escape(name, quote=True)}'>"
                    f"{html.escape(text)}</li>" for name, text in matched_verdicts(data))
    if not items:
        return ""
    return ("<h3>Against the budget-matched baseline</h3><p>Each technique against the baseline recipe given "
            "exactly what the technique spent, its schedule decayed to the end (Kaddour et al., NeurIPS 2023): "
            "the mean accuracy difference, paired over seeds.</p>" f"<ul>{items}</ul>")


def _failures_html(data: Mapping) -> str:
    failures = [RunFailure.from_dict(f) for f in data.get("failures", [])]
    if not failures:
        return ""
    items = "".join(f"<li class='effilab-failure'><b>{html.escape(f.recipe)}</b> seed {f.seed}: "
                    f"{html.escape(f.message)}<details><summary>traceback</summary><pre>"
                    f"{html.escape(f.traceback)}</pre></details></li>" for f in failures)
    return f"<h3>Failed runs ({len(failures)})</h3><ul>{items}</ul>"


def report_html(data: Mapping, title: str | None = None) -> str:
    """The whole report as one HTML document (plotly.js embedded once: it opens offline)."""
    cfg = data.get("config", {})
    title = title or f"effilab bench: {cfg.get('task', '?')}"
    status = data.get("status", "")
    notes = {"interrupted": "The campaign was interrupted: these are the runs that finished. Continue it "
                            "with <code>--resume</code>.",
             "running": "The campaign is still running: these are the runs finished so far.",
             "failed": "Some runs failed (below); the table and figures show the runs that finished."}
    note = notes.get(status, "")
    parts = [pio.to_html(fig, include_plotlyjs=i == 0, full_html=False, config={"displaylogo": False})
             for i, fig in enumerate(figures(data).values())]  # plotly.js once, with the first figure
    keys = ("task", "task_kwargs", "seeds", "epochs", "budget", "bs", "lr", "model", "width", "target_acc",
            "device")
    settings = {k: cfg.get(k) for k in keys}
    recipes = "".join(f"<li><b>{html.escape(r['name'])}</b>: "
                      f"{html.escape(' + '.join(r['components']) or '-')}</li>"
                      for r in cfg.get("recipes", []))
    n_runs, n_failed = len(data.get("runs", [])), len(data.get("failures", []))
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title></head>\n<body style='font-family:sans-serif;margin:1em 2em'>\n"
        f"<h2>{html.escape(title)}</h2>\n"
        f"<p class='effilab-status' data-status='{html.escape(status)}'>{n_runs} runs finished, {n_failed} "
        f"failed, in {data.get('total_s', 0):.0f} s. {note}</p>\n"
        f"{html_table(data)}\n{_verdicts_html(data)}\n{_failures_html(data)}\n{''.join(parts)}\n"
        f"<h3>Recipes</h3><ul>{recipes}</ul>\n"
        f"<h3>Settings</h3><pre>{html.escape(json.dumps(settings, indent=1))}</pre>\n"
        f"<h3>Machine</h3><pre>{html.escape(json.dumps(data.get('env', {}), indent=1))}</pre>\n"
        "</body></html>\n")


def write_report(data: Mapping, path) -> Path:
    """Write `report_html(data)` to `path` (through a temporary file: never half-written)."""
    import os

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(report_html(data), encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
