"""The bench never loses a result: every bad input is refused before any training (exit 2, a message,
nothing written), a run that would forward nothing is refused, nothing after a run (the table, the
report, a full disk) keeps its result from results.json, and a resume keeps failure records until
their run is retried."""

import errno
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

from effilab import bench
from effilab.__main__ import main
from effilab.bench import store as S

PLUGIN = "tests.bench.plugin"
TINY = ["--task", "mnist1d", "--n-samples", "600", "--epochs", "2", "--bs", "64", "--seeds", "0"]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("EFFILAB_CACHE", str(tmp_path_factory.getbasetemp() / "effilab-cache"))
    for name in ("EFFILAB_TEST_INTERRUPT", "EFFILAB_TEST_FIXED"):
        monkeypatch.delenv(name, raising=False)


def _main(capsys, *args) -> tuple[int, str, str]:
    try:
        rc = main(["bench", *args])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


# ------------------------------------------------------------------------------------------ bad input


def _toml(tmp_path, line: str) -> list[str]:
    path = tmp_path / "campaign.toml"
    path.write_text(f'{line}\n[[recipe]]\ncomponents = ["baseline"]\n')
    return ["--recipes-file", str(path)]


def _wrong_fields(tmp_path) -> list[str]:
    folder = tmp_path / "old"
    folder.mkdir()
    config = {"task": "mnist1d", "recipes": [{"name": "baseline", "components": ["baseline"]}], "seeds": [0],
              "epochs": 2, "bs": 64, "lr": 0.01}
    run = {"recipe": "baseline", "seed": "zero", "accuracy": 0.5}  # valid JSON, not a run record
    (folder / "results.json").write_text(json.dumps({"config": config, "runs": [run], "failures": []}))
    return ["--resume", str(folder)]


