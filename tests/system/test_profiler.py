"""The profiler callback: a Chrome trace of the chosen steps, a table in telemetry, a clean stop on any exit."""

from __future__ import annotations

import json

import pytest
import torch
from fastai.callback.core import Callback, CancelFitException

from effilab.callback import telemetry_of
from effilab.system import Profiler

from ..conftest import make_learner


def _profiler_is_off() -> bool:
    return not torch.autograd.profiler._is_profiler_enabled


def test_trace_of_the_chosen_steps(tmp_path):
    cb = Profiler(path=tmp_path, skip_first=1, wait=1, warmup=1, active=2)
    learn = make_learner([cb], n=256)  # 8 steps per epoch
    learn.fit(2, 1e-2)
    rec = telemetry_of(learn).records("profiler", "trace")
    assert len(rec) == 1 and rec[0]["steps"] == [4, 5] and rec[0]["path"] == str(tmp_path / "trace_fit0.json")
    trace = json.loads((tmp_path / "trace_fit0.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any("addmm" in n for n in names), "the trace holds no matmul of the model"
    steps = sorted(e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#"))
    assert steps == ["ProfilerStep#3", "ProfilerStep#4"]  # the profiler counts from 0: the 4th and 5th steps
    assert "Self CPU" in rec[0]["table"] and rec[0]["top"] and {"name", "count", "self_cpu_us"} <= set(rec[0]["top"][0])
    assert not telemetry_of(learn).records("profiler", "missed") and _profiler_is_off()
    learn.fit(1, 1e-2)  # a second fit writes its own trace
    assert (tmp_path / "trace_fit1.json").exists() and len(telemetry_of(learn).records("profiler", "trace")) == 2


def test_a_fit_shorter_than_the_schedule_says_so(tmp_path):
    learn = make_learner([Profiler(path=tmp_path, wait=5, warmup=5, active=5)], n=128)  # 4 steps
    learn.fit(1, 1e-2)
    assert telemetry_of(learn).records("profiler", "missed") == [{"fit": 0, "steps_taken": 4, "steps_needed": 15}]
    assert not list(tmp_path.glob("*.json")) and _profiler_is_off()


def test_stops_when_the_fit_is_cancelled(tmp_path):
    class Cancel(Callback):
        def after_batch(self):
            if self.training and self.iter == 1:
                assert not _profiler_is_off()
                raise CancelFitException()

    learn = make_learner([Profiler(path=tmp_path), Cancel()], n=128)
    learn.fit(1, 1e-2)
    assert _profiler_is_off()
    with torch.profiler.profile():  # a new profiler can start
        torch.ones(2).sum()


def test_default_folder_is_under_the_learner_path(tmp_path):
    learn = make_learner([Profiler(wait=0, warmup=0, active=1)], n=128, path=tmp_path)
    learn.fit(1, 1e-2)
    assert (tmp_path / "profiler" / "trace_fit0.json").exists()


def test_inactive_in_lr_find(tmp_path):
    learn = make_learner([Profiler(path=tmp_path, wait=0, warmup=0, active=1)], n=128)
    learn.lr_find(num_it=5, show_plot=False)
    assert not list(tmp_path.glob("*.json")) and _profiler_is_off()


@pytest.mark.parametrize("kwargs", [dict(active=0), dict(wait=-1), dict(warmup=1.5), dict(skip_first=True),
                                    dict(path=3), dict(profile_memory="yes"), dict(row_limit=0)])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises((TypeError, ValueError)):
        Profiler(**kwargs)
