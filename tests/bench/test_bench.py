"""Tests for effilab.bench and `python -m effilab bench`: the command end to end, the recipe registry,
random-prune's fraction, usage errors and determinism."""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from effilab import bench
from effilab.bench import recipes as R
from effilab.core.infobatch import random_plan

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    # Never read or write the user's data cache from tests (subprocesses inherit the variable).
    monkeypatch.setenv("EFFILAB_CACHE", str(tmp_path_factory.getbasetemp() / "effilab-cache"))


def _cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "effilab", *args], capture_output=True, text=True, env=env,
                          cwd=cwd or ROOT, timeout=300)


def _table_rows(stdout: str) -> dict[str, list[str]]:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("| ")]
    header, *rows = ([c.strip() for c in ln.strip("|").split("|")] for ln in lines)
    assert header[0] == "recipe"
    return {row[0]: row for row in rows}


# ------------------------------------------------------------------------------------------ command line


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-quick")
    proc = _cli("bench", "--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads((out / "results.json").read_text())


def test_cli_quick_prints_table_matching_results_json(quick_run):
    proc, data = quick_run
    rows = _table_rows(proc.stdout)
    assert list(rows) == list(R.DEFAULT_RECIPES) == data["config"]["recipes"]
    assert [s["recipe"] for s in data["summary"]] == list(rows)
    runs = data["runs"]
    assert [r["recipe"] for r in runs] == ["baseline", "infobatch", "random-prune"]  # one seed in --quick
    # One progress line per run, in run order.
    progress = [ln for ln in proc.stdout.splitlines() if ln.startswith("[")]
    assert [ln.split("]")[0] for ln in progress] == ["[1/3", "[2/3", "[3/3"]
    for s in data["summary"]:
        row = rows[s["recipe"]]
        assert row[1] == f"{100 * s['accuracy_mean']:.2f} ± {100 * s['accuracy_std']:.2f}"
        assert row[2] == f"{round(s['samples_mean']):,} ({s['samples_frac']:.1%})"
        assert row[3] == f"{s['wall_s_mean']:.1f} ± {s['wall_s_std']:.1f} ({s['wall_frac']:.0%})"
        assert row[4] == f"{s['cpu_s_mean']:.1f} ± {s['cpu_s_std']:.1f} ({s['cpu_frac']:.0%})"
        assert row[5] == f"{round(s['steps_mean']):,}"
        mine = [r for r in runs if r["recipe"] == s["recipe"]]
        assert s["accuracy_mean"] == pytest.approx(np.mean([r["accuracy"] for r in mine]))
        assert s["samples_mean"] == pytest.approx(np.mean([r["samples"] for r in mine]))
    assert data["table"] in proc.stdout


def test_cli_quick_counts_are_consistent(quick_run):
    _, data = quick_run
    runs = {r["recipe"]: r for r in data["runs"]}
    base, ib, rp = runs["baseline"], runs["infobatch"], runs["random-prune"]
    cfg = data["config"]
    n_train, bs, epochs = round(0.8 * cfg["task_kwargs"]["n_samples"]), cfg["bs"], cfg["epochs"]
    full = (n_train // bs) * bs * epochs  # drop_last
    assert base["samples"] == base["full_samples"] == full
    assert base["steps"] == full // bs
    # InfoBatch: the counter agrees with InfoBatch's own telemetry, and it pruned something.
    ib_tel = ib["telemetry"]["records"]["infobatch"]["samples"][-1]
    assert ib["samples"] == ib_tel["forwarded_total"] < full
    assert ib["steps"] == ib["samples"] // bs
    # Random pruning matched InfoBatch's count to within half a batch per pruning epoch.
    n_prune = math.floor(0.875 * epochs)
    assert rp["params"]["matched_to"] == "infobatch" and rp["params"]["target_samples"] == ib["samples"]
    assert abs(rp["samples"] - ib["samples"]) <= n_prune * bs / 2
    assert rp["samples"] == rp["telemetry"]["records"]["random_prune"]["samples"][-1]["forwarded_total"]
    for r in data["runs"]:
        assert 0.0 < r["accuracy"] <= r["best_accuracy"] <= 1.0
        assert len(r["history"]) == epochs and r["wall_s"] > 0 and r["cpu_s"] > 0 and r["peak_rss_mb"] > 0


RECIPE_NAMES = "valid recipes: baseline, infobatch, random-prune"
TASK_NAMES = "valid tasks: mnist1d, digits, fashion-mnist, mnist, cifar10"


@pytest.mark.parametrize("args, message", [
    (["--recipe", "nosuch"], f"unknown recipe 'nosuch'; {RECIPE_NAMES}"),
    (["--recipe", "baseline", "--recipe", "infobatch(ratio=2)"],
     f"unknown recipe 'infobatch(ratio=2)'; {RECIPE_NAMES}"),
    (["--task", "nosuch"], f"unknown task 'nosuch'; {TASK_NAMES}"),
])
def test_cli_unknown_names_exit_2_listing_valid_ones(args, message, tmp_path):
    proc = _cli("bench", "--quick", "--out", str(tmp_path / "out"), *args)
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: effilab bench")
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_without_command_exits_2():
    proc = _cli()
    assert proc.returncode == 2 and "bench" in proc.stderr


def test_cli_dataset_unavailable_exits_2(tmp_path):
    # Same loader the command uses; nothing here exists, so the offline lookup must fail cleanly.
    proc = _cli("bench", "--task", "cifar10", "--quick", "--out", str(tmp_path / "out"),
                cwd=tmp_path)
    if proc.returncode == 0:
        pytest.skip("CIFAR-10 is available on this machine")
    assert proc.returncode == 2
    assert "cifar10 not found" in proc.stderr and "download=True" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_help_lists_recipes():
    proc = _cli("bench", "--help")
    assert proc.returncode == 0
    for name in R.RECIPES:
        assert name in proc.stdout


# ------------------------------------------------------------------------------------------ registry


def test_registry_has_the_default_recipes():
    assert list(R.DEFAULT_RECIPES) == ["baseline", "infobatch", "random-prune"]
    assert set(R.DEFAULT_RECIPES) <= set(R.RECIPES)
    assert R.get_recipe("random-prune").after == ("infobatch",)
    with pytest.raises(KeyError, match="valid recipes: baseline, infobatch, random-prune"):
        R.get_recipe("nosuch")


def test_register_rejects_duplicates_and_run_order_puts_references_first():
    with pytest.raises(ValueError, match="already registered"):
        R.register(R.baseline())
    rp, ib, base = (R.get_recipe(n) for n in ("random-prune", "infobatch", "baseline"))
    assert [r.name for r in R.run_order([rp, base, ib])] == ["baseline", "infobatch", "random-prune"]
    assert [r.name for r in R.run_order([rp, base])] == ["random-prune", "baseline"]  # reference absent
    a, b = R.Recipe("a", after=("b",)), R.Recipe("b", after=("a",))
    with pytest.raises(ValueError, match="cycle"):
        R.run_order([a, b])


def test_recipe_factories_and_notes():
    ctx = R.RunContext(task=None, seed=3, epochs=8, bs=100, lr=1e-2, n_train=1000)
    assert R.get_recipe("baseline").make_callbacks(ctx) == []
    (cb,) = R.get_recipe("infobatch").make_callbacks(ctx)
    assert (type(cb).__name__, cb.ratio, cb.delta, cb.seed) == ("InfoBatch", 0.5, 0.875, 3)
    assert ctx.notes == {"ratio": 0.5, "delta": 0.875}
    # Without an InfoBatch run to match: the --fraction option (default 0.3).
    ctx = R.RunContext(task=None, seed=3, epochs=8, bs=100, lr=1e-2, n_train=1000, options={"fraction": 0.2})
    (cb,) = R.get_recipe("random-prune").make_callbacks(ctx)
    assert (type(cb).__name__, cb.fraction, cb.seed) == ("RandomPrune", 0.2, 3)
    ctx = R.RunContext(task=None, seed=3, epochs=8, bs=100, lr=1e-2, n_train=1000)
    assert R.get_recipe("random-prune").make_callbacks(ctx)[0].fraction == R.DEFAULT_FRACTION == 0.3

    # With one: the fraction comes from its forwarded total, at its delta.
    class Ref:
        samples, params = 6000, {"delta": 0.75}

    ctx = R.RunContext(task=None, seed=3, epochs=8, bs=100, lr=1e-2, n_train=1000, peers={"infobatch": Ref})
    (cb,) = R.get_recipe("random-prune").make_callbacks(ctx)
    assert cb.delta == 0.75 and cb.fraction == pytest.approx(R.random_prune_fraction(6000, 1000, 8, 0.75, 100))
    assert ctx.notes["matched_to"] == "infobatch" and ctx.notes["target_samples"] == 6000


# ------------------------------------------------------------------------------------------ fraction


def _random_prune_forwarded(n, fraction, epochs, delta, bs=None, seed=0):
    """What RandomPrune forwards: its own plans, batched like the training loader (drop_last)."""
    stop = math.floor(delta * epochs)
    total = 0
    for e in range(epochs):
        k = len(random_plan(n, fraction, e, seed, annealing=e >= stop))
        total += k if bs is None else (k // bs) * bs
    return total


def test_random_prune_fraction_by_hand():
    # N=1000, bs=100, E=8, delta=0.875: epochs 0..6 prune, epoch 7 is full (1000 forwarded).
    # Target 6000 -> the 7 pruning epochs share 5000 -> 714.3 each -> 7 whole batches -> keep 700.
    assert R.random_prune_fraction(6000, 1000, 8, 0.875, bs=100) == pytest.approx(0.3)
    assert _random_prune_forwarded(1000, 0.3, 8, 0.875, bs=100) == 7 * 700 + 1000
    # Without batching: 5000 / 7 = 714.29 -> keep 714.
    assert R.random_prune_fraction(6000, 1000, 8, 0.875) == pytest.approx(286 / 1000)
    # The drop_last remainder: 1050 samples, bs 100 -> a full epoch forwards 1000. Epochs 0, 1 prune
    # (delta 0.5 of 4). Target 4000 leaves 1000 per pruning epoch, a full epoch's worth: no pruning.
    assert R.random_prune_fraction(4000, 1050, 4, 0.5, bs=100) == 0.0
    # Target 3400 leaves 700 per pruning epoch: keep 700 of the 1050 (not 700 of 1000).
    assert R.random_prune_fraction(3400, 1050, 4, 0.5, bs=100) == pytest.approx((1050 - 700) / 1050)
    assert _random_prune_forwarded(1050, (1050 - 700) / 1050, 4, 0.5, bs=100) == 3400
    # delta * epochs < 1: RandomPrune never prunes.
    assert R.random_prune_fraction(500, 1000, 1, 0.875, bs=100) == 0.0


@pytest.mark.parametrize("n, epochs, delta, bs", [(1600, 4, 0.875, 64), (8000, 10, 0.875, 128),
                                                  (999, 7, 0.75, 50), (5000, 16, 0.5, None)])
def test_random_prune_fraction_matches_infobatch_like_totals(n, epochs, delta, bs):
    rng = np.random.default_rng(n + epochs)
    stop = math.floor(delta * epochs)
    full = n if bs is None else (n // bs) * bs
    for _ in range(5):
        # An InfoBatch-like run: epoch 0 full, each pruning epoch keeps 55-95%, annealing epochs full.
        kept = [n] + [int(n * rng.uniform(0.55, 0.95)) for _ in range(stop - 1)] + [n] * (epochs - stop)
        target = sum(k if bs is None else (k // bs) * bs for k in kept)
        frac = R.random_prune_fraction(target, n, epochs, delta, bs)
        assert 0.0 <= frac < 1.0
        got = _random_prune_forwarded(n, frac, epochs, delta, bs)
        tolerance = stop * (bs / 2 if bs else 0.5)
        assert abs(got - target) <= tolerance, (frac, got, target)
        assert got == full * (epochs - stop) + stop * ((n - round(frac * n)) // (bs or 1)) * (bs or 1)


# ------------------------------------------------------------------------------------------ determinism


def _quick_python_run(seed, recipes=("infobatch", "random-prune")):
    return bench.run("mnist1d", recipes, seeds=[seed], epochs=3, bs=64, lr=1e-2,
                     task_kwargs={"n_samples": 1000}, device="cpu", threads=1, progress=None)


def test_same_seed_same_counts_and_accuracy_and_caller_rng_untouched():
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    first = _quick_python_run(seed=5)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    second = _quick_python_run(seed=5)
    key = lambda rs: [(r.recipe, r.samples, r.steps, r.accuracy, r.best_accuracy, r.history) for r in rs]
    assert key(first) == key(second)
    other = _quick_python_run(seed=6)
    assert [r.samples for r in other] != [r.samples for r in first] or \
        [r.accuracy for r in other] != [r.accuracy for r in first]


def test_summarize_and_table_without_baseline():
    mk = lambda recipe, seed, acc, samples, wall: bench.RunResult(
        recipe, seed, "t", 2, 10, 0.1, acc, acc, wall, wall, samples, 1000, samples // 10, None)
    results = [mk("a", 0, 0.5, 800, 2.0), mk("a", 1, 0.7, 600, 4.0), mk("b", 0, 0.9, 1000, 1.0)]
    rows = bench.summarize(results)
    assert [r["recipe"] for r in rows] == ["a", "b"]
    a = rows[0]
    assert a["accuracy_mean"] == pytest.approx(0.6) and a["accuracy_std"] == pytest.approx(0.1414, abs=1e-4)
    assert a["samples_frac"] == pytest.approx(0.7) and a["wall_frac"] is None and a["samples_vs"] == "full data"
    table = bench.format_table(rows)
    assert "60.00 ± 14.14" in table and "700 (70.0%)" in table and "3.0 ± 1.4 (—)" in table
    rows = bench.summarize(results, reference="b")
    assert rows[0]["wall_frac"] == pytest.approx(3.0) and rows[0]["samples_frac"] == pytest.approx(0.7)
