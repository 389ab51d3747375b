"""FitRecorder: the "fit" and "schedule" telemetry contract, against fastai's own Recorder."""

from __future__ import annotations

import pickle

import cloudpickle
import numpy as np
import pytest
from fastai.callback.core import Callback

from effilab import InfoBatch, telemetry_of
from effilab.system.fit_recorder import FitRecorder, planned_schedule

from ..conftest import make_learner
from . import HostReadSpy

N_STEPS = 16  # per epoch: make_learner's 512 samples in batches of 32


def _plain(rec: dict):
    for k, v in rec.items():
        assert v is None or type(v) in (int, float, str, bool), f"{k}={v!r} is not a plain Python value"


def _two_groups(m):
    return [list(m[0].parameters()), list(m[1:].parameters())]


class FakeClock:
    """Advances `dt` per read."""

    def __init__(self, dt):
        self.t, self.dt = 0.0, dt

    def __call__(self):
        self.t += self.dt
        return self.t


def test_fit_one_cycle_follows_the_contract_and_matches_fastai():
    learn = make_learner([FitRecorder(every=3, max_per_s=float("inf"))])
    learn.fit_one_cycle(2, 1e-2)
    tel, rec = telemetry_of(learn), learn.recorder
    assert tel.meta("fit") == {"n_epoch": 2, "n_iter": N_STEPS, "bs": 32, "n_train": 512, "fit_index": 0,
                               "metric_names": ["accuracy"], "train_loss_from": "fit"}

    steps = tel.records("fit", "step")
    for r in steps:
        assert set(r) == {"iter", "epoch", "pct", "train_loss"}
        _plain(r)
        assert r["train_loss"] == pytest.approx(float(rec.losses[r["iter"]]), rel=1e-6)
        assert r["pct"] == pytest.approx(r["iter"] / (2 * N_STEPS)) and r["epoch"] == r["iter"] // N_STEPS

    epochs = tel.records("fit", "epoch")
    assert [r["epoch"] for r in epochs] == [0, 1]
    for r, values in zip(epochs, rec.values):
        assert set(r) == {"epoch", "train_loss", "valid_loss", "accuracy", "time_s"}
        _plain(r)
        assert [r["train_loss"], r["valid_loss"], r["accuracy"]] == pytest.approx(values, rel=1e-6)
        assert r["time_s"] > 0

    planned = tel.meta("schedule")["planned"]
    assert set(planned) == {"lr", "mom"}
    pct, lr = np.array(planned["lr"]["pct"]), np.array(planned["lr"]["value"])
    assert len(pct) == 201 and pct[0] == 0 and pct[-1] == 1 and max(lr) == pytest.approx(1e-2)
    # fastai's recorded lr of step i was set at pct i/32; compare where that pct is on the planned grid
    matched = 0
    for i, actual in enumerate(rec.lrs):
        k = np.flatnonzero(np.abs(pct - i / (2 * N_STEPS)) < 1e-12)
        if len(k):
            assert lr[k[0]] == pytest.approx(actual, rel=1e-6)
            matched += 1
    assert matched >= 8
    mom = dict(zip(planned["mom"]["pct"], planned["mom"]["value"]))
    assert mom[0.5] == pytest.approx(rec.hps["mom"][16], rel=1e-6)

    sched = tel.records("schedule", "step")
    assert [r["iter"] for r in sched] == [r["iter"] for r in steps]
    for r in sched:
        assert set(r) == {"iter", "pct", "lr", "mom"}
        _plain(r)
        assert r["lr"] == rec.lrs[r["iter"]] and r["mom"] == rec.hps["mom"][r["iter"]]


def test_thinning_by_steps_keeps_the_last_step_of_each_epoch():
    learn = make_learner([FitRecorder(every=5, max_per_s=float("inf"))])
    learn.fit(3, 1e-2)
    iters = telemetry_of(learn).series("fit", "step", "iter")
    last = {N_STEPS * e + N_STEPS - 1 for e in range(3)}
    assert last <= set(iters) and iters == sorted(iters)
    thinned = [i for i in iters if i not in last]
    assert all(b - a >= 5 for a, b in zip(thinned, thinned[1:]))
    # after each epoch's last step the count starts again
    assert iters == [4, 9, 14, 15, 20, 25, 30, 31, 36, 41, 46, 47]


