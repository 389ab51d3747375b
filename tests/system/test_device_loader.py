"""The device-resident loader: seeded device shuffling, batched augmentation, plans as device indices, every
data technique on it (same plans and weights as on fastai's loader, no host read per step), clear refusals."""

from __future__ import annotations

import pickle

import pytest
import torch
from fastai.callback.core import Callback
from fastai.learner import load_learner

from effilab.core import device_data
from effilab.core.device_data import Augment, DatasetTooLarge, DeviceTensors, translate
from effilab.registry import all_techniques
from effilab.system import DeviceDataLoader, DeviceDataLoaders

from ..conftest import make_arrays, make_images, make_learner, make_sequences, params_of
from ..spies import HostReadSpy

TECHNIQUES = all_techniques()
# The data-centric techniques, and the batch-size schedule (registered with the optimisers) that sets the
# training loader's batch size.
DATA = sorted(n for n, t in TECHNIQUES.items() if t.category == "data") + ["batch_size_schedule"]
MAKE_DATA = {"tabular": make_arrays, "image": make_images, "sequence": make_sequences}


def _dls(task="tabular", n=512, bs=32, **kwargs):
    x, y = MAKE_DATA[task](n + n // 4, seed=0)
    return DeviceDataLoaders.from_tensors(x[:n], y[:n], x[n:], y[n:], bs=bs, **kwargs)


def _indices(dl):
    out = []
    for _ in dl:
        out.append(dl.batch_idx.clone())
    return torch.cat(out)


def test_batches_are_the_rows_of_a_seeded_device_shuffle():
    x = torch.arange(100.0).view(100, 1).repeat(1, 3)
    dls = DeviceDataLoaders.from_tensors(x, torch.arange(100), x[:10], torch.arange(10), bs=16, seed=3)
    train = dls.train
    assert len(train) == 6 and train.n == 100
    seen = []
    for xb, yb in train:
        assert xb.shape == (16, 3) and torch.equal(xb[:, 0].long(), train.batch_idx)
        assert torch.equal(yb, train.batch_idx)
        seen.append(train.batch_idx)
    first = torch.cat(seen)
    assert len(first) == 96 and len(set(first.tolist())) == 96  # a permutation, last partial batch dropped
    second = _indices(train)
    assert not torch.equal(first, second), "every pass draws a new order"
    again = _indices(DeviceDataLoaders.from_tensors(x, torch.arange(100), x[:10], torch.arange(10), bs=16,
                                                   seed=3).train)
    assert torch.equal(first, again), "the same seed gives the same first pass"
    train.set_epoch(1)
    assert torch.equal(_indices(train), second), "set_epoch replays a pass"
    valid = dls.valid
    assert len(valid) == 1 and torch.equal(_indices(valid), torch.arange(10)), "validation: in order, no drop"


def test_a_plan_is_followed_as_given_on_the_device():
    dls = _dls(bs=8)
    plan = torch.tensor([5, 5, 0, 511, 7, 3, 3, 3, 2, 9, 1])  # a subset, with repeats, in this order
    dl = dls.train.follow_plan(plan)
    assert len(dl) == 1 and dl.plan.device == dls.train.dataset.device  # drop_last: one full batch of 8
    (xb, yb), = list(dl)
    assert torch.equal(dl.plan[:8], plan[:8])
    assert torch.equal(xb, dls.train.dataset.x[plan[:8]]) and torch.equal(yb, dls.train.dataset.y[plan[:8]])
    with pytest.raises(TypeError, match="1-d integer tensor"):
        dls.train.follow_plan(torch.rand(4))


def test_fastais_distributed_loader_shards_a_plan(monkeypatch):
    """Under DDP fastai wraps the training loader in its DistributedDL, which drives it by host indices."""
    from fastai.distributed import DistributedDL

    monkeypatch.setattr(DistributedDL, "_broadcast", lambda self, t, rank: list(t))  # one process: no collective
    dls = _dls(bs=4, augment=None)
    plan = torch.arange(40).flip(0)
    shards = []
    for rank in (0, 1):
        view = dls.train.follow_plan(plan)
        ddl = DistributedDL(view, rank=rank, world_size=2)
        idx = []
        for xb, _ in ddl:
            assert torch.equal(xb, dls.train.dataset.x[view.batch_idx])
            idx.append(view.batch_idx)
        shards.append(torch.cat(idx))
    assert torch.equal(torch.cat(shards), plan), "each rank trains on its half of the plan"


def test_flip_translate_and_normalise_as_batched_ops():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 2, 8, 8), generator=g, dtype=torch.uint8)
    mean, std = (0.5, 0.25), (0.2, 0.4)
    stats = torch.tensor(mean).view(1, 2, 1, 1), torch.tensor(std).view(1, 2, 1, 1)
    scaled = (x.float() / 255 - stats[0]) / stats[1]
    dls = DeviceDataLoaders.from_tensors(x, torch.zeros(64, dtype=torch.long), x, torch.zeros(64, dtype=torch.long),
                                         bs=16, seed=0, augment=Augment(flip=True, mean=mean, std=std))
    flipped = 0
    for xb, _ in dls.train:
        ref = scaled[dls.train.batch_idx]
        same, mirrored = (xb == ref).flatten(1).all(1), (xb == ref.flip(-1)).flatten(1).all(1)
        assert (same | mirrored).all()
        flipped += int(mirrored.sum())
    assert 16 < flipped < 48, "about half the images are flipped"
    assert torch.allclose(torch.cat([xb for xb, _ in dls.valid]), scaled), "validation: scaled, normalised only"

    # airbench's alternating flip: an image flipped in one pass is not in the next
    dls = DeviceDataLoaders.from_tensors(x, torch.zeros(64, dtype=torch.long), x, torch.zeros(64, dtype=torch.long),
                                         bs=16, seed=0, augment=Augment(flip="alternate"))
    passes = []
    for _ in range(2):
        state = torch.zeros(64, dtype=torch.bool)
        for xb, _ in dls.train:
            idx = dls.train.batch_idx
            state[idx] = (xb != x[idx].float() / 255).flatten(1).any(1)
        passes.append(state)
    assert passes[0].any() and torch.equal(passes[0], ~passes[1])

    # translation: each image is a crop of its reflect-padded self at an offset within +-pad
    imgs = torch.randn(5, 3, 6, 7, generator=g)
    out = translate(imgs, 2, torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(imgs, (2, 2, 2, 2), mode="reflect")
    for i in range(5):
        crops = [padded[i, :, dy:dy + 6, dx:dx + 7] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], c) for c in crops)
    assert not torch.equal(out, imgs)


