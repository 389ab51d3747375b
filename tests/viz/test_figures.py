"""Telemetry in, traces out: the dashboard's figures from synthetic (and a few real) records."""

from __future__ import annotations

import math

import pytest
import torch

from effilab.core.infobatch import plan_epoch
from effilab.core.telemetry import Telemetry
from effilab.viz import figures as F

from . import synthetic_telemetry


def _traces(fig, prefix: str = "") -> dict:
    return {tr.name: tr for tr in fig.data if tr.name.startswith(prefix)}


def _titles(fig) -> list[str]:
    return [a.text for a in fig.layout.annotations]


def test_every_panel_with_full_telemetry():
    t = synthetic_telemetry()
    assert F.panels(t) == list(F.PANELS)
    fig = F.build_figure(t)
    names = [tr.name for tr in fig.data]
    assert names == [
        "loss: train (steps)", "loss: train", "loss: valid", "metrics: accuracy",
        "scores/infobatch: kept", "scores/infobatch: rescaled", "scores/infobatch: pruned",
        "scores/infobatch: threshold", "kept: infobatch",
        "schedule/lr: planned", "schedule/lr: actual", "schedule/mom: planned", "schedule/mom: actual",
        "memory: rss", "speed: samples/s", "system: data wait", "samples: forwarded", "samples: full data"]
    # one subplot title per cell, in the same order as the cells
    assert len(_titles(fig)) == len(F.cells(t))
    assert fig.layout.height > 1000


def test_panels_appear_only_with_data():
    assert F.panels(Telemetry()) == []
    empty = F.build_figure(Telemetry())
    assert len(empty.data) == 0 and "no telemetry" in empty.layout.title.text
    assert F.panels(synthetic_telemetry(data=False)) == ["training", "schedules", "memory", "throughput"]
    only_fit = synthetic_telemetry(data=False, system=False, schedule=False)
    assert F.panels(only_fit) == ["training"]
    assert F.panels(synthetic_telemetry(fit=False, system=False, schedule=False)) == ["data", "throughput"]
    no_metrics = synthetic_telemetry(metrics=())
    assert "metrics" not in [c.key for c in F.cells(no_metrics)]


def test_epoch_curves_follow_the_records():
    t = synthetic_telemetry(n_epoch=4)
    tr = _traces(F.build_figure(t))
    assert list(tr["loss: valid"].x) == [1, 2, 3, 4]
    assert list(tr["loss: valid"].y) == pytest.approx([1.1 / (e + 1) for e in range(4)], rel=1e-4)  # 5 digits
    assert list(tr["metrics: accuracy"].y) == pytest.approx([0.5, 0.6, 0.7, 0.8])
    steps = tr["loss: train (steps)"]
    assert 0 < min(steps.x) and max(steps.x) == pytest.approx(4.0)  # fractional epochs up to the fit's end
    assert list(tr["kept: infobatch"].y) == pytest.approx([1.0, 0.7, 0.7, 1.0])


@pytest.mark.parametrize("epoch", [1, 2, None])
def test_threshold_line_and_histogram_sums(epoch):
    t = synthetic_telemetry(n_epoch=5)
    # By default the static figure opens on the latest epoch that pruned (the last one, annealing, kept all).
    rec = [r for r in t.records("infobatch", "epoch") if r["pruned"] if epoch is None or r["epoch"] == epoch][-1]
    tr = _traces(F.build_figure(t, epoch=epoch), "scores/infobatch")
    assert list(tr["scores/infobatch: threshold"].x) == [rec["threshold"]] * 2
    kept, resc, pruned = (sum(tr[f"scores/infobatch: {k}"].y) for k in ("kept", "rescaled", "pruned"))
    assert kept + resc == rec["kept"] and resc == rec["rescaled"] and pruned == rec["pruned"]
    assert max(tr["scores/infobatch: threshold"].y) >= max(a + b + c for a, b, c in zip(
        tr["scores/infobatch: kept"].y, tr["scores/infobatch: rescaled"].y, tr["scores/infobatch: pruned"].y))
    # rescaled samples sit left of the threshold
    centers = tr["scores/infobatch: rescaled"].x
    assert all(c < rec["threshold"] + 1e-9 + tr["scores/infobatch: rescaled"].width[0] / 2
               for c, y in zip(centers, tr["scores/infobatch: rescaled"].y) if y)
    title = next(s for s in _titles(F.build_figure(t, epoch=epoch)) if "infobatch" in s)
    assert f"epoch {rec['epoch'] + 1}" in title  # numbered from 1 in every label