def test_thinning_in_time_with_a_fake_clock():
    clock = FakeClock(dt=0.125)  # each check reads 1/8 s later: 2 records/s allows every 4th step
    learn = make_learner([FitRecorder(every=1, max_per_s=2.0, clock=clock)])
    learn.fit(1, 1e-2)
    iters = telemetry_of(learn).series("fit", "step", "iter")
    assert iters == [0, 4, 8, 12, 15]  # 15: the epoch's last step
    unthrottled = make_learner([FitRecorder(every=1, max_per_s=float("inf"))])
    unthrottled.fit(1, 1e-2)
    assert telemetry_of(unthrottled).series("fit", "step", "iter") == list(range(N_STEPS))


def test_plain_fit_plans_nothing_and_keeps_other_techniques_keys():
    learn = make_learner([FitRecorder()])
    learn.fit_one_cycle(1, 1e-2)
    tel = telemetry_of(learn)
    assert set(tel.meta("schedule")["planned"]) == {"lr", "mom"}
    planned = tel.meta("schedule")["planned"]  # another technique adds its key the contract's way
    planned["prune_ratio"] = {"pct": [0.0, 1.0], "value": [0.5, 0.0]}
    tel.set_meta("schedule", planned=planned)
    n_sched = len(tel.records("schedule", "step"))
    learn.fit(1, 1e-2)  # constant hypers: nothing moves
    assert set(tel.meta("schedule")["planned"]) == {"prune_ratio"}
    assert len(tel.records("schedule", "step")) == n_sched
    assert tel.meta("fit")["fit_index"] == 1 and len(tel.records("fit", "epoch")) == 2


def test_fit_flat_cos_plans_only_the_lr():
    learn = make_learner([FitRecorder(every=1, max_per_s=float("inf"))])
    learn.fit_flat_cos(2, 1e-2)
    planned = telemetry_of(learn).meta("schedule")["planned"]
    assert set(planned) == {"lr"}
    lr = dict(zip(planned["lr"]["pct"], planned["lr"]["value"]))
    assert lr[0.0] == lr[0.5] == lr[0.75] == pytest.approx(1e-2) and lr[1.0] == pytest.approx(1e-7)
    actual = telemetry_of(learn).series("schedule", "step", "lr")
    assert actual == [float(v) for v in learn.recorder.lrs]


def test_discriminative_lrs_get_one_key_per_group():
    learn = make_learner([FitRecorder(every=1, max_per_s=float("inf"))], splitter=_two_groups)
    learn.fit_one_cycle(1, slice(1e-3, 1e-2))
    tel = telemetry_of(learn)
    planned = tel.meta("schedule")["planned"]
    assert set(planned) == {"lr/g0", "lr/g1", "mom"}
    assert max(planned["lr/g0"]["value"]) == pytest.approx(1e-3)
    assert max(planned["lr/g1"]["value"]) == pytest.approx(1e-2)
    sched = tel.records("schedule", "step")
    assert [r["lr/g1"] for r in sched] == pytest.approx(learn.recorder.lrs, rel=1e-12)  # the last group
    assert all(r["lr/g0"] == pytest.approx(r["lr/g1"] / 10) for r in sched)


def test_planned_schedule_without_an_optimiser_schedule():
    learn = make_learner()
    learn.create_opt()
    assert planned_schedule(learn) == ({}, {})


def test_validate_lr_find_resume_and_pruned_epochs(tmp_path):
    class SaveAt(Callback):
        order = 100  # after the telemetry writers' epoch records, which the checkpoint carries

        def after_epoch(self):
            if self.epoch == 1:
                self.learn.save_checkpoint("mid")

    learn = make_learner([InfoBatch(0.7, seed=0), FitRecorder(every=4), SaveAt()], path=tmp_path)
    learn.lr_find(num_it=8, show_plot=False)
    tel = telemetry_of(learn)
    assert tel.records("fit", "step") == [] and "fit" not in tel.sources
    learn.fit_one_cycle(4, 1e-2)
    learn.validate()
    assert [r["epoch"] for r in tel.records("fit", "epoch")] == [0, 1, 2, 3]
    assert tel.meta("fit")["n_iter"] == N_STEPS  # the first epoch trains on all the data
    # the last step of a pruned epoch is recorded too: one record per epoch at least, in order
    assert sorted({r["epoch"] for r in tel.records("fit", "step")}) == [0, 1, 2, 3]

    resumed = make_learner([InfoBatch(0.7, seed=0), FitRecorder(every=4)], path=tmp_path)
    start = resumed.load_checkpoint("mid")
    resumed.fit_one_cycle(4, 1e-2, start_epoch=start)
    rtel = telemetry_of(resumed)
    assert rtel.meta("fit")["fit_index"] == 0  # the same fit, continued
    assert [r["epoch"] for r in rtel.records("fit", "epoch")] == [0, 1, 2, 3]
    final = tel.records("fit", "epoch")[3]["valid_loss"]
    assert rtel.records("fit", "epoch")[3]["valid_loss"] == pytest.approx(final)


