"""Synthetic telemetry shaped like the writers' (FitRecorder, SystemMonitor, InfoBatch), for figure tests
and for timing a dashboard update without training."""

from __future__ import annotations

import math

from effilab.core.telemetry import Telemetry

BINS = 40


def synthetic_telemetry(n_epoch: int = 5, epochs_done: int | None = None, steps_per_epoch: int = 50,
                        n_samples: int = 1000, gpu: bool = False, data: bool = True, metrics=("accuracy",),
                        system: bool = True, schedule: bool = True, fit: bool = True, fit_index: int = 0,
                        telemetry: Telemetry | None = None) -> Telemetry:
    """A fit of `n_epoch` epochs, `epochs_done` of them (default: all) recorded as the writers would."""
    t = telemetry or Telemetry()
    done = n_epoch if epochs_done is None else epochs_done
    n_iter = steps_per_epoch
    prev_sys = t.latest("system", "epoch") or {}
    if fit:
        t.set_meta("fit", n_epoch=n_epoch, n_iter=n_iter, bs=n_samples // n_iter, n_train=n_samples,
                   fit_index=fit_index, metric_names=list(metrics))
    if schedule:
        pcts = [k / 200 for k in range(201)]
        lr = [1e-3 * (0.04 + 0.96 * math.sin(math.pi * p) ** 2) for p in pcts]
        mom = [0.95 - 0.1 * math.sin(math.pi * p) for p in pcts]
        t.set_meta("schedule", planned={"lr": {"pct": pcts, "value": lr}, "mom": {"pct": pcts, "value": mom}})
    if system:
        t.set_meta("system", device="cuda:0" if gpu else "cpu", has_gpu=gpu,
                   gpu_name="Fake GPU" if gpu else None, nvml=gpu,
                   total_memory_mb=80_000.0 if gpu else 16_000.0,
                   note=None if gpu else "no GPU: showing process memory (RSS)")
    time_s, fwd_total = 0.0, prev_sys.get("samples_total", 0)
    full_total = prev_sys.get("full_samples_total", 0)
    ib_fwd = (t.latest("infobatch", "samples") or {}).get("forwarded_total", 0)
    ib_full = (t.latest("infobatch", "samples") or {}).get("full_total", 0)
    for e in range(done):
        kept = n_samples if e == 0 or e >= n_epoch - 1 else int(n_samples * 0.7)
        pruned = n_samples - kept
        if data:
            threshold = 1.0 / (e + 1)
            edges = [threshold * 2 * i / BINS for i in range(BINS + 1)]
            below = BINS // 2  # bins entirely below the threshold
            hist_pruned = [0] * BINS
            hist_kept = [0] * BINS
            per_bin = n_samples // BINS
            for i in range(BINS):
                hist_kept[i] = per_bin
            for k in range(pruned):  # pruned samples all come from below the threshold
                hist_pruned[k % below] += 1
                hist_kept[k % below] -= 1
            hist_kept[-1] += n_samples - per_bin * BINS
            rescaled = sum(hist_kept[:below]) if pruned else 0
            t.record("infobatch", "epoch", fit=fit_index, total_epochs=n_epoch, n_samples=n_samples,
                     full_epoch=n_samples, epoch=e, threshold=threshold, kept=kept, pruned=pruned,
                     rescaled=rescaled, annealing=e >= n_epoch - 1, hist_kept=hist_kept,
                     hist_pruned=hist_pruned, hist_edges=edges)
        steps = math.ceil(n_iter * kept / n_samples)
        for s in range(steps):
            it = e * n_iter + s
            pct = (e + (s + 1) / steps) / n_epoch
            if fit and (s % 5 == 0 or s == steps - 1):
                t.record("fit", "step", iter=it, epoch=e, pct=pct, train_loss=2.0 / (1 + it / 20))
                if schedule:
                    lr = 1e-3 * (0.04 + 0.96 * math.sin(math.pi * pct) ** 2)
                    mom = 0.95 - 0.1 * math.sin(math.pi * pct)
                    t.record("schedule", "step", iter=it, pct=pct, lr=lr, mom=mom)
            time_s += 0.05
            if system and s % 10 == 0:
                rec = {"time_s": time_s, "iter": it, "samples_per_s": 2000.0 + 10 * s, "data_wait_frac": 0.05,
                       "rss_mb": 500.0 + e}
                if gpu:
                    rec |= {"cuda_allocated_mb": 1000.0 + e, "cuda_reserved_mb": 2000.0,
                            "cuda_peak_mb": 1500.0, "gpu_util": 90.0}
                t.record("system", "step", **rec)
        fwd_total += kept
        full_total += n_samples
        if data:
            ib_fwd += kept
            ib_full += n_samples
            t.record("infobatch", "samples", fit=fit_index, epoch=e, forwarded=kept, forwarded_total=ib_fwd,
                     full_total=ib_full)
        if fit:
            rec = {"epoch": e, "train_loss": 1.0 / (e + 1), "valid_loss": 1.1 / (e + 1),
                   "time_s": steps * 0.05}
            rec |= {m: 0.5 + 0.1 * e for m in metrics}
            t.record("fit", "epoch", **rec)
        if system:
            rec = {"epoch": e, "samples": kept, "samples_total": fwd_total, "full_samples_total": full_total,
                   "time_s": time_s, "data_wait_frac": 0.05, "peak_rss_mb": 600.0 + e}
            if gpu:
                rec["cuda_peak_mb"] = 1500.0
            t.record("system", "epoch", **rec)
    return t