def test_a_fastai_learner_trains_predicts_and_exports_on_it(tmp_path):
    learn = make_learner(task="image", path=tmp_path)
    learn.dls = _dls("image", augment=Augment(flip=True, translate=2), seed=0)
    before = params_of(learn)
    learn.fit_one_cycle(2, 1e-2)
    assert not torch.equal(before, params_of(learn))
    loss, acc = learn.validate()
    preds, targs = learn.get_preds()
    assert preds.shape == (128, 4) and torch.equal(targs, learn.dls.valid.dataset.y)
    learn.export(tmp_path / "export.pkl")
    inference = load_learner(tmp_path / "export.pkl")
    assert len(inference.dls.train.dataset) == 0, "export keeps no data"
    pickle.loads(pickle.dumps(learn.dls))


def test_a_run_resumed_mid_way_continues_identically(tmp_path):
    from effilab.data import InfoBatch

    class SaveAt(Callback):
        def after_epoch(self):
            if self.epoch == 1:
                self.learn.save_checkpoint("mid")

    def learner(cbs, model_seed=0):
        learn = make_learner(cbs, task="image", path=tmp_path, model_seed=model_seed)
        learn.dls = _dls("image", augment=Augment(flip="alternate", translate=2), seed=0)  # shuffled
        return learn

    full = learner([InfoBatch(0.5, delta=0.75, seed=0), SaveAt()])
    full.fit_one_cycle(4, 1e-2)
    resumed = learner([InfoBatch(0.5, delta=0.75, seed=0)], model_seed=1)
    start = resumed.load_checkpoint("mid")
    resumed.dls.train.set_epoch(start)  # the loader's shuffle and augmentation draws of that epoch
    resumed.fit_one_cycle(4, 1e-2, start_epoch=start)
    assert torch.allclose(params_of(full), params_of(resumed), atol=1e-6), "resumed run diverged"


class PlanLog(Callback):
    """The plan each epoch trains on (after the technique planned it) and the indices of every batch."""

    order = -4

    def __init__(self):
        self.plans, self.batches = [], []

    def before_train(self):
        plan = getattr(next((c for c in self.learn.cbs if hasattr(c, "plan")), None), "plan", None)
        if plan is not None:
            self.plans.append((plan.indices.cpu().clone(), plan.weights.cpu().clone()))

    def after_pred(self):
        if self.training and getattr(self.learn.dl, "batch_idx", None) is not None:
            self.batches.append(self.learn.dl.batch_idx.cpu().clone())


def _spy_steps(spy):
    """Windows of the spy that cover each training step and the loader's making of the next batch."""

    class Open(Callback):
        order = -1000

        def before_batch(self):
            if self.training:
                spy.per_batch.append([])
                spy.open = True

    class Close(Callback):
        order = -1000

        def after_train(self):
            spy.open = False

        def after_cancel_train(self):
            spy.open = False

    return [Open(), Close()]


