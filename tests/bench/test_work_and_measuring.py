"""The work column counts every technique's hidden passes; compared runs carry the same measuring callbacks."""

from __future__ import annotations

import pytest

from effilab import bench
from effilab.bench.campaign import MEASURING, same_measuring
from effilab.bench.fit import FORWARD_SHARE, SampleCounter, work_of
from effilab.bench.recipes import get_recipe


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("EFFILAB_CACHE", str(tmp_path_factory.getbasetemp() / "effilab-cache"))


def _forward_only(run, source, stream):
    return sum(r.get("forward_only_samples", 0) for r in run.telemetry["records"][source][stream])


def test_work_counts_the_forward_only_passes_of_every_technique():
    c = bench.run("mnist1d", ["baseline", "static_prune(fraction=0.3)", "schedule_free", "lsuv", "swa(start_frac=0.5)"],
                  seeds=[0], epochs=2, bs=64, task_kwargs={"n_samples": 600}, progress=None, threads=1)
    assert not c.failures, c.failures
    base, sp, sf, lsuv, swa = c
    assert base.work == base.samples
    # Static pruning: its scoring pass forwards the whole training set once more, without backward.
    n_train = sp.telemetry["records"]["static_prune"]["epoch"][0]["n_samples"]
    assert _forward_only(sp, "static_prune", "scoring") == n_train > 0
    assert sp.work == pytest.approx(sp.samples + FORWARD_SHARE * n_train)
    # Schedule-free and SWA: the BatchNorm passes of the evaluated / averaged weights (the MLP has BatchNorm).
    bn = _forward_only(sf, "schedule_free", "epoch")
    assert bn > 0 and sf.work == pytest.approx(sf.samples + FORWARD_SHARE * bn)
    bn = _forward_only(swa, "swa", "epoch")
    assert bn >= n_train and swa.work == pytest.approx(swa.samples + FORWARD_SHARE * bn)
    # LSUV: its forwards of one batch per layer and iteration, once.
    rows = lsuv.telemetry["meta"]["lsuv"]["layers"]
    assert lsuv.work == pytest.approx(lsuv.samples + FORWARD_SHARE * 64 * sum(r["iterations"] + 1 for r in rows))


def test_work_of_reads_forward_only_samples_from_records_and_meta():
    tel = {"records": {"a": {"epoch": [{"forward_only_samples": 30}, {"forward_only_samples": 60}]},
                       "b": {"samples": [{"forwarded_total": 10_000}]}},
           "meta": {"c": {"forward_only_samples": 9}}}
    assert work_of(300, tel) == pytest.approx(300 + FORWARD_SHARE * 99)
    assert work_of(300, {"records": {}, "meta": {}}) == 300


def test_same_measuring_adds_what_another_recipe_measures_with_its_arguments():
    recipes = [get_recipe("baseline"), get_recipe("infobatch+dashboard(max_per_s=1.0)"),
               get_recipe("random_prune+system_monitor(every_s=2.0)")]
    out = same_measuring(recipes)
    keys = [sorted(s.key for s in r.components if s.key in MEASURING) for r in out]
    assert keys == [["dashboard", "system_monitor"]] * 3
    assert [r.name for r in out] == [r.name for r in recipes]
    assert all(str(s) == "dashboard(max_per_s=1.0)" for r in out for s in r.components if s.key == "dashboard")
    assert same_measuring([get_recipe("baseline"), get_recipe("infobatch")]) == [get_recipe("baseline"),
                                                                                  get_recipe("infobatch")]


def test_a_baseline_and_a_technique_run_have_the_same_non_technique_callbacks(monkeypatch):
    seen: dict[int, list[str]] = {}
    before_fit = getattr(SampleCounter, "before_fit", None)

    def spy(self):
        seen[len(seen)] = sorted(type(cb).__name__ for cb in self.learn.cbs)
        if before_fit is not None:
            before_fit(self)

    monkeypatch.setattr(SampleCounter, "before_fit", spy, raising=False)
    c = bench.run("mnist1d", ["baseline", "infobatch+dashboard"], seeds=[0], epochs=1, bs=64,
                  task_kwargs={"n_samples": 600}, progress=None, threads=1, target_acc=0.99)
    assert not c.failures, c.failures
    base, technique = seen[0], seen[1]
    assert "Dashboard" in base and "SystemMonitor" in base and "FitRecorder" in base
    assert [n for n in technique if n != "InfoBatch"] == base
    assert "system" in c.results[0].telemetry["records"]  # the baseline's monitor wrote what the other's did


def test_the_first_flop_count_of_the_process_is_paid_before_the_timed_fit(monkeypatch):
    # The first FLOP count in a process costs ~1 s of CPU (imports, the meta device's first dispatch): counted
    # inside the first run's timed fit, it made the campaign's baseline look several times slower on --quick.
    from fastai.learner import Learner

    import effilab.core.budget as core_budget

    events = []
    count, fit = core_budget.step_flops, Learner.fit

    def counting(*a, **k):
        events.append("count")
        return count(*a, **k)

    def fitting(self, *a, **k):
        events.append("fit")
        return fit(self, *a, **k)

    core_budget.warm_up_flop_counting.cache_clear()
    monkeypatch.setattr(core_budget, "step_flops", counting)
    monkeypatch.setattr(Learner, "fit", fitting)
    c = bench.run("mnist1d", ["baseline"], seeds=[0], epochs=1, bs=64, task_kwargs={"n_samples": 600},
                  progress=None, threads=1)
    assert not c.failures, c.failures
    assert events[:2] == ["count", "fit"] and "count" in events[2:]  # warmed up, then the run's own count
