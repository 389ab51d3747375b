"""The summary of a campaign's runs: per recipe, means and spreads over seeds and costs against a
reference recipe (`summarize`), and its table as text cells (`table_rows`), markdown (`format_table`) and
HTML (`html_table`).

Stage 4 of the bench (recipes -> run -> stored result -> **table**/report): it reads stored records only.
A cell that cannot be formatted (a missing or non-finite value) shows "—": the table never raises on an
odd result.
"""

from __future__ import annotations

import html
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .store import RunFailure, RunResult

__all__ = ["format_table", "html_table", "paired_test", "summarize", "table_rows"]

MATCHED = "baseline@"  # a budget-matched baseline's name: MATCHED + the technique's
ALPHA = 0.05  # a paired difference over seeds counts as a win or a loss below this p-value
# Fewer seeds give a p-value but no verdict: two near-equal differences make a t-test "significant" on one
# degree of freedom, and an exact sign-flip test cannot go below p = 0.5.
MIN_SEEDS = 3


def _num(value) -> float | None:
    """`value` as a finite float, else None (missing, NaN, infinite or not a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _mean_std(values: Iterable) -> tuple[float | None, float | None]:
    xs = [x for x in map(_num, values) if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def _ratio(row: dict, ref: dict | None, key: str) -> float | None:
    """`row[key] / ref[key]`, or None when either is missing (no reference, a target never reached)."""
    a, b = _num(row.get(key)), _num((ref or {}).get(key))
    return None if a is None or not b else a / b


def _reference(rows: list[dict], reference: str) -> dict | None:
    return next((row for row in rows if row["recipe"] == reference and row["n_runs"]), None)


_MEANS = ("accuracy", "best_accuracy", "wall_s", "cpu_s", "samples", "backpropagated", "steps", "work",
          "throughput", "epochs_run", "flops", "train_s")


def _sign_flip_p(diffs: list[float]) -> float:
    """Exact two-sided p of a paired sign-flip permutation test: the share of the 2^n sign patterns whose
    mean is at least as far from zero as the observed one (scipy's t-test is used when it is installed)."""
    from itertools import product

    observed = abs(statistics.fmean(diffs))
    flips = [abs(statistics.fmean(s * d for s, d in zip(signs, diffs)))
             for signs in product((1, -1), repeat=len(diffs))]
    return sum(f >= observed - 1e-12 for f in flips) / len(flips)


def paired_test(diffs: Sequence[float]) -> dict:
    """Per-seed accuracy differences (technique minus its budget-matched baseline) tested against zero:
    {n, mean, p, test, verdict}. A paired t-test (scipy) for n >= 2 with spread, an exact sign-flip test
    without scipy; n < 2 or no spread: p None and verdict "n/a". Verdict "beat" / "lost" where p < `ALPHA`,
    else "no clear difference"; "too few seeds" below `MIN_SEEDS` (the p-value is still given)."""
    xs = [x for x in map(_num, diffs) if x is not None]
    n = len(xs)
    out = {"n": n, "mean": statistics.fmean(xs) if xs else None, "p": None, "test": None, "verdict": "n/a"}
    if n < 2 or statistics.pstdev(xs) == 0:
        return out
    try:
        from scipy import stats

        out["p"], out["test"] = float(stats.ttest_rel(xs, [0.0] * n).pvalue), "paired t-test"
    except ImportError:
        out["p"], out["test"] = _sign_flip_p(xs), "sign-flip permutation test"
    if n < MIN_SEEDS:
        out["verdict"] = "too few seeds"
    elif out["p"] < ALPHA:
        out["verdict"] = "beat" if out["mean"] > 0 else "lost"
    else:
        out["verdict"] = "no clear difference"
    return out


def _matched_comparison(name: str, results: list[RunResult]) -> dict | None:
    """The paired test of recipe `name` against `baseline@name` over the seeds both ran."""
    mine = {r.seed: r.accuracy for r in results if r.recipe == name}
    theirs = {r.seed: r.accuracy for r in results if r.recipe == MATCHED + name}
    seeds = sorted(set(mine) & set(theirs))
    if not seeds:
        return None
    return {"against": MATCHED + name, "seeds": seeds, **paired_test([mine[s] - theirs[s] for s in seeds])}


def summarize(results: Iterable[RunResult], reference: str = "baseline", *,
              failures: Iterable[RunFailure] = (), order: Sequence[str] | None = None,
              target_acc: float | None = None) -> list[dict]:
    """Per recipe (in `order`, else first-seen): counts of runs and failures, mean and std over seeds,
    and costs as fractions of the `reference` recipe's means (samples and work: of full data when it is
    absent). A recipe whose runs all failed has a row with `n_runs` 0 and no measurements."""
    results, failures = list(results), list(failures)
    names = list(order or [])
    for r in [*results, *failures]:
        if r.recipe not in names:
            names.append(r.recipe)
    if target_acc is None:
        target_acc = next((r.target_acc for r in results if r.target_acc is not None), None)
    rows = []
    for name in names:
        rs = [r for r in results if r.recipe == name]
        fs = [f for f in failures if f.recipe == name]
        if name.startswith(MATCHED) and not rs and not fs:
            continue  # a budget-matched baseline never needed: its technique saved nothing
        row: dict[str, Any] = {"recipe": name, "n_runs": len(rs), "n_failed": len(fs),
                               "seeds": [r.seed for r in rs], "failed_seeds": [f.seed for f in fs],
                               "target_acc": target_acc}
        rows.append(row)
        if not rs:
            continue
        for key in _MEANS:
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std(getattr(r, key) for r in rs)
        row["full_samples_mean"] = _mean_std(r.full_samples for r in rs)[0]
        row["peak_rss_mb_max"] = max((m for r in rs if (m := _num(r.peak_rss_mb)) is not None), default=None)
        row["peak_mem_mb_max"] = max((m for r in rs if (m := _num(r.peak_mem_mb)) is not None), default=None)
        row["peak_mem_kind"] = rs[0].peak_mem_kind
        row["peak_mem_scope"] = "process" if any(r.peak_mem_scope == "process" for r in rs) else "run"
        if target_acc is not None:
            hit = [r for r in rs if r.time_to_target_s is not None]
            row["reached"] = len(hit)
            row["time_to_target_mean"], row["time_to_target_std"] = _mean_std(r.time_to_target_s for r in hit)
            row["samples_to_target_mean"] = _mean_std(r.samples_to_target for r in hit)[0]
    ref = _reference(rows, reference)
    for row in rows:
        row["reference"] = reference if ref else None
        row["samples_vs"] = reference if ref else "full data"
        if not row["n_runs"]:
            continue
        full = row["full_samples_mean"]  # without a reference, counts are shares of full data
        base = ref or {"samples_mean": full, "backpropagated_mean": full, "work_mean": full}
        row["samples_frac"] = _ratio(row, base, "samples_mean")
        row["backpropagated_frac"] = _ratio(row, base, "backpropagated_mean")
        row["work_frac"] = _ratio(row, base, "work_mean")
        row["flops_frac"] = _ratio(row, ref, "flops_mean")
        row["matched"] = _matched_comparison(row["recipe"], results)
        row["steps_frac"] = _ratio(row, ref, "steps_mean")
        row["wall_frac"] = _ratio(row, ref, "wall_s_mean")
        row["cpu_frac"] = _ratio(row, ref, "cpu_s_mean")
        acc, ref_acc = _num(row["accuracy_mean"]), _num(ref["accuracy_mean"]) if ref else None
        row["accuracy_delta"] = None if acc is None or ref_acc is None else acc - ref_acc
        if target_acc is not None:
            row["time_to_target_frac"] = _ratio(row, ref, "time_to_target_mean")
            row["samples_to_target_frac"] = _ratio(row, ref, "samples_to_target_mean")
    return rows


def _fmt(template: str, *values) -> str:
    """`template.format(*values)`, or "—" when a value is missing or not finite."""
    nums = [_num(v) for v in values]
    return "—" if None in nums else template.format(*nums)


def _pct(frac: float | None) -> str:
    return _fmt("{:.0%}", frac)


def _count(mean, frac) -> str:
    if _num(mean) is None:
        return "—"
    return f"{round(mean):,}" + ("" if _num(frac) is None else f" ({frac:.1%})")


def table_rows(summary: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The summary table's header and rows as text cells (the terminal table and the report's)."""
    if not summary:
        return ["recipe"], []
    ref = summary[0].get("reference")
    vs = ref or "full data"
    tvs = ref or "—"
    target = summary[0].get("target_acc")
    ran = [r for r in summary if r["n_runs"]]
    # Backpropagated samples get a column only where a technique reported fewer than were forwarded;
    # work, where some recipe's differs from its samples (smaller inputs, extra or forward-only passes).
    show_bwd = any(_fmt("{:.0f}", r["backpropagated_mean"]) != _fmt("{:.0f}", r["samples_mean"]) for r in ran)
    show_work = any(_fmt("{:.0f}", r.get("work_mean")) != _fmt("{:.0f}", r["samples_mean"]) for r in ran)
    kind = next((r["peak_mem_kind"] for r in ran), "rss")
    scope = "per run" if all(r.get("peak_mem_scope", "run") == "run" for r in ran) else "process so far"
    header = ["recipe", "runs", "accuracy % (mean ± std)", "best %", f"Δ acc (pts vs {tvs})",
              f"samples fwd (% of {vs})"]
    if show_bwd:
        header.append(f"samples bwd (% of {vs})")
    if show_work:
        header.append(f"work, fwd+bwd sample passes (% of {vs})")
    show_flops = any(_num(r.get("flops_mean")) is not None for r in ran)
    if show_flops:
        header.append(f"training FLOPs (% of {tvs})")
    show_matched = any(r.get("matched") for r in ran)
    header += ["steps", f"wall-clock s (% of {tvs})", f"CPU s (% of {tvs})", "samples/s",
               f"peak MB ({'CUDA' if kind == 'cuda' else 'RSS'}, {scope})"]
    if target is not None:
        header += [f"time to {100 * target:g}% s (% of {tvs})", f"samples to {100 * target:g}%"]
    if show_matched:
        header.append("vs budget-matched baseline (Δ pts, paired over seeds)")
    rows = []
    for r in summary:
        n = r["n_runs"] + r["n_failed"]
        runs = str(n) if not r["n_failed"] else f"{r['n_runs']}/{n} ({r['n_failed']} failed)"
        if not r["n_runs"]:
            rows.append([r["recipe"], runs] + ["—"] * (len(header) - 2))
            continue
        delta = r.get("accuracy_delta")
        cells = [
            r["recipe"], runs,
            _fmt("{:.2f} ± {:.2f}", _scale(r["accuracy_mean"]), _scale(r["accuracy_std"])),
            _fmt("{:.2f}", _scale(r["best_accuracy_mean"])),
            "—" if r["recipe"] == ref else _fmt("{:+.2f}", _scale(delta)),
            _count(r["samples_mean"], r.get("samples_frac")),
        ]
        if show_bwd:
            cells.append(_count(r["backpropagated_mean"], r.get("backpropagated_frac")))
        if show_work:
            cells.append(_count(r.get("work_mean"), r.get("work_frac")))
        if show_flops:
            cells.append(_flops(r.get("flops_mean"), r.get("flops_frac")))
        cells += [
            _fmt("{:,.0f}", r["steps_mean"]),
            _fmt("{:.1f} ± {:.1f}", r["wall_s_mean"], r["wall_s_std"]) + f" ({_pct(r.get('wall_frac'))})",
            _fmt("{:.1f} ± {:.1f}", r["cpu_s_mean"], r["cpu_s_std"]) + f" ({_pct(r.get('cpu_frac'))})",
            _fmt("{:,.0f}", r["throughput_mean"]),
            _fmt("{:,.0f}", r.get("peak_mem_mb_max")),
        ]
        if target is not None:
            reached = f"{r['reached']}/{r['n_runs']} reached"
            if r.get("time_to_target_mean") is None:
                cells += [f"never ({reached})", "—"]
            else:
                cells += [_fmt("{:.1f} ± {:.1f}", r["time_to_target_mean"], r["time_to_target_std"])
                          + f" ({_pct(r.get('time_to_target_frac'))}; {reached})",
                          _fmt("{:,.0f}", r["samples_to_target_mean"])]
        if show_matched:
            cells.append(matched_text(r.get("matched")))
        rows.append(cells)
    return header, rows


def _flops(value, frac) -> str:
    """FLOPs with an SI prefix (1.04 GFLOP), and the share of the reference."""
    v = _num(value)
    if v is None:
        return "—"
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3), ("", 1)):
        if abs(v) >= scale or scale == 1:
            text = f"{v / scale:.3g} {prefix}FLOP"
            break
    return text + ("" if _num(frac) is None else f" ({frac:.1%})")


def matched_text(m: Mapping | None) -> str:
    """One cell: the technique's mean accuracy difference to its budget-matched baseline, the test's p and n,
    and the verdict ("n/a" with one seed)."""
    if not m:
        return "—"
    delta = _fmt("{:+.2f} pts", _scale(m.get("mean")))
    if m.get("p") is None:
        why = "1 seed" if m.get("n", 0) < 2 else "no spread over seeds"
        return f"{delta} (n={m.get('n', 0)}): n/a ({why})"
    verdict = {"beat": f"beat {m['against']}", "lost": f"lost to {m['against']}",
               "too few seeds": f"too few seeds for a verdict (>= {MIN_SEEDS})"}.get(m["verdict"], m["verdict"])
    return f"{delta}, p={m['p']:.2g} (n={m['n']}): {verdict}"


def _scale(frac) -> float | None:
    value = _num(frac)
    return None if value is None else 100 * value


def format_table(summary: list[dict]) -> str:
    """The summary as a markdown table: accuracy, what was forwarded, steps, time, speed, memory."""
    header, rows = table_rows(summary)
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [fmt(row) for row in rows]
    return "\n".join(out)


def html_table(data: Mapping) -> str:
    """The summary table of a campaign document (`results.json`'s content) as HTML: the same cells as
    the terminal's table."""
    header, rows = table_rows(list(data.get("summary", [])))
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr data-recipe='" + html.escape(row[0], quote=True) + "'>"
                   + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return ("<table class='effilab-bench-table' style='border-collapse:collapse;font-size:0.9em'>"
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
            "<style>.effilab-bench-table th,.effilab-bench-table td{border:1px solid #ddd;padding:4px 8px;"
            "text-align:right}.effilab-bench-table td:first-child,.effilab-bench-table th:first-child"
            "{text-align:left}</style>")
