"""Static plotly figures drawn from telemetry records (a `Telemetry`, e.g. `learn.telemetry`).

Each function reads records only, never a technique's state, and returns a `plotly.graph_objects.Figure`
(show it with `fig.show()`, or hand it to a dashboard). Records of a data-pruning technique are expected
in stream `"epoch"` as written by `effilab.data.InfoBatch` / `RandomPrune`.
"""

from __future__ import annotations

import plotly.graph_objects as go

from ..core.telemetry import Telemetry

__all__ = ["KEPT", "PRUNED", "RESCALED", "kept_per_epoch", "score_histogram"]

# One colour per decision, shared by every figure so they read together.
KEPT = "#2c7fb8"
RESCALED = "#7fcdbb"
PRUNED = "#f03b20"

# Horizontal, above the plot, in the order the traces were added (plotly reverses stacked bars by default).
_LEGEND = dict(orientation="h", y=1.02, yanchor="bottom", x=1, xanchor="right", traceorder="normal")


def _epoch_records(telemetry: Telemetry, source: str, fit: int | None) -> list[dict]:
    recs = telemetry.records(source, "epoch")
    if not recs:
        raise ValueError(f"no {source!r} epoch records in this telemetry (sources: {telemetry.sources}); "
                         "train with the technique's callback first")
    # A Learner fitted twice holds both fits' records; by default show the latest fit.
    fit = max(r.get("fit", 0) for r in recs) if fit is None else fit
    recs = [r for r in recs if r.get("fit", 0) == fit]
    if not recs:
        raise ValueError(f"no {source!r} epoch records for fit {fit}")
    return recs


def score_histogram(telemetry: Telemetry, epoch: int | None = None, source: str = "infobatch",
                    fit: int | None = None) -> go.Figure:
    """Histogram of the scores at the start of `epoch` (fastai's `learn.epoch`, from 0; default: the
    latest), kept vs pruned stacked, with the pruning threshold (the mean score) as a dashed line. Titles
    number epochs from 1, as the dashboard does.

    The range is [min score, mean + 3 std]: a long tail of hard samples lands in the last bin.
    """
    recs = _epoch_records(telemetry, source, fit)
    if epoch is None:
        rec = recs[-1]
    else:
        rec = next((r for r in recs if r["epoch"] == epoch), None)
        if rec is None:
            raise ValueError(f"no {source!r} record for epoch {epoch} (have {[r['epoch'] for r in recs]})")
    edges = rec.get("hist_edges")
    if not edges or not (any(rec["hist_kept"]) or any(rec["hist_pruned"])):
        raise ValueError(f"{source!r} records carry no score histogram")
    centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
    fig = go.Figure([
        go.Bar(x=centers, y=rec["hist_kept"], width=widths, name="kept", marker_color=KEPT),
        go.Bar(x=centers, y=rec["hist_pruned"], width=widths, name="pruned", marker_color=PRUNED),
    ])
    fig.add_vline(x=rec["threshold"], line_dash="dash", line_color="black", annotation_position="top right",
                  annotation_text=f"threshold (mean) = {rec['threshold']:.3g}")
    note = " (annealing: all kept)" if rec.get("annealing") else ""
    fig.update_layout(barmode="stack", bargap=0, template="plotly_white", height=360,
                      title=f"Scores at the start of epoch {rec['epoch'] + 1}: {rec['kept']} kept, "
                            f"{rec['pruned']} pruned{note}",
                      xaxis_title="score (latest training loss)", yaxis_title="samples",
                      legend=_LEGEND)
    return fig


def kept_per_epoch(telemetry: Telemetry, source: str = "infobatch", fit: int | None = None) -> go.Figure:
    """Per epoch, the training set split into kept with weight 1, kept and up-weighted (rescaled), and
    pruned, as stacked bars; annealing epochs are shaded."""
    recs = _epoch_records(telemetry, source, fit)
    epochs = [r["epoch"] + 1 for r in recs]  # numbered from 1, as in the dashboard
    rescaled = [r.get("rescaled", 0) for r in recs]
    plain = [r["kept"] - s for r, s in zip(recs, rescaled)]
    pruned = [r["pruned"] for r in recs]
    fig = go.Figure([
        go.Bar(x=epochs, y=plain, name="kept, weight 1", marker_color=KEPT),
        go.Bar(x=epochs, y=rescaled, name="kept, weight 1/(1-r)", marker_color=RESCALED),
        go.Bar(x=epochs, y=pruned, name="pruned", marker_color=PRUNED),
    ])
    annealing = [e for e, r in zip(epochs, recs) if r.get("annealing")]
    if annealing:
        fig.add_vrect(x0=min(annealing) - 0.5, x1=max(annealing) + 0.5, fillcolor="grey", opacity=0.15,
                      line_width=0, annotation_text="annealing", annotation_position="top left")
    top = max(r["kept"] + r["pruned"] for r in recs)
    fig.update_layout(barmode="stack", template="plotly_white", height=360,
                      title=f"{source}: what each epoch trained on", xaxis=dict(title="epoch", dtick=1),
                      yaxis=dict(title="samples", range=[0, 1.12 * top]),  # headroom for the annotation
                      legend=_LEGEND)
    return fig
