"""`effilab bench` and `effilab.bench.run`: the command end to end (table, results.json and report.html
agree), usage and data errors, output-folder protection, failed runs, Ctrl-C and --resume,
time-to-accuracy, image folders, and determinism."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from html import unescape
from pathlib import Path

import numpy as np
import pytest
import torch

from effilab import bench
from effilab.__main__ import main
from effilab.bench import recipes as R
from effilab.bench.table import html_table, table_rows
from effilab.registry import all_techniques

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = "tests.bench.plugin"  # components that crash or interrupt a run
TINY = ["--task", "mnist1d", "--n-samples", "600", "--epochs", "2", "--bs", "64", "--seeds", "0"]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    # Never read or write the user's data cache from tests (subprocesses inherit the variable).
    monkeypatch.setenv("EFFILAB_CACHE", str(tmp_path_factory.getbasetemp() / "effilab-cache"))
    monkeypatch.delenv("EFFILAB_TEST_INTERRUPT", raising=False)


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "effilab", *args], capture_output=True, text=True,
                          env=_env(), cwd=cwd or ROOT, timeout=300)


def _main(capsys, *args) -> tuple[int, str, str]:
    """The command line in this process (fast: fastai is imported once): (exit status, stdout, stderr)."""
    try:
        rc = main(["bench", *args])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def _table(text: str) -> tuple[list[str], dict[str, list[str]]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    header, *rows = ([c.strip() for c in ln.strip()[1:-1].split(" | ")] for ln in lines)
    return header, {row[0]: row for row in rows}


def _html_table(page: str) -> tuple[list[str], dict[str, list[str]]]:
    table = re.search(r"<table class='effilab-bench-table'.*?</table>", page, re.S).group(0)
    header = [unescape(h) for h in re.findall(r"<th>(.*?)</th>", table)]
    rows = [[unescape(c) for c in re.findall(r"<td>(.*?)</td>", tr)]
            for tr in re.findall(r"<tr data.*?</tr>", table)]
    return header, {row[0]: row for row in rows}


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-quick") / "out"
    proc = _cli("bench", "--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, out, json.loads((out / "results.json").read_text())


def test_cli_quick_table_json_and_report_agree(quick_run):
    proc, out, data = quick_run
    assert data["status"] == "complete" and data["failures"] == []
    header, rows = _table(proc.stdout)
    # Each technique is followed by its budget-matched baseline.
    planned = ["baseline", "infobatch", "baseline@infobatch", "random-prune", "baseline@random-prune"]
    assert list(rows) == planned == [r["name"] for r in data["config"]["recipes"]]
    # The printed table is the one in results.json, and its cells are the summary's numbers.
    assert data["table"] in proc.stdout
    assert (header, list(rows.values())) == table_rows(data["summary"])
    for s in data["summary"]:
        row = dict(zip(header, rows[s["recipe"]]))
        assert row["accuracy % (mean ± std)"] == \
            f"{100 * s['accuracy_mean']:.2f} ± {100 * s['accuracy_std']:.2f}"
        assert row["samples fwd (% of baseline)"] == f"{round(s['samples_mean']):,} ({s['samples_frac']:.1%})"
        assert row["steps"] == f"{round(s['steps_mean']):,}"
        mine = [r for r in data["runs"] if r["recipe"] == s["recipe"]]
        assert s["accuracy_mean"] == pytest.approx(np.mean([r["accuracy"] for r in mine]))
        assert s["samples_mean"] == pytest.approx(np.mean([r["samples"] for r in mine]))
        assert s["throughput_mean"] == pytest.approx(np.mean([r["samples"] / r["wall_s"] for r in mine]))
    # One progress line per run, in run order; the report's path is printed.
    progress = [ln for ln in proc.stdout.splitlines() if ln.startswith("[")]
    assert [ln.split("]")[0] for ln in progress] == [f"[{i}/5" for i in range(1, 6)]
    assert f"report:  {out / 'report.html'}" in proc.stdout
    assert f"results: {out / 'results.json'}" in proc.stdout
    # The report: self-contained (plotly.js inside, nothing fetched), the same table, every recipe drawn.
    page = (out / "report.html").read_text()
    assert not re.search(r"<script[^>]*\bsrc=", page) and len(page) > 1_000_000
    assert html_table(data) in page
    assert _html_table(page) == (header, rows)
    figs = bench.figures(data)
    assert set(figs) == {"accuracy", "savings", "pareto"}
    runs = [t for t in figs["accuracy"].data if t.name.endswith(": runs")]
    assert sorted(round(y, 6) for t in runs for y in t.y) == \
        sorted(round(100 * r["accuracy"], 6) for r in data["runs"] for _ in (0, 1))  # two panels
    saved = {t.name: dict(zip(t.x, t.y)) for t in figs["savings"].data}
    assert set(saved) == set(planned[1:])  # the baseline is what they are measured against
    ib = next(s for s in data["summary"] if s["recipe"] == "infobatch")
    assert saved["infobatch"]["samples forwarded"] == pytest.approx(100 * (1 - ib["samples_frac"]))
    for name in planned:
        assert f'"name":"{name}"' in page


def test_cli_quick_counts_are_consistent(quick_run):
    _, _, data = quick_run
    runs = {r["recipe"]: r for r in data["runs"]}
    base, ib, rp = runs["baseline"], runs["infobatch"], runs["random-prune"]
    cfg = data["config"]
    n_train, bs, epochs = round(0.8 * cfg["task_kwargs"]["n_samples"]), cfg["bs"], cfg["epochs"]
    full = (n_train // bs) * bs * epochs  # drop_last
    assert base["samples"] == base["full_samples"] == base["backpropagated"] == full
    assert base["steps"] == full // bs
    # InfoBatch: the counter agrees with InfoBatch's own telemetry, and it pruned something.
    ib_tel = ib["telemetry"]["records"]["infobatch"]["samples"][-1]
    assert ib["samples"] == ib_tel["forwarded_total"] == ib["backpropagated"] < full
    assert ib["steps"] == ib["samples"] // bs
    # Random pruning matched InfoBatch's count to within half a batch per pruning epoch.
    assert rp["params"]["random_prune"]["matched_to"] == "infobatch"
    assert rp["params"]["random_prune"]["target_samples"] == ib["samples"]
    assert abs(rp["samples"] - ib["samples"]) <= int(0.875 * epochs) * bs / 2
    assert rp["samples"] == rp["telemetry"]["records"]["random_prune"]["samples"][-1]["forwarded_total"]
    for r in data["runs"]:
        assert 0.0 < r["accuracy"] <= r["best_accuracy"] <= 1.0
        assert len(r["history"]) == r["epochs_run"] == epochs
        assert r["wall_s"] > 0 and r["cpu_s"] > 0 and r["peak_mem_mb"] == r["peak_rss_mb"] > 0
        assert r["throughput"] == pytest.approx(r["samples"] / r["wall_s"])
        assert r["target_acc"] is None and r["time_to_target_s"] is None


def test_cli_quick_matched_baselines_spend_what_their_technique_spent_and_flops_are_counted(quick_run):
    from effilab.bench.fit import make_model
    from effilab.bench.tasks import load_task
    from effilab.core.budget import step_flops

    proc, out, data = quick_run
    runs = {r["recipe"]: r for r in data["runs"]}
    base, cfg = runs["baseline"], data["config"]
    for name in ("infobatch", "random-prune"):
        tech, matched = runs[name], runs[f"baseline@{name}"]
        budget = matched["params"]["budget"]
        assert (budget["unit"], budget["kind"], budget["matched_to"]) == ("samples", "matched", name)
        # Exactly the technique's samples (whole batches), the one-cycle schedule ended on them (p = 1).
        assert budget["amount"] == tech["samples"] == matched["samples"] < base["samples"]
        assert budget["progress"] == 1.0 and budget["stopped_by_budget"]
        assert matched["telemetry"]["records"]["budget"]["fit"][-1]["progress"] == 1.0
        assert matched["recipe_text"] == "baseline" and matched["full_samples"] == base["full_samples"]
        assert "budget" not in tech["params"]
    # Training FLOPs: every batch has the same shape here, so steps times one step's count.
    task = load_task(cfg["task"], **cfg["task_kwargs"])
    one_step = step_flops(make_model(task, cfg["model"]), [torch.zeros(cfg["bs"], *task.input_shape)])
    assert one_step > 0 and base["flops"] == base["steps"] * one_step
    assert runs["infobatch"]["flops"] == runs["infobatch"]["steps"] * one_step < base["flops"]
    # In the table and the report: FLOPs beside samples, the verdict against the matched baseline (1 seed).
    header, rows = _table(proc.stdout)
    col = header.index("training FLOPs (% of baseline)")
    assert rows["infobatch"][col].endswith(f"({runs['infobatch']['flops'] / base['flops']:.1%})")
    verdict = rows["infobatch"][header.index("vs budget-matched baseline (Δ pts, paired over seeds)")]
    delta = 100 * (runs["infobatch"]["accuracy"] - runs["baseline@infobatch"]["accuracy"])
    assert verdict == f"{delta:+.2f} pts (n=1): n/a (1 seed)"
    page = (out / "report.html").read_text()
    assert "Against the budget-matched baseline" in page and f"infobatch: {verdict}" in page
    pareto = bench.figures(data)["pareto"]
    assert pareto.layout.xaxis.title.text == "training FLOPs (forward+backward)"
    dots = {t.name: list(t.x) for t in pareto.data if t.name.endswith(": runs")}
    assert dots["baseline@infobatch: runs"] == [runs["baseline@infobatch"]["flops"]]


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("args, message", [
    (["--recipe", "nosuch"], "unknown recipe 'nosuch'; valid recipes: baseline, infobatch, random-prune, fast, "
                             "fast-reinvest; or components joined by '+': activation_checkpointing, "),
    (["--recipe", "infobatch(ratio=0.3)+dashbord"], "unknown component 'dashbord'"),
    (["--recipe", "infobatch(ratoi=0.3)"],
     "does not accept 'ratoi'; it accepts: ratio, delta, momentum, seed"),
    (["--recipe", "infobatch(ratio=2)"], "ratio must be in [0, 1)"),
    (["--recipe", "infobatch(ratio=0.3"], "unclosed parenthesis"),
    (["--recipe", "baseline", "--recipe", "baseline"], "each recipe may appear once; repeated: baseline"),
    (["--task", "nosuch"],
     "unknown task 'nosuch'; valid tasks: mnist1d, digits, fashion-mnist, mnist, cifar10, pysource, folder:PATH"),
    (["--task", "digits", "--n-samples", "100"], "--n-samples does not apply to task 'digits'"),
    (["--target-acc", "85"], "--target-acc is a validation accuracy in (0, 1]"),
    (["--epochs", "0"], "must be positive integers"),
    (["--seeds", "1", "1"], "--seeds must be distinct"),
    (["--model", "cnn"], "model 'cnn' needs image inputs"),
    (["--import", "no_such_module_xyz"], "--import no_such_module_xyz: ModuleNotFoundError"),
])
def test_cli_bad_input_exits_2_with_what_exists(args, message, tmp_path, capsys):
    rc, out, err = _main(capsys, "--quick", "--out", str(tmp_path / "out"), *args)
    assert rc == 2, (out, err)
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_usage_error_in_a_fresh_process(tmp_path):
    proc = _cli("bench", "--quick", "--out", str(tmp_path / "out"), "--recipe", "infobatch(ratoi=0.3)")
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: effilab bench") and "does not accept 'ratoi'" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _cli()
    assert proc.returncode == 2 and "bench" in proc.stderr


def test_cli_dataset_unavailable_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = _main(capsys, "--task", "cifar10", "--quick", "--out", str(tmp_path / "out"))
    if rc == 0:
        pytest.skip("CIFAR-10 is available on this machine")
    assert rc == 2
    assert "cifar10 not found" in err and "download=True" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    rc, out, err = _main(capsys, "--task", f"folder:{tmp_path / 'nope'}", "--quick",
                         "--out", str(tmp_path / "o2"))
    assert rc == 2 and "image folder" in err and "one subfolder of images per class" in err


def test_cli_help_and_list(capsys):
    rc, out, _ = _main(capsys, "--help")
    assert rc == 0
    for word in ("--recipe", "--recipes-file", "--target-acc", "--resume", "--overwrite", "folder:PATH",
                 "infobatch(ratio=0.3)+dashboard", "[[recipe]]"):
        assert word in out
    rc, out, _ = _main(capsys, "--list")
    assert rc == 0
    for name in [*R.RECIPES, *all_techniques()]:
        assert name in out
    assert "infobatch(ratio=0.5, delta=0.875, momentum=None)" in out


# ------------------------------------------------------------------------------------------ output folder


def test_cli_refuses_an_output_folder_with_results(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"keep": "me"}')
    rc, _, err = _main(capsys, *TINY, "--recipe", "baseline", "--out", str(out))
    assert rc == 2
    assert f"{out} already holds results (results.json)" in err and "--resume" in err and "--overwrite" in err
    assert (out / "results.json").read_text() == '{"keep": "me"}'
    # --overwrite replaces it.
    rc, stdout, err = _main(capsys, *TINY, "--recipe", "baseline", "--out", str(out), "--overwrite")
    assert rc == 0, err
    assert [r["recipe"] for r in _results(out)["runs"]] == ["baseline"]
    with pytest.raises(bench.OutputExists):
        bench.run("mnist1d", ["baseline"], epochs=1, task_kwargs={"n_samples": 600}, out=out, progress=None)


def test_resume_refuses_another_config_and_a_missing_campaign(tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, err = _main(capsys, *TINY, "--recipe", "baseline", "--out", str(out))
    assert rc == 0, err
    before = (out / "results.json").read_text()
    rc, _, err = _main(capsys, "--resume", str(out), "--epochs", "3")
    assert rc == 2
    assert f"cannot resume {out}" in err and "epochs: 2 in the results, 3 now" in err
    assert (out / "results.json").read_text() == before
    rc, _, err = _main(capsys, "--resume", str(tmp_path / "nothing"))
    assert rc == 2 and "nothing to resume" in err
    with pytest.raises(bench.ConfigMismatch, match="lr: 0.01 in the results, 0.02 now"):
        bench.run("mnist1d", ["baseline"], seeds=[0], epochs=2, bs=64, lr=0.02,
                  task_kwargs={"n_samples": 600}, out=out, resume=True, progress=None)


# ------------------------------------------------------------------------------------------ trouble


def test_a_failing_run_is_reported_and_the_others_complete(tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, err = _main(capsys, "--import", PLUGIN, *TINY, "--seeds", "0", "1", "--recipe", "baseline",
                            "--recipe", "baseline+explode(at_epoch=1, seeds=[1])", "--out", str(out), "--no-matched")
    assert rc == 1, err
    data = _results(out)
    assert data["status"] == "failed"
    assert sorted((r["recipe"], r["seed"]) for r in data["runs"]) == [
        ("baseline", 0), ("baseline", 1), ("baseline+explode(at_epoch=1, seeds=[1])", 0)]
    (f,) = data["failures"]
    assert (f["recipe"], f["seed"], f["error_type"]) == \
        ("baseline+explode(at_epoch=1, seeds=[1])", 1, "RuntimeError")
    assert "boom" in f["error"] and "Traceback" in f["traceback"] and "plugin.py" in f["traceback"]
    header, rows = _table(stdout)
    assert rows["baseline+explode(at_epoch=1, seeds=[1])"][1] == "1/2 (1 failed)"
    assert "1 run(s) FAILED" in stdout and "seed=1: RuntimeError: Exception occured in `Explode`" in stdout
    assert "FAILED after" in stdout
    page = (out / "report.html").read_text()
    assert "Failed runs (1)" in page and "boom" in page


def test_interrupted_campaign_keeps_finished_runs_and_resume_completes_it(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    recipes = ["baseline", "infobatch", "random-prune+interrupt(at_epoch=0)"]
    args = ["--import", PLUGIN, *TINY, "--seeds", "0", "1", "--out", str(out), "--no-matched"]
    for r in recipes:
        args += ["--recipe", r]
    monkeypatch.setenv("EFFILAB_TEST_INTERRUPT", "1")  # Ctrl-C in the third run
    rc, stdout, err = _main(capsys, *args)
    assert rc == 130, err
    assert f"continue with: effilab bench --resume {out}" in err
    first = _results(out)
    assert first["status"] == "interrupted"
    assert [(r["recipe"], r["seed"]) for r in first["runs"]] == [("baseline", 0), ("infobatch", 0)]
    assert first["failures"] == []
    assert "interrupted" in (out / "report.html").read_text()

    monkeypatch.delenv("EFFILAB_TEST_INTERRUPT")
    rc, stdout, err = _main(capsys, "--import", PLUGIN, "--resume", str(out))  # the rest from results.json
    assert rc == 0, err
    assert f"resuming {out}: 2 of 6 runs done, 4 to go" in stdout
    assert [ln.split(":")[0] for ln in stdout.splitlines() if ln.startswith("[")] == [
        "[3/6] random-prune+interrupt(at_epoch=0) seed=0", "[4/6] baseline seed=1", "[5/6] infobatch seed=1",
        "[6/6] random-prune+interrupt(at_epoch=0) seed=1"]
    done = _results(out)
    assert done["status"] == "complete"
    assert done["runs"][:2] == first["runs"]  # not run again: the same records, timings included
    assert sorted((r["recipe"], r["seed"]) for r in done["runs"]) == \
        sorted((r, s) for r in recipes for s in (0, 1))
    # The resumed random pruning matched the InfoBatch run of the first invocation.
    rp0 = next(r for r in done["runs"] if r["recipe"] == recipes[2] and r["seed"] == 0)
    assert rp0["params"]["random_prune"]["target_samples"] == first["runs"][1]["samples"]
    # Same runs as an uninterrupted campaign: counts and (CPU) accuracies.
    whole = bench.run("mnist1d", recipes, seeds=[0, 1], epochs=2, bs=64, task_kwargs={"n_samples": 600},
                      progress=None, threads=1, matched=False)
    key = lambda runs: sorted((r["recipe"], r["seed"], r["samples"], r["accuracy"]) for r in runs)
    assert key(done["runs"]) == key(r.to_dict() for r in whole)


def test_ctrl_c_in_a_real_process_saves_the_finished_runs(tmp_path):
    out = tmp_path / "out"
    args = ["--n-samples", "2000", "--epochs", "30", "--bs", "64", "--seeds", "0", "1", "2", "--recipe",
            "baseline", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "effilab", "bench", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if _results(out)["runs"]:
                    break
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    data = _results(out)
    assert data["status"] == "interrupted" and 1 <= len(data["runs"]) < 3
    assert "--resume" in stderr and (out / "report.html").exists()
    assert _table(stdout)[1]["baseline"][1] == str(len(data["runs"]))


# ------------------------------------------------------------------------------------------ python API


def test_time_to_accuracy_stops_early_and_records_the_cost():
    c = bench.run("mnist1d", ["baseline", "infobatch"], seeds=[0], epochs=6, bs=64,
                  task_kwargs={"n_samples": 1000}, target_acc=0.3, progress=None, threads=1, matched=False)
    for r in c:
        reached = [h["epoch"] for h in r.history if h["accuracy"] >= 0.3]
        assert r.epochs_run < 6 and r.epochs_run == len(r.history) == reached[0] + 1  # stopped at the first
        assert r.epoch_to_target == reached[0]
        assert 0 < r.time_to_target_s <= r.wall_s
        assert r.samples_to_target == r.samples < r.full_samples
    header, rows = table_rows(c.summary)
    assert "time to 30% s (% of baseline)" in header and rows[0][header.index("samples to 30%")] == \
        f"{c[0].samples:,}"
    never = bench.run("mnist1d", ["baseline"], seeds=[0], epochs=2, bs=64, task_kwargs={"n_samples": 600},
                      target_acc=0.99, progress=None, threads=1)
    (r,) = never
    assert r.time_to_target_s is None and r.samples_to_target is None and r.epochs_run == 2
    assert "never (0/1 reached)" in never.table


def test_backpropagated_samples_come_from_telemetry():
    import tests.bench.plugin  # noqa: F401  (registers "halfbp")

    c = bench.run("mnist1d", ["baseline", "baseline+halfbp"], seeds=[0], epochs=2, bs=64,
                  task_kwargs={"n_samples": 600}, progress=None, threads=1)
    base, half = c
    assert base.backpropagated == base.samples
    assert half.samples == base.samples and half.backpropagated == half.samples // 2
    header, rows = table_rows(c.summary)
    col = header.index("samples bwd (% of baseline)")
    assert [row[col] for row in rows] == [f"{base.samples:,} (100.0%)", f"{half.samples // 2:,} (50.0%)"]
    # Without such a technique the column is left out.
    assert "samples bwd (% of baseline)" not in table_rows(bench.summarize(c[:1]))[0]


def test_selective_backprop_counts_its_selection_pass_as_forwarded():
    # Its selection pass forwards every sample before the Learner's forward sees the smaller batch.
    c = bench.run("mnist1d", ["baseline", "selective_backprop(beta=1)"], seeds=[0], epochs=2, bs=64,
                  task_kwargs={"n_samples": 600}, progress=None, threads=1, matched=False)
    base, sb = c
    assert sb.samples == base.samples == base.full_samples
    assert sb.backpropagated == round(64 / 2) * (sb.samples // 64) < sb.samples


def test_campaign_object_recipes_file_and_image_folder(tmp_path, capsys):
    from PIL import Image

    # An image folder: 2 classes, 12 tiny images each.
    rng = np.random.default_rng(0)
    for label, level in (("dark", 40), ("light", 200)):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(12):
            px = np.clip(level + rng.integers(-30, 30, (8, 8, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(tmp_path / "imgs" / label / f"{i}.png")
    toml = tmp_path / "campaign.toml"
    toml.write_text(f'task = "folder:{tmp_path / "imgs"}"\nepochs = 2\nbs = 4\nseeds = [3]\n'
                    '[[recipe]]\nname = "ib"\ncomponents = ["infobatch(ratio=0.3)"]\n'
                    '[[recipe]]\ncomponents = ["baseline"]\n')
    out = tmp_path / "out"
    rc, stdout, err = _main(capsys, "--recipes-file", str(toml), "--out", str(out), "--model", "mlp", "--no-matched")
    assert rc == 0, err
    data = _results(out)
    cfg = data["config"]
    assert (cfg["task"], cfg["epochs"], cfg["bs"], cfg["seeds"], cfg["model"]) == (
        f"folder:{tmp_path / 'imgs'}", 2, 4, [3], "mlp")
    assert [r["name"] for r in cfg["recipes"]] == ["ib", "baseline"]
    assert cfg["recipes"][0]["components"] == ["infobatch(ratio=0.3)"]
    assert data["runs"][0]["params"]["infobatch"]["ratio"] == 0.3
    c = bench.Campaign.load(out)
    assert [r.recipe for r in c] == ["ib", "baseline"] and c.status == "complete"
    assert c.table == data["table"] and "<table" in c._repr_html_()


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


def test_summarize_and_table_without_baseline_and_with_failures():
    mk = lambda recipe, seed, acc, samples, wall: bench.RunResult(
        recipe, seed, "t", 2, 10, 0.1, acc, acc, wall, wall, samples, 1000, samples // 10, None)
    results = [mk("a", 0, 0.5, 800, 2.0), mk("a", 1, 0.7, 600, 4.0), mk("b", 0, 0.9, 1000, 1.0)]
    failures = [bench.RunFailure("c", 0, "t", "ValueError", "bad\nthing", "Traceback ...", 0.5)]
    rows = bench.summarize(results, failures=failures)
    assert [r["recipe"] for r in rows] == ["a", "b", "c"]
    a = rows[0]
    assert a["accuracy_mean"] == pytest.approx(0.6) and a["accuracy_std"] == pytest.approx(0.1414, abs=1e-4)
    assert a["samples_frac"] == pytest.approx(0.7) and a["wall_frac"] is None
    assert a["samples_vs"] == "full data"
    assert rows[2]["n_runs"] == 0 and rows[2]["n_failed"] == 1
    assert failures[0].message == "ValueError: bad thing"
    table = bench.format_table(rows)
    assert "60.00 ± 14.14" in table and "700 (70.0%)" in table and "3.0 ± 1.4 (—)" in table
    assert "| c " in table and "0/1 (1 failed)" in table
    rows = bench.summarize(results, reference="b")
    assert rows[0]["wall_frac"] == pytest.approx(3.0) and rows[0]["samples_frac"] == pytest.approx(0.7)
    assert rows[0]["accuracy_delta"] == pytest.approx(-0.3)
    assert "-30.00" in bench.format_table(rows)


# ------------------------------------------------------------------------------------------ components on their task


def test_list_describes_components_by_their_method_card_and_hides_internal_arguments(capsys):
    from effilab.data.infobatch import InfoBatch

    rc, out, _ = _main(capsys, "--list")
    assert rc == 0
    lines = out.splitlines()
    i = lines.index("  seq_len_warmup(start=8, warmup_frac=0.3, multiple=8)")
    assert lines[i + 1].strip().startswith("Sequence-length warmup:")
    card = InfoBatch.__doc__.strip().split("\n\n")[0].replace("\n", " ")
    assert " ".join(lines[lines.index("  infobatch(ratio=0.5, delta=0.875, momentum=None)") + 1].split()) \
        in " ".join(card.split())
    assert "seed=" not in out and "clock=" not in out and "pysource" in out


def test_seq_len_warmup_runs_on_pysource_and_its_work_counts_tokens(tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, err = _main(capsys, "--task", "pysource", "--quick", "--epochs", "1", "--recipe", "baseline",
                            "--recipe", "seq_len_warmup", "--out", str(out))
    assert rc == 0, err
    runs = {r["recipe"]: r for r in _results(out)["runs"]}
    base, slw = runs["baseline"], runs["seq_len_warmup"]
    assert base["work"] == base["samples"] == slw["samples"] > 0  # every window, fewer tokens
    tokens = slw["telemetry"]["records"]["seq_len_warmup"]["epoch"][-1]
    assert tokens["tokens_forwarded_total"] < tokens["tokens_full_total"]
    assert slw["work"] == pytest.approx(slw["samples"] * tokens["tokens_forwarded_total"]
                                        / tokens["tokens_full_total"])
    header, rows = _table(stdout)
    col = header.index("work, fwd+bwd sample passes (% of baseline)")
    assert rows["seq_len_warmup"][col] == f"{round(slw['work']):,} ({slw['work'] / base['work']:.1%})"


def test_work_counts_extra_and_forward_only_passes():
    c = bench.run("mnist1d", ["baseline", "sam", "selective_backprop(beta=1)"], seeds=[0], epochs=2, bs=64,
                  task_kwargs={"n_samples": 600}, progress=None, threads=1, matched=False)
    base, sam, sb = c
    assert base.work == base.samples
    extra = sum(r["extra_samples"] for r in sam.telemetry["records"]["sam"]["epoch"])
    assert extra == sam.samples and sam.work == 2 * sam.samples  # SAM: a second forward+backward each step
    # Selective Backprop: the kept samples forwarded and backpropagated, all forwarded once more alone.
    assert sb.work == pytest.approx(sb.backpropagated + sb.samples / 3)
    assert "work, fwd+bwd sample passes (% of baseline)" in c.table


# ------------------------------------------------------------------------------------------ what a run shows


def test_notebook_progress_is_fastprogress_and_cleared_at_the_end(monkeypatch, capsys):
    import IPython.display
    from fastprogress.fastprogress import NBProgressBar

    from effilab.bench.campaign import _Progress

    shown = []

    class Handle:
        def update(self, obj):
            shown.append(obj)

    monkeypatch.setattr(IPython.display, "display", lambda obj, **k: shown.append(obj) or Handle())
    bar = _Progress("notebook", total=2, done=0, epochs=3)
    bar.begin()
    assert isinstance(bar.pb, NBProgressBar)
    bar.start_run("baseline", 0)
    bar.on_epoch(2)
    assert "baseline seed=0 epoch 2/3" in str(shown[-1])
    bar.finish_run("[1/2] baseline seed=0: ...")
    bar.close()
    assert isinstance(shown[-1], IPython.display.HTML) and shown[-1].data == ""  # cleared
    assert "[1/2] baseline seed=0: ..." in capsys.readouterr().out


def test_peak_memory_is_the_runs_not_the_process_so_far():
    def vm_hwm_mb():
        return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("Linux only")
    big = b"\1" * (600 * 2**20)  # 600 MB resident, then freed: the process's peak stays
    del big
    before = vm_hwm_mb()
    (r,) = bench.run("mnist1d", ["baseline"], seeds=[0], epochs=1, bs=64, task_kwargs={"n_samples": 600},
                     progress=None, threads=1)
    assert r.peak_mem_scope == "run" and 0 < r.peak_mem_mb < before - 400, (r.peak_mem_mb, before)
    assert "peak MB (RSS, per run)" in bench.format_table(bench.summarize([r]))