@pytest.mark.parametrize("name", DATA)
def test_every_data_technique_runs_on_it_as_on_fastais_loader(name, monkeypatch):
    task = TECHNIQUES[name].task
    standard_log, device_log = PlanLog(), PlanLog()
    standard = make_learner([TECHNIQUES[name].make(), standard_log], task=task)
    standard.fit_one_cycle(2, 1e-2)

    spy = HostReadSpy(monkeypatch)
    learn = make_learner([TECHNIQUES[name].make(), device_log, *_spy_steps(spy)], task=task)
    learn.dls = _dls(task, shuffle=False)  # fastai's loader of make_learner keeps the order too
    learn.fit_one_cycle(2, 1e-2)

    assert len(spy.per_batch) >= 20 and not any(spy.per_batch), f"host reads in steps: {spy.per_batch[:2]}"
    assert len(device_log.plans) == len(standard_log.plans)
    for (i_std, w_std), (i_dev, w_dev) in zip(standard_log.plans, device_log.plans):
        assert torch.equal(i_std, i_dev) and torch.allclose(w_std, w_dev)
    if standard_log.batches:  # a plan's batches carry their indices on both loaders
        assert len(device_log.batches) == len(standard_log.batches)
        assert all(torch.equal(a, b) for a, b in zip(standard_log.batches, device_log.batches))
    assert torch.allclose(params_of(standard), params_of(learn), atol=1e-5), "not the same training"


@pytest.mark.parametrize("name", DATA)
def test_a_whole_fit_on_it_reads_nothing_from_the_device_between_batches(name, monkeypatch):
    """With `SyncFreeRecorder`, shuffling and augmentation: no host read (strictly counted, by any code) from
    the first step of an epoch to its end, the loader's making of each next batch included."""
    from effilab.system import SyncFreeRecorder

    from .test_no_sync import HostReadCounter

    counter = HostReadCounter(monkeypatch)

    class Open(Callback):
        order = -1000

        def before_batch(self):
            if self.training:
                counter.per_batch.append([])
                counter.open = True

    class Close(Callback):
        order = -1000

        def after_train(self):
            counter.open = False

    task = TECHNIQUES[name].task
    learn = make_learner([TECHNIQUES[name].make(), SyncFreeRecorder(every=4), Open(), Close()], task=task, n=256)
    augment = Augment(flip="alternate", translate=2, mean=(0.0,), std=(2.0,)) if task == "image" else None
    learn.dls = _dls(task, n=256, augment=augment, seed=0)
    with counter:
        learn.fit(2, 1e-2)
    assert len(counter.per_batch) >= 10
    bad = [(i, reads) for i, reads in enumerate(counter.per_batch) if reads]
    assert not bad, f"{name}: host reads between training batches: {bad[:3]}"


