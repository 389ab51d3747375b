"""`effilab bench --nproc N`: each run on N processes under torchrun (DDP, gloo on CPU cores); a bad N is
refused before any work."""

import json
from pathlib import Path

import pytest
import torch.distributed as dist

from effilab.__main__ import main
from effilab.bench.distributed import check_nproc
from effilab.system.launcher import available_devices

TINY = ["--task", "mnist1d", "--n-samples", "2000", "--epochs", "4", "--seeds", "0", "--recipe", "baseline"]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("EFFILAB_CACHE", str(tmp_path_factory.getbasetemp() / "effilab-cache"))


@pytest.mark.parametrize("bad", ["0", "-1"])
def test_non_positive_nproc_is_a_usage_error(bad, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", *TINY, "--nproc", bad, "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    assert "--nproc must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_nproc_above_the_cores_or_gpus_is_refused_before_any_work(tmp_path, capsys):
    available, what = available_devices()
    with pytest.raises(SystemExit) as e:
        main(["bench", *TINY, "--nproc", str(available + 1), "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"--nproc {available + 1} is more than the {available} {what}" in err
    assert f"use --nproc {available} or fewer" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", [True, 1.0, "2"])
def test_check_nproc_rejects_non_integers(bad):
    with pytest.raises(ValueError, match="positive integer"):
        check_nproc(bad)


@pytest.mark.slow
@pytest.mark.skipif(available_devices()[0] < 2 or not dist.is_gloo_available(),
                    reason="needs 2 CPU cores (or GPUs) and torch.distributed with gloo")
def test_two_processes_train_the_global_batch_of_one(tmp_path):
    """2 processes with --bs 32 take the steps and samples of 1 process with --bs 64, and learn; a pruning
    recipe's samples are counted once, not once per rank."""
    runs = {}
    for nproc, bs, more in ((1, 64, []), (2, 32, ["--recipe", "infobatch(ratio=0.5)"])):
        out = tmp_path / f"n{nproc}"
        assert main(["bench", *TINY, *more, "--bs", str(bs), "--nproc", str(nproc), "--out", str(out)]) == 0
        runs[nproc] = json.loads((out / "results.json").read_text())
    one, two = runs[1]["runs"][0], runs[2]["runs"][0]
    infobatch = runs[2]["runs"][1]
    # InfoBatch's telemetry counts its whole plan on every rank: counted once, it pruned (each rank's own
    # counter, summed over the ranks, would agree).
    assert infobatch["recipe"] == "infobatch(ratio=0.5)"
    assert 0.5 * two["samples"] < infobatch["samples"] < two["samples"]
    assert runs[2]["config"]["nproc"] == 2 and "nproc" not in runs[1]["config"]
    # 1600 training samples: 25 batches of 64 per epoch, or 25 of 32 on each of the 2 ranks.
    assert one["steps"] == two["steps"] == 4 * 25
    assert one["samples"] == two["samples"] == 4 * 1600
    assert two["accuracy"] > 0.2  # learned: twice chance (10 classes)
    assert abs(two["accuracy"] - one["accuracy"]) < 0.1


@pytest.mark.slow
@pytest.mark.skipif(available_devices()[0] < 2 or not dist.is_gloo_available(),
                    reason="needs 2 CPU cores (or GPUs) and torch.distributed with gloo")
@pytest.mark.parametrize("lost_rank", [None, 1])
def test_a_process_aborting_after_its_fit_loses_nothing(lost_rank, monkeypatch, tmp_path):
    """A rank that aborts while tearing down gloo's threads (exit -6 after the closing barrier) has written its
    fit: the run is kept. A rank that never wrote its fit fails the run, with torchrun's output."""
    import subprocess

    import effilab.bench.distributed as D

    real_run = subprocess.run

    def aborting(cmd, **kwargs):
        proc = real_run(cmd, **kwargs)
        assert proc.returncode == 0, proc.stdout[-3000:]
        if lost_rank is not None:
            (Path(cmd[-1]) / f"rank{lost_rank}.pkl").unlink()
        return subprocess.CompletedProcess(cmd, -6, "terminate called without an active exception\n")

    monkeypatch.setattr(D.subprocess, "run", aborting)
    out = tmp_path / "out"
    code = main(["bench", *TINY[:5], "1", "--seeds", "0", "--recipe", "baseline", "--bs", "32", "--nproc", "2",
                 "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    if lost_rank is None:
        assert code == 0 and results["runs"][0]["steps"] == 25  # 1 epoch of 25 batches of 32 per rank
    else:
        assert code == 1 and not results["runs"]
        assert "terminate called" in results["failures"][0]["error"]