def _a_file(tmp_path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    return path


BAD_INPUT = {
    "device foo": (lambda t: ["--device", "foo"], "unknown device 'foo': use cpu, cuda, cuda:N or mps"),
    "device cuda without a GPU": (lambda t: ["--device", "cuda"], "no CUDA GPU is available"),
    "lr nan": (lambda t: ["--lr", "nan"], "--lr a positive finite number (got --lr nan)"),
    "lr inf": (lambda t: ["--lr", "inf"], "--lr a positive finite number (got --lr inf)"),
    "toml epochs string": (lambda t: _toml(t, 'epochs = "eight"'), "epochs must be an integer, got 'eight'"),
    "toml epochs float": (lambda t: _toml(t, "epochs = 2.5"), "epochs must be an integer, got 2.5"),
    "toml seeds int": (lambda t: _toml(t, "seeds = 3"), "seeds must be a list of integers, got 3"),
    "toml lr string": (lambda t: _toml(t, 'lr = "0.01"'), "lr must be a number, got '0.01'"),
    "toml seeds strings": (lambda t: _toml(t, 'seeds = ["a"]'), "seeds must be a list of integers, got ['a']"),
    "toml device int": (lambda t: _toml(t, "device = 3"), "device must be a string, got 3"),
    "resume a file": (lambda t: ["--resume", str(_a_file(t))], "is a file: give the campaign's folder"),
    "n-samples below the loader's minimum": (lambda t: ["--n-samples", "5"],
                                             "task 'mnist1d': n_samples must be at least 10"),
    "n-samples below one batch": (lambda t: ["--n-samples", "60", "--bs", "64"],
                                  "has 48 training samples, fewer than one batch (bs=64)"),
    "results.json with wrong fields": (_wrong_fields, "run 1: 'seed' has the wrong type (str: 'zero')"),
    "text-only component on images": (lambda t: ["--task", "digits", "--recipe", "seq_len_warmup"],
                                      "component 'seq_len_warmup' in recipe 'seq_len_warmup' works on token "
                                      "sequences; task 'digits' has images"),
    "text-only component on flat inputs": (lambda t: ["--recipe", "baseline+seq_len_warmup"],
                                           "works on token sequences; task 'mnist1d' has flat feature vectors"),
    "images-only component on text": (lambda t: ["--task", "pysource", "--recipe", "progressive_resize"],
                                      "'progressive_resize' in recipe 'progressive_resize' works on images; "
                                      "task 'pysource' has token sequences"),
    "cutmix on text": (lambda t: ["--task", "pysource", "--recipe", "cutmix"], "works on images"),
    "stochastic depth on the plain CNN": (lambda t: ["--task", "digits", "--recipe", "stochastic_depth"],
                                          "StochasticDepth needs a residual model, but Sequential has no "
                                          "ResidualBlock"),
    "growth on the plain CNN names the fix": (lambda t: ["--task", "digits", "--model", "cnn", "--recipe",
                                                         "model_growth"], "In the bench: --model resnet"),
    "resnet on text": (lambda t: ["--task", "pysource", "--model", "resnet"], "model 'resnet' needs image inputs"),
    "resnet on flat inputs": (lambda t: ["--model", "resnet"], "model 'resnet' needs image inputs"),
    "out is a file": (lambda t: ["--out", str(_a_file(t))], "is a file, not a folder"),
    "out without a value": (lambda t: ["--out"], "argument --out: expected one argument"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_exits_2_before_any_training(case, tmp_path, capsys, monkeypatch):
    if case == "device cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    make_args, message = BAD_INPUT[case]
    trained = []
    import effilab.bench.campaign as C

    monkeypatch.setattr(C, "fit_one", lambda *a, **k: trained.append(a) or pytest.fail("trained"))
    args = make_args(tmp_path)
    out = ["--out", str(tmp_path / "out")] if "--out" not in args and "--resume" not in args else []
    rc, stdout, err = _main(capsys, "--quick", *out, *args)
    assert rc == 2, (stdout, err)
    assert message in " ".join(err.split()), err
    assert "Traceback" not in err and not trained
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not Path("/sys").is_dir() or os.access("/sys", os.W_OK) and os.getuid() != 0,
                    reason="needs a read-only /sys")
def test_read_only_out_exits_2_before_any_training(capsys):
    rc, _, err = _main(capsys, *TINY, "--recipe", "baseline", "--out", "/sys/effilab-bench-out")
    assert rc == 2
    assert "cannot write results to /sys/effilab-bench-out" in err and "Choose a writable folder" in err


def test_python_api_checks_before_training(tmp_path):
    base = dict(task_kwargs={"n_samples": 600}, epochs=1, bs=64, progress=None)
    with pytest.raises(ValueError, match="lr must be a positive finite number, got nan"):
        bench.run("mnist1d", ["baseline"], lr=math.nan, **base)
    with pytest.raises(ValueError, match="seeds must be integers"):
        bench.run("mnist1d", ["baseline"], seeds=[1.5], **base)
    with pytest.raises(ValueError, match="epochs and bs must be positive integers, got True"):
        bench.run("mnist1d", ["baseline"], **{**base, "epochs": True})
    with pytest.raises(bench.TaskError, match="fewer than one batch"):
        bench.run("mnist1d", ["baseline"], **{**base, "bs": 1024})
    with pytest.raises(bench.OutputUnwritable, match="is a file"):
        bench.run("mnist1d", ["baseline"], out=_a_file(tmp_path), **base)


def test_results_must_have_the_fields_a_resume_reads(tmp_path):
    good = {"config": {"task": "t", "recipes": [], "seeds": [0], "epochs": 1, "bs": 2, "lr": 0.1}, "runs": []}
    assert S.validate_results(good) is good
    for broken, message in (
            ({**good, "config": {**good["config"], "epochs": "1"}}, "its config: 'epochs' has the wrong type"),
            ({**good, "runs": [{"recipe": "b"}]}, "run 1 lacks 'seed'"),
            ({**good, "failures": [{"recipe": "b", "seed": 0}]}, "failure 1 lacks 'error_type'"),
            ({"runs": []}, "not an effilab bench results file")):
        with pytest.raises(ValueError, match=re.escape(message)):
            S.validate_results(broken)


# ------------------------------------------------------------------------------------------ after a run


def test_full_disk_while_writing_the_report_keeps_every_run(tmp_path, capsys, monkeypatch):
    import effilab.bench.report as report

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(report.Path, "write_text", no_space)  # report.html goes through Path.write_text
    out = tmp_path / "out"
    rc, stdout, err = _main(capsys, *TINY, "--seeds", "0", "1", "--recipe", "baseline", "--out", str(out))
    assert rc == 3, err
    assert "could not write report.html: OSError: [Errno 28] No space left on device" in err
    assert "2 finished runs are in the table above" in err
    assert [r["seed"] for r in _results(out)["runs"]] == [0, 1]  # every finished run kept
    assert _results(out)["status"] == "complete"
    assert "| baseline " in stdout and not (out / "report.html").exists()


def test_a_table_that_cannot_be_drawn_does_not_keep_results_from_being_written(tmp_path, capsys,
                                                                                 monkeypatch):
    import effilab.bench.table as T

    def broken(*a, **k):
        raise ZeroDivisionError("odd result")

    monkeypatch.setattr(T, "table_rows", broken)  # the terminal's table, results.json's, the report's
    out = tmp_path / "out"
    rc, stdout, err = _main(capsys, *TINY, "--recipe", "baseline", "--out", str(out))
    assert rc == 3, err
    data = _results(out)
    assert [r["recipe"] for r in data["runs"]] == ["baseline"]
    assert data["summary_error"] == "ZeroDivisionError: odd result"
    assert "the summary table could not be drawn: ZeroDivisionError: odd result" in stdout
    assert "could not write report.html: ZeroDivisionError: odd result" in err


def test_a_results_write_that_fails_loses_no_run(tmp_path, capsys, monkeypatch):
    real, calls = S.write_json_atomic, []

    def first_fails(path, data):
        calls.append(len(data["runs"]))
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, data)

    monkeypatch.setattr(S, "write_json_atomic", first_fails)
    out = tmp_path / "out"
    rc, _, err = _main(capsys, *TINY, "--seeds", "0", "1", "--recipe", "baseline", "--out", str(out))
    assert rc == 3 and "could not write results.json" in err
    assert calls[0] == 1 and [r["seed"] for r in _results(out)["runs"]] == [0, 1]


def test_odd_results_format_as_dashes():
    mk = lambda acc, wall, samples: bench.RunResult("r", 0, "t", 2, 10, 0.1, acc, acc, wall, wall, samples, 0,
                                                    samples // 10, None)
    rows = bench.summarize([mk(math.nan, 0.0, 0), mk(0.5, math.inf, 100)])
    table = bench.format_table(rows)  # no full_samples, no throughput, a NaN accuracy: no exception
    assert "| r " in table and "50.00 ± 0.00" in table and "—" in table


def test_json_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    S.write_json_atomic(path, {"runs": [1]})
    import json as json_module

    def torn(data, f, **k):
        f.write('{"runs": [1, 2')
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json_module, "dump", torn)
    with pytest.raises(OSError):
        S.write_json_atomic(path, {"runs": [1, 2]})
    assert json.loads(path.read_text()) == {"runs": [1]}  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left


# ------------------------------------------------------------------------------------------ resume


def test_resume_keeps_a_failure_record_until_its_run_is_retried(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    flaky = "baseline+explode(at_epoch=1, unless_env='EFFILAB_TEST_FIXED')+interrupt(at_epoch=0)"
    args = ["--import", PLUGIN, *TINY, "--recipe", "baseline", "--recipe", flaky, "--out", str(out), "--no-matched"]
    rc, _, err = _main(capsys, *args)
    assert rc == 1, err
    (failure,) = _results(out)["failures"]
    assert failure["recipe"] == flaky and "boom" in failure["error"]

    monkeypatch.setenv("EFFILAB_TEST_INTERRUPT", "1")  # the retry is interrupted: it did not happen
    rc, _, err = _main(capsys, "--import", PLUGIN, "--resume", str(out))
    assert rc == 130, err
    assert _results(out)["failures"] == [failure]

    monkeypatch.delenv("EFFILAB_TEST_INTERRUPT")
    monkeypatch.setenv("EFFILAB_TEST_FIXED", "1")  # the retry succeeds: its failure record goes
    rc, stdout, err = _main(capsys, "--import", PLUGIN, "--resume", str(out))
    assert rc == 0, err
    data = _results(out)
    assert data["failures"] == [] and data["status"] == "complete"
    assert sorted(r["recipe"] for r in data["runs"]) == sorted(["baseline", flaky])