def test_host_reads_happen_only_at_record_points(monkeypatch):
    spy = HostReadSpy(monkeypatch)
    learn = make_learner([FitRecorder(every=1000), *spy.callbacks()])  # more than the 48 steps of the fit
    learn.fit_one_cycle(3, 1e-2)
    assert len(spy.per_batch) == 3 * N_STEPS
    with_reads = [i for i, reads in enumerate(spy.per_batch) if reads]
    # only each epoch's last step is recorded, and there the smoothed loss is read once (CPU: float())
    assert telemetry_of(learn).series("fit", "step", "iter") == [15, 31, 47]
    assert with_reads == [15, 31, 47] and all(len(spy.per_batch[i]) == 1 for i in with_reads)

    spy.per_batch.clear()
    learn = make_learner([FitRecorder(every=4, max_per_s=float("inf")), *spy.callbacks()])
    learn.fit(1, 1e-2)
    recorded = telemetry_of(learn).series("fit", "step", "iter")
    assert [i for i, reads in enumerate(spy.per_batch) if reads] == recorded == [3, 7, 11, 15]


def test_with_a_sync_free_recorder_it_reads_no_loss(monkeypatch):
    """The SyncFreeRecorder's reads are the training curve: FitRecorder copies no loss itself, and the
    dashboard's loss curve is made of those reads."""
    from effilab.core.probe import HostCopy
    from effilab.system.recorder import SyncFreeRecorder
    from effilab.viz import figures as F

    puts = []
    monkeypatch.setattr(HostCopy, "put", lambda self, x: puts.append(x))
    learn = make_learner([SyncFreeRecorder(every=4), FitRecorder(every=1, max_per_s=float("inf"))])
    learn.fit(2, 1e-2)
    tel = telemetry_of(learn)
    assert not puts and tel.meta("fit")["train_loss_from"] == "recorder"
    steps = tel.records("fit", "step")
    assert len(steps) == 2 * N_STEPS and not any("train_loss" in r for r in steps)
    reads = tel.records("recorder", "read")
    assert [r["iter"] for r in reads] == list(range(3, 2 * N_STEPS, 4))
    loss = next(c for c in F.cells(tel) if c.key == "loss").traces[0]
    assert loss["y"] == pytest.approx([r["smooth_loss"] for r in reads], rel=1e-4)
    assert loss["x"] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0])
    # Without the recorder, the next fit's curve is FitRecorder's own again.
    learn.remove_cb(SyncFreeRecorder)
    learn.fit(1, 1e-2)
    assert tel.meta("fit")["train_loss_from"] == "fit" and len(puts) == N_STEPS


def test_pickles_with_the_learner_and_mid_fit():
    states = []

    class PickleMidFit(Callback):
        order = 100

        def after_batch(self):
            if self.training and self.iter == 3:
                cb = self.learn.cbs.filter(lambda c: isinstance(c, FitRecorder))[0]
                states.append(pickle.dumps({k: v for k, v in cb.__getstate__().items() if k != "learn"}))

    learn = make_learner([FitRecorder(every=2), PickleMidFit()])
    learn.fit_one_cycle(1, 1e-2)
    assert len(states) == 1 and pickle.loads(states[0])["every"] == 2
    copy = cloudpickle.loads(cloudpickle.dumps(learn))  # what `learn.export` does, without emptying the dls
    cb = copy.cbs.filter(lambda c: isinstance(c, FitRecorder))[0]
    assert cb._run is None and cb._owned == {"lr", "mom"}
    copy.fit_one_cycle(1, 1e-2)
    assert telemetry_of(copy).meta("fit")["fit_index"] == 1
    assert len(telemetry_of(copy).records("fit", "epoch")) == 2