def test_plans_stay_on_the_device_with_augmentation_and_shuffling(monkeypatch):
    from effilab.data import InfoBatch

    calls = []
    original = torch.Tensor.tolist

    def tolist(t):
        calls.append(t.numel())
        return original(t)

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    cb, log = InfoBatch(0.5, delta=0.75, seed=0), PlanLog()
    learn = make_learner([cb, log], task="image")
    learn.dls = _dls("image", augment=Augment(flip="alternate", translate=2), seed=0)
    learn.fit(4, 1e-2)
    kept = [len(i) for i, _ in log.plans]
    assert min(kept) < 512 and not any(n in calls for n in kept), "a plan went to the host"
    assert len(log.batches) == sum(k // 32 for k in kept), "the batches carried their indices"


def test_a_data_set_too_large_is_refused_with_its_size_and_what_fits(monkeypatch):
    # data already in host memory is not copied for a CPU loader: the check is for the device they go to
    x, y = torch.zeros(1000, 1, 16, 16), torch.zeros(1000, dtype=torch.long)  # 1024 + 8 B per sample
    with pytest.raises(DatasetTooLarge) as info:
        DeviceDataLoaders.from_tensors(x, y, x[:200], y[:200], bs=10, device="meta", memory_budget=2**19)
    msg = str(info.value)
    # 200 validation samples take 206,400 B of the 524,288 B: 308 training samples of 1032 B fit
    assert "needs 1.2 MiB on meta" in msg and "train 1000 samples" in msg and "budget of 0.5 MiB" in msg
    assert "about 308 training samples fit" in msg and "subset=308" in msg
    monkeypatch.setattr(device_data, "free_memory", lambda device: 2**20)
    with pytest.raises(DatasetTooLarge, match=r"50% of the 1\.0 MiB free there"):
        DeviceDataLoaders.from_tensors(x, y, x[:200], y[:200], bs=10, device="meta")
    dls = DeviceDataLoaders.from_tensors(x[:300], y[:300], x[:10], y[:10], bs=10, device="meta")
    assert len(dls.train.dataset) == 300


@pytest.mark.parametrize("call, error, match", [
    (lambda x, y: DeviceDataLoaders.from_tensors(x, y, x, y, bs=True), TypeError, "bs must be a positive int"),
    (lambda x, y: DeviceDataLoaders.from_tensors(x, y, x, y, bs="32"), TypeError, "bs must be a positive int"),
    (lambda x, y: DeviceDataLoaders.from_tensors(x, y[:5], x, y), ValueError, "same first dimension"),
    (lambda x, y: DeviceDataLoaders.from_tensors(x.numpy(), y, x, y), TypeError, "must be tensors"),
    (lambda x, y: DeviceDataLoaders.from_tensors(x, y, x[:, :1], y), ValueError, "differ in shape"),
    (lambda x, y: DeviceDataLoaders.from_tensors(x, y, x, y, bs=64), ValueError, "no batch of 64"),
    (lambda x, y: DeviceDataLoaders.from_tensors(x, y, x, y, memory_budget=1.5), TypeError, "memory_budget"),
    (lambda x, y: DeviceDataLoaders.from_tensors(x, y, x, y, augment=Augment(flip=True)), ValueError,
     "works on images"),
    (lambda x, y: DeviceDataLoaders.from_tensors(x, y, x, y, augment={"flip": True}), TypeError, "Augment"),
    (lambda x, y: DeviceDataLoaders.from_task(x), TypeError, "TaskData"),
    (lambda x, y: Augment(flip="yes"), ValueError, "flip must be"),
    (lambda x, y: Augment(translate=True), TypeError, "translate must be an int"),
    (lambda x, y: Augment(mean=(float("nan"),), std=(1.0,)), TypeError, "finite number"),
    (lambda x, y: Augment(mean=(0.0,), std=(0.0,)), ValueError, "std must be > 0"),
    (lambda x, y: Augment(mean=(0.0,)), ValueError, "both mean and std"),
    (lambda x, y: DeviceDataLoaders.from_tensors(*make_images(40)[:2] * 2, bs=8, augment=Augment(translate=16)),
     ValueError, "larger than that"),
    (lambda x, y: DeviceDataLoader(x), TypeError, "DeviceTensors"),
    (lambda x, y: DeviceDataLoaders.from_tensors(x, y, x, y, bs=8, seed=1.0), TypeError, "seed must be an int"),
])
def test_bad_input_is_refused_clearly(call, error, match):
    x, y = make_arrays(40)
    with pytest.raises(error, match=match):
        call(x, y)


def test_from_a_task_of_effilab_datasets():
    from effilab.datasets import digits, pysource

    task = digits()
    dls = DeviceDataLoaders.from_task(task, bs=64, seed=0)
    xb, yb = dls.one_batch()
    assert xb.shape == (64, 1, 8, 8) and torch.equal(dls.train.dataset.x, task.train.x)
    text = pysource(seq_len=16, max_bytes=20_000)
    dls = DeviceDataLoaders.from_task(text, bs=8)
    xb, yb = dls.one_batch()  # windows stacked once into tensors
    assert xb.shape == (8, 16) and torch.equal(xb[:, 1:], yb[:, :-1])


def test_the_device_tensors_move_with_the_loaders():
    dls = _dls(bs=16)
    dls.to("meta")  # a device with no memory to check: the tensors go where the loaders go
    assert dls.train.dataset.device.type == "meta" and dls.valid.dataset.device.type == "meta"
    assert isinstance(dls.train.dataset, DeviceTensors)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_cuda_sync_while_batches_are_made_and_trained():
    from effilab.data import InfoBatch

    class SyncError(Callback):
        order = -1000

        def before_batch(self):
            if self.training and self.epoch > 0:
                torch.cuda.set_sync_debug_mode("error")

        def after_train(self):
            torch.cuda.set_sync_debug_mode("default")

    dls = _dls("image", device="cuda", augment=Augment(flip="alternate", translate=2, mean=(0.0,), std=(1.0,)),
               seed=0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        batches = [b for _ in range(2) for b in dls.train]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    xb = batches[-1][0]
    assert len(batches) == 32 and xb.is_cuda and xb.shape == (32, 1, 16, 16)
    cb = InfoBatch(0.5, seed=0)
    learn = make_learner([cb, SyncError()], task="image")
    learn.dls = dls
    learn.model.cuda()
    learn.fit(3, 1e-2)
    assert learn.telemetry.records("infobatch", "epoch")
