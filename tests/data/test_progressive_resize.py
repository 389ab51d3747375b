"""ProgressiveResize: the sizes each training batch had, the planned curve, full size at the end, CutMix."""

from __future__ import annotations

import pytest
from fastai.callback.core import Callback
from fastai.callback.mixup import CutMix, MixUp

from effilab import ProgressiveResize, telemetry_of

from ..conftest import make_learner
from ..spies import HostReadSpy


class Shapes(Callback):
    """The input shape the model saw in each batch (after every `before_batch`) and its pct_train."""

    order = 50

    def before_fit(self):
        self.train_shapes, self.valid_shapes = [], []

    def before_batch(self):
        shape = tuple(self.learn.xb[0].shape)
        (self.train_shapes if self.training else self.valid_shapes).append((self.learn.pct_train, shape))


def _fit(cb, epochs=4, n=320, bs=32, extra=()):
    shapes = Shapes()
    learn = make_learner([cb, *extra, shapes], n=n, bs=bs, task="image")
    learn.fit(epochs, 1e-2)
    return learn, shapes


def test_resolution_ramps_up_ends_full_and_validation_is_full():
    learn, shapes = _fit(ProgressiveResize(start=0.5, finetune_frac=0.25, multiple=4))
    heights = [s[2] for _, s in shapes.train_shapes]
    assert heights[0] == 8 and heights == sorted(heights) and len(set(heights)) > 2
    assert all(s[2:] == (16, 16) for p, s in shapes.train_shapes if p >= 0.75)  # the fine-tuning part
    assert shapes.train_shapes[-1][1][2:] == (16, 16)  # ends at full resolution
    assert shapes.valid_shapes and all(s[2:] == (16, 16) for _, s in shapes.valid_shapes)


def test_planned_curve_in_telemetry_is_what_was_applied():
    # 4 epochs x 10 batches: every batch's pct_train is a point k/200 of the planned curve.
    learn, shapes = _fit(ProgressiveResize(start=0.5, finetune_frac=0.2, multiple=4), epochs=4, n=320)
    tel = telemetry_of(learn)
    planned = tel.meta("schedule")["planned"]["resolution"]
    assert len(planned["pct"]) == 201 and planned["value"][0] == 8 and planned["value"][-1] == 16
    for pct, shape in shapes.train_shapes:
        k = round(pct * 200)
        assert abs(planned["pct"][k] - pct) < 1e-9
        assert planned["value"][k] == shape[2], f"planned {planned['value'][k]} vs applied {shape[2]} at {pct}"
    actual = tel.records("schedule", "step")
    applied = {round(p * 200): s[2] for p, s in shapes.train_shapes}
    assert all(applied[round(r["pct"] * 200)] == r["resolution"] for r in actual)  # each record is a batch's
    assert len({r["resolution"] for r in actual}) == len(set(applied.values()))  # every change recorded


def test_a_shorter_fit_rescales_the_schedule():
    _, shapes = _fit(ProgressiveResize(start=0.5, finetune_frac=0.2, multiple=4), epochs=2)
    heights = [s[2] for _, s in shapes.train_shapes]
    assert heights[0] == 8 and heights[-1] == 16 and len(set(heights)) > 2


def test_pixels_forwarded_relative_to_full_resolution():
    learn, shapes = _fit(ProgressiveResize(start=0.5, finetune_frac=0.2, multiple=4))
    recs = telemetry_of(learn).records("progressive_resize", "epoch")
    assert [r["epoch"] for r in recs] == [0, 1, 2, 3]
    seen = sum(s[0] * s[2] * s[3] for _, s in shapes.train_shapes)
    assert sum(r["pixels_forwarded"] for r in recs) == seen == recs[-1]["pixels_forwarded_total"]
    assert sum(r["pixels_full"] for r in recs) == 32 * 10 * 4 * 16 * 16
    assert recs[0]["relative"] < recs[-1]["relative"] == 1.0


@pytest.mark.parametrize("mix", [CutMix, MixUp])
def test_composes_with_cutmix_and_mixup(mix):
    cb = ProgressiveResize(start=0.5, finetune_frac=0.2, multiple=4)
    assert cb.order < mix().order  # resizing first: the mix works on whatever size the batch has
    learn, shapes = _fit(cb, epochs=3, extra=[mix(1.0)])
    heights = [s[2] for _, s in shapes.train_shapes]
    assert heights[0] == 8 and heights[-1] == 16
    loss, _ = learn.validate()
    assert loss == loss  # finite, not NaN


def test_inactive_during_lr_find():
    cb, shapes = ProgressiveResize(), Shapes()
    learn = make_learner([cb, shapes], task="image")
    learn.lr_find(num_it=8, show_plot=False)
    assert shapes.train_shapes and all(s[2:] == (16, 16) for _, s in shapes.train_shapes)


def test_no_host_sync_in_training_batches(monkeypatch):
    spy = HostReadSpy(monkeypatch)
    learn = make_learner([ProgressiveResize(), *spy.callbacks()], task="image", n=128)
    learn.fit(2, 1e-2)
    assert len(spy.per_batch) == 8
    assert [r for batch in spy.per_batch for r in batch] == []


@pytest.mark.parametrize("kwargs", [{"start": 0.0}, {"start": 1.5}, {"finetune_frac": 1.0}, {"finetune_frac": -0.1},
                                    {"multiple": 0}, {"multiple": 2.5}, {"mode": "lanczos"}])
def test_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        ProgressiveResize(**kwargs)


def test_non_image_batches_get_a_clear_error():
    learn = make_learner([ProgressiveResize()])
    with pytest.raises(TypeError, match="image batches"):
        learn.fit(1, 1e-2)