@pytest.mark.parametrize("seed", range(4))
def test_histogram_sums_on_a_real_plan(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(3000, generator=g) ** 3 * 5  # long-tailed, like losses
    plan = plan_epoch(scores, ratio=0.5, epoch=3, seed=seed)
    rec = plan.summary()
    t = Telemetry()
    t.record("infobatch", "epoch", fit=0, n_samples=3000, full_epoch=3000, **rec)
    tr = _traces(F.build_figure(t), "scores/infobatch")
    assert rec["rescaled"] > 0 and rec["pruned"] > 0
    assert sum(tr["scores/infobatch: kept"].y) + sum(tr["scores/infobatch: rescaled"].y) == rec["kept"]
    assert sum(tr["scores/infobatch: rescaled"].y) == rec["rescaled"]
    assert sum(tr["scores/infobatch: pruned"].y) == rec["pruned"]
    assert tr["scores/infobatch: threshold"].x[0] == pytest.approx(float(scores.mean()))


def test_any_source_with_a_histogram_is_a_data_decision_source():
    t = synthetic_telemetry(system=False)
    for r in t.records("infobatch", "epoch"):
        t.record("my_pruner", "epoch", **r)
    # a technique without scores (the Random* baseline): a kept-fraction line, no histogram
    t.record("random_prune", "epoch", fit=0, epoch=0, threshold=0.0, kept=70, pruned=30, rescaled=0,
             hist_kept=[0] * 4, hist_pruned=[0] * 4, hist_edges=[0.0] * 5)
    assert F.data_sources(t) == ["infobatch", "my_pruner", "random_prune"]
    keys = [c.key for c in F.cells(t)]
    assert "scores/my_pruner" in keys and "scores/random_prune" not in keys
    tr = _traces(F.build_figure(t), "kept:")
    assert set(tr) == {"kept: infobatch", "kept: my_pruner", "kept: random_prune"}
    assert list(tr["kept: random_prune"].y) == [pytest.approx(0.7)]


def test_planned_schedule_spans_the_fit_and_actual_stops_at_progress():
    t = synthetic_telemetry(n_epoch=5, epochs_done=2)
    tr = _traces(F.build_figure(t), "schedule/")
    planned, actual = tr["schedule/lr: planned"], tr["schedule/lr: actual"]
    assert planned.line.dash == "dash" and actual.line.dash is None
    assert min(planned.x) == 0 and max(planned.x) == pytest.approx(5.0)
    assert max(actual.x) == pytest.approx(2.0)
    assert set(tr) == {f"schedule/{k}: {s}" for k in ("lr", "mom") for s in ("planned", "actual")}
    lr_cell = next(c for c in F.cells(t) if c.key == "schedule/lr")
    assert lr_cell.yaxis.get("type") == "log"  # lr spans decades


def test_actual_schedule_holds_each_value_until_the_next_record():
    # Progressive resizing records its resolution when it changes: 16 px until 40%, then 28 px. A line
    # drawn point to point would show a ramp that never happened.
    t = Telemetry()
    t.set_meta("schedule", planned={"resolution": {"pct": [0.0, 0.4, 0.4, 1.0], "value": [16, 16, 28, 28]}})
    t.record("schedule", "step", iter=0, pct=0.0, resolution=16)
    t.record("schedule", "step", iter=40, pct=0.4, resolution=28)
    tr = _traces(F.build_figure(t), "schedule/")
    assert tr["schedule/resolution: actual"].line.shape == "hv"
    assert tr["schedule/resolution: planned"].line.shape != "hv"


def test_per_group_schedule_keys_share_a_cell():
    t = Telemetry()
    pcts = [0.0, 0.5, 1.0]
    t.set_meta("schedule", planned={"lr/g0": {"pct": pcts, "value": [1e-3, 1e-2, 1e-4]},
                                    "lr/g1": {"pct": pcts, "value": [1e-4, 1e-3, 1e-5]}})
    t.record("schedule", "step", iter=0, pct=0.1, **{"lr/g0": 2e-3, "lr/g1": 2e-4})
    (cell,) = F.cells(t)
    assert cell.key == "schedule/lr"
    assert cell.trace_names == ("schedule/lr: planned (g0)", "schedule/lr: actual (g0)",
                                "schedule/lr: planned (g1)", "schedule/lr: actual (g1)")


def test_memory_without_and_with_a_gpu():
    cpu = F.build_figure(synthetic_telemetry(gpu=False))
    assert "no GPU" in next(s for s in _titles(cpu) if s.startswith("Memory"))
    assert set(_traces(cpu, "memory")) == {"memory: rss"} and not _traces(cpu, "gpu")
    assert "no GPU" in F.summary_text(synthetic_telemetry(gpu=False))
    gpu_t = synthetic_telemetry(gpu=True)
    gpu = F.build_figure(gpu_t)
    assert set(_traces(gpu, "memory")) == {f"memory: cuda {k}" for k in ("allocated", "reserved", "peak")}
    assert list(_traces(gpu, "gpu")["gpu: utilisation"].y)[0] == 90.0
    assert "Fake GPU" in F.summary_text(gpu_t) and "no GPU" not in F.summary_text(gpu_t)


def test_savings_and_time_left():
    t = synthetic_telemetry(n_epoch=4, epochs_done=2, n_samples=1000)
    tr = _traces(F.build_figure(t), "samples:")
    assert list(tr["samples: forwarded"].y) == [1000, 1700]
    assert list(tr["samples: full data"].y) == [1000, 2000]
    st = F.status(t)
    assert st["pct"] == pytest.approx(0.5) and not st["done"]
    assert st["eta_s"] == pytest.approx(st["elapsed_s"])  # half-way: as long again
    assert "left" in F.status_line(t)
    done = F.status(synthetic_telemetry(n_epoch=4))
    assert done["done"] and done["eta_s"] == 0 and done["pct"] == 1.0


def test_a_second_fit_shows_only_itself():
    t = synthetic_telemetry(n_epoch=5)
    synthetic_telemetry(n_epoch=2, fit_index=1, telemetry=t)
    tr = _traces(F.build_figure(t))
    assert list(tr["loss: valid"].x) == [1, 2]
    assert max(tr["loss: train (steps)"].x) == pytest.approx(2.0)
    assert list(tr["samples: full data"].y) == [1000, 2000]  # counts restart with the fit
    assert list(tr["kept: infobatch"].x) == [1, 2]  # epochs numbered from 1, as everywhere
    assert len(tr["memory: rss"].x) < len(t.records("system", "step"))
    assert "fit 1" in F.summary_text(t) and "2 of 2 epochs" in F.summary_text(t)


def test_slider_scrubs_the_histogram_through_the_epochs():
    t = synthetic_telemetry(n_epoch=4)
    fig = F.build_figure(t)
    (slider,) = fig.layout.sliders
    # Numbered from 1; opens on epoch 3, the last that pruned (epoch 4 anneals: everything kept).
    assert [s.label for s in slider.steps] == ["1", "2", "3", "4"] and slider.active == 2
    names = [tr.name for tr in fig.data]
    for step, rec in zip(slider.steps, t.records("infobatch", "epoch")):
        data, layout, idx = step.args
        assert step.method == "update"
        thr = idx.index(names.index("scores/infobatch: threshold"))
        assert data["x"][thr] == [rec["threshold"]] * 2
        pruned = idx.index(names.index("scores/infobatch: pruned"))
        assert sum(data["y"][pruned]) == rec["pruned"]
        assert any(f"epoch {rec['epoch'] + 1}" in v for v in layout.values())
    assert not F.build_figure(t, scrub=False).layout.sliders
    assert not F.build_figure(synthetic_telemetry(n_epoch=1)).layout.sliders  # one epoch: nothing to scrub


def test_figure_delta_brings_a_figure_up_to_date_and_layout_key_tells_a_rebuild():
    t = synthetic_telemetry(n_epoch=5, epochs_done=2)
    fig = F.figure_dict(t, scrub=False, live=True)
    sent = {}
    F.figure_delta(t, F.cells(t), sent)  # what the figure holds
    synthetic_telemetry(n_epoch=5, epochs_done=4, telemetry=Telemetry())  # unrelated store: no effect
    later = synthetic_telemetry(n_epoch=5, epochs_done=4)
    cs = F.cells(later)
    assert F.layout_key(F.cells(t)) == F.layout_key(cs)
    groups, layout = F.figure_delta(later, cs, sent)
    F.apply_delta(fig, groups, layout)
    rebuilt = F.figure_dict(later, scrub=False, live=True)
    assert fig["data"] == rebuilt["data"]
    assert [a["text"] for a in fig["layout"]["annotations"]] == [a["text"] for a in rebuilt["layout"]["annotations"]]
    assert "epoch 4" in fig["layout"]["annotations"][0]["text"]
    assert F.figure_delta(later, cs, sent) == ([], {})  # all sent
    grown = synthetic_telemetry(n_epoch=5, epochs_done=4, gpu=True)
    assert F.layout_key(F.cells(grown)) != F.layout_key(cs)


def test_long_series_are_thinned_for_drawing():
    t = Telemetry()
    t.set_meta("fit", n_epoch=1, n_iter=10_000, metric_names=[])
    for i in range(10_000):
        t.record("fit", "step", iter=i, epoch=0, pct=(i + 1) / 10_000, train_loss=1.0)
    steps = _traces(F.build_figure(t))["loss: train (steps)"]
    assert len(steps.x) <= F.MAX_POINTS + 1 and steps.x[-1] == pytest.approx(1.0)


def test_summary_text_lines():
    text = F.summary_text(synthetic_telemetry(n_epoch=3))
    lines = text.splitlines()
    assert lines[0].startswith("Training (fit 0): 3 of 3 epochs")
    assert any(line.startswith("Data decisions (infobatch)") for line in lines)
    assert any("saved" in line for line in lines if line.startswith("Samples forwarded"))
    assert any(line.startswith("Schedules") and "lr" in line for line in lines)
    assert any(line.startswith("Throughput") for line in lines)
    assert any(line.startswith("Memory") for line in lines)
    assert F.summary_text(Telemetry()) == "No telemetry recorded yet."


def test_report_html_is_self_contained(tmp_path):
    t = synthetic_telemetry()
    path = tmp_path / "report.html"
    F.report_html(t, path)
    html = path.read_text()
    assert "plotly.js v" in html and len(html) > 1_000_000  # the library itself...
    assert 'src="https://' not in html  # ...not a link to a CDN
    for title in ("Training: loss", "Data decisions (infobatch)", "Schedule: lr", "Memory", "Throughput"):
        assert title in html
    assert "Samples forwarded:" in html  # the summary


def test_figure_bundle_for_notebooks():
    b = F.figure_bundle(F.build_figure(synthetic_telemetry(n_epoch=2)))
    assert set(b) == {"application/vnd.plotly.v1+json", "text/html", "text/plain"}
    assert b["application/vnd.plotly.v1+json"]["data"][0]["name"] == "loss: train (steps)"
    assert len(b["text/html"]) < 500_000 and 'src="https://cdn.plot.ly' in b["text/html"]  # not inline


def test_one_epoch_numbering_in_every_label_and_axis():
    t = synthetic_telemetry(n_epoch=3)
    fig = F.build_figure(t)
    tr = _traces(fig)
    # Epoch k (from 1) ends at x = k on every per-epoch axis; steps run up to it.
    for name in ("loss: valid", "metrics: accuracy", "kept: infobatch", "samples: forwarded"):
        assert list(tr[name].x) == [1, 2, 3], name
    assert max(tr["loss: train (steps)"].x) == pytest.approx(3.0)
    assert [s.label for s in fig.layout.sliders[0].steps] == ["1", "2", "3"]
    titles = " ".join(_titles(fig))
    assert "epoch 3:" in titles and "epoch 0" not in titles
    assert "epoch 2:" in titles  # the histogram, on the last epoch that pruned
    assert F.status_line(t).startswith("epoch 3/3")
    axis_titles = {ax.title.text for ax in (fig.layout[k] for k in fig.layout if k.startswith("xaxis"))}
    assert "epochs trained" not in axis_titles and "epoch" in axis_titles
    from effilab.viz import kept_per_epoch, score_histogram
    assert list(kept_per_epoch(t).data[0].x) == [1, 2, 3]
    assert "start of epoch 2" in score_histogram(t, epoch=1).layout.title.text


def test_static_figure_opens_on_an_epoch_that_pruned():
    t = synthetic_telemetry(n_epoch=6)  # epoch 0 keeps all (equal scores), the last one anneals
    recs = t.records("infobatch", "epoch")
    assert recs[-1]["pruned"] == 0 and recs[-2]["pruned"] > 0
    fig = F.build_figure(t)
    assert fig.layout.sliders[0].active == 4
    title = next(s for s in _titles(fig) if s.startswith("Data decisions (infobatch)"))
    assert "epoch 5:" in title and "annealing" not in title
    pruned = _traces(fig)["scores/infobatch: pruned"]
    assert sum(pruned.y) == recs[-2]["pruned"]
    # The live figure follows the fit: the latest epoch, whatever it did.
    live = F.build_figure(t, scrub=False, live=True)
    assert sum(_traces(live)["scores/infobatch: pruned"].y) == 0
    assert F.informative_epoch(recs[:1]) == 0  # nothing pruned yet: the latest


def test_memory_panel_says_what_it_plots():
    cpu = next(c for c in F.cells(synthetic_telemetry(gpu=False)) if c.key == "memory")
    assert cpu.title.startswith(F.MEMORY_RSS_TITLE) and "RSS" in cpu.title and "RAM" in cpu.title
    gpu = next(c for c in F.cells(synthetic_telemetry(gpu=True)) if c.key == "memory")
    assert gpu.title.startswith(F.MEMORY_CUDA_TITLE)
    assert all(w in gpu.title for w in ("allocated", "reserved", "peak", "held by tensors", "caching allocator"))
    assert "RSS" not in gpu.title


def test_system_cell_shows_mfu_and_data_wait():
    t = synthetic_telemetry()
    plain = next(c for c in F.cells(t) if c.key == "system")
    assert plain.trace_names == ("system: data wait",) and "MFU" not in plain.title  # no FLOPs measured
    t.set_meta("system", peak_flops=1e11, peak_source="measured: fp32 512x512 matmul, 1 thread")
    for i, mfu in enumerate((0.10, 0.20, 0.25)):
        t.record("system", "step", time_s=100.0 + i, iter=1000 + i, samples_per_s=2000.0, data_wait_frac=0.3,
                 rss_mb=500.0, flops_per_s=mfu * 1e11, mfu=mfu)
    cell = next(c for c in F.cells(t) if c.key == "system")
    assert cell.panel == "throughput" and cell.yaxis["range"] == [0, 1.05]
    traces = {tr["name"]: tr for tr in cell.traces}
    assert list(traces["system: mfu"]["y"]) == [0.1, 0.2, 0.25]
    assert list(traces["system: data wait"]["y"])[-3:] == [0.3, 0.3, 0.3]
    assert "measured: fp32 512x512 matmul" in cell.title and "model FLOPs utilisation" in cell.title
    assert "model FLOPs utilisation 20.0%" in F.summary_text(t)  # the median over the steps with an MFU


def test_loss_curve_reads_the_sync_free_recorder_points():
    t = synthetic_telemetry(n_epoch=2, steps_per_epoch=50)
    from_fit = next(c for c in F.cells(t) if c.key == "loss").traces[0]
    t.set_meta("fit", train_loss_from="recorder")
    # Reads every 20 steps and at each epoch's end; the second epoch is still running (30 of 50 steps read).
    for it, epoch, n, loss in ((19, 0, 20, 2.0), (39, 0, 20, 1.5), (49, 0, 10, 1.2), (69, 1, 20, 1.0),
                               (79, 1, 10, 0.9)):
        t.record("recorder", "read", iter=it, epoch=epoch, smooth_loss=loss, n=n)
    t.record("fit", "epoch", epoch=0, train_loss=1.2, valid_loss=1.3, time_s=1.0)
    trace = next(c for c in F.cells(t) if c.key == "loss").traces[0]
    assert trace["name"] == "loss: train (steps)" and trace["y"] != from_fit["y"]
    assert trace["y"] == [2.0, 1.5, 1.2, 1.0, 0.9]
    assert trace["x"] == [0.4, 0.8, 1.0, 1.4, 1.6]  # epoch 1 of 2 ends at x = 1


def test_memory_axis_starts_at_zero():
    t = synthetic_telemetry()  # RSS 500 -> 504 MB
    for gpu in (False, True):
        fig = F.build_figure(synthetic_telemetry(gpu=gpu))
        cell = next(c for c in F.cells(synthetic_telemetry(gpu=gpu)) if c.key == "memory")
        assert cell.yaxis.get("rangemode") == "tozero" or cell.yaxis["range"][0] == 0
        axis = next(k for k in fig.layout if k.startswith("yaxis")
                    and fig.layout[k].title.text == "MB")
        assert fig.layout[axis].rangemode == "tozero"
    assert t


def test_cells_without_a_point_are_hidden():
    t = Telemetry()
    t.set_meta("system", device="cpu", has_gpu=False, nvml=True, note="no GPU")
    t.set_meta("fit", n_epoch=3, n_iter=10, metric_names=["accuracy"], fit_index=0)
    assert F.cells(t) == []  # writers announced themselves, nothing measured yet
    t.record("fit", "step", iter=0, epoch=0, pct=0.03, train_loss=2.0)
    assert [c.key for c in F.cells(t)] == ["loss"]  # no metrics, no memory, no GPU, no speed yet
    t.record("system", "step", time_s=0.5, iter=3, samples_per_s=100.0, data_wait_frac=0.1, rss_mb=500.0)
    assert [c.key for c in F.cells(t)] == ["loss", "memory", "speed", "system"]  # still no GPU utilisation


def test_live_title_leaves_the_status_to_the_header():
    t = synthetic_telemetry(n_epoch=4, epochs_done=2)
    assert F.status_line(t) in F.build_figure(t).layout.title.text
    live = F.build_figure(t, scrub=False, live=True)
    assert F.status_line(t) not in live.layout.title.text and "epoch" not in live.layout.title.text
    fig, sent = F.figure_dict(t, scrub=False, live=True), {}
    F.apply_delta(fig, *F.figure_delta(t, F.cells(t), sent))
    assert "epoch" not in fig["layout"]["title"]["text"]


def test_lr_find_marks_sit_on_their_learning_rate():
    lrs = [10 ** (-7 + 8 * i / 99) for i in range(100)]
    losses = [2.0 - 0.5 * math.exp(-((math.log10(lr) + 2.5) ** 2)) for lr in lrs]
    fig = F.lr_find_figure(lrs, losses, {"valley": 3e-3, "LR": 1e-2})
    assert fig.layout.xaxis.type == "log"
    # plotly.js places a shape on a log axis by its value, an annotation by the value's log10.
    assert [(s.x0, s.x1) for s in fig.layout.shapes] == [(3e-3, 3e-3), (1e-2, 1e-2)]
    assert [a.x for a in fig.layout.annotations] == pytest.approx([math.log10(3e-3), -2.0])
    assert [a.text for a in fig.layout.annotations] == ["valley: 3.0e-03", "LR: 1.0e-02"]
    # plotly's `add_vline` on a log axis gives the label's number to the line as well (what was drawn
    # before): that line sits at 10^-2.5, outside every learning rate tried, not at the mark.
    with pytest.raises(ValueError, match="positive learning rate"):
        F.lr_find_figure(lrs, losses, {"valley": math.log10(3e-3)})
    with pytest.raises(ValueError, match="as many losses"):
        F.lr_find_figure(lrs, losses[:-1])
