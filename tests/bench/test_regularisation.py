"""MixUp, CutMix and label smoothing as recipe components, alone and with the data techniques."""

from __future__ import annotations

import pytest
import torch
from fastai.callback.mixup import CutMix, MixUp
from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat
from fastai.optimizer import SGD
from torch import nn

from effilab.bench import recipes as R
from effilab.bench.regularisation import LabelSmoothing

from ..conftest import make_arrays, params_of


def _ctx():
    return R.RunContext(task=None, seed=0, epochs=2, bs=32, lr=1e-2, n_train=512)


def _image_learner(cbs, n=512, bs=32):
    """Like conftest's learner, with 1x3x4 "images" (CutMix cuts boxes) and plain SGD (no weight decay)."""
    from fastai.callback.progress import ProgressCallback
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.learner import Learner

    from effilab.datasets import ArrayDataset

    x, y = make_arrays(n + n // 4)
    x = x.view(-1, 1, 3, 4)
    dls = DataLoaders(DataLoader(ArrayDataset(x[:n], y[:n]), bs=bs, drop_last=True),
                      DataLoader(ArrayDataset(x[n:], y[n:]), bs=2 * bs), device="cpu")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(12, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=SGD, cbs=list(cbs))
    learn.remove_cb(ProgressCallback)
    learn.logger = lambda *a, **k: None
    return learn


def test_components_build_fastais_callbacks():
    mix, cut, ls = R.parse_recipe("mixup(alpha=0.2)+cutmix+label_smoothing(eps=0.2)").make_callbacks(_ctx())
    assert type(mix) is MixUp and mix.distrib.concentration1.item() == pytest.approx(0.2)
    assert type(cut) is CutMix and cut.distrib.concentration1.item() == pytest.approx(1.0)
    assert type(ls) is LabelSmoothing and ls.eps == 0.2
    ctx = _ctx()
    R.parse_recipe("label-smoothing").make_callbacks(ctx)
    assert ctx.notes["label_smoothing"] == {"eps": 0.1}
    for text, message in (("mixup(alpha=0)", "alpha must be > 0"), ("cutmix(alpha=-1)", "alpha must be > 0"),
                          ("label_smoothing(eps=1.0)", r"eps must be in \[0, 1\)"),
                          ("mixup(eps=0.1)", "does not accept 'eps'")):
        with pytest.raises(R.RecipeError, match=message):
            R.parse_recipe(text)


def test_label_smoothing_trains_with_the_smoothed_loss_and_gives_the_loss_back():
    seen = []
    (ls,) = R.parse_recipe("label_smoothing(eps=0.3)").make_callbacks(_ctx())
    learn = _image_learner([ls])
    original = learn.loss_func
    learn.add_cb(type("Spy", (LabelSmoothing,), {"order": 0, "before_fit": lambda self: seen.append(
        self.learn.loss_func), "after_fit": lambda self: None})())
    learn.fit(1, 1e-2)
    assert isinstance(seen[0], LabelSmoothingCrossEntropyFlat) and seen[0].func.eps == 0.3
    assert learn.loss_func is original


WEIGHTED = ["infobatch(ratio=0.5, delta=0.75)", "importance_sampling", "static_prune(fraction=0.5)",
            "selective_backprop(stale=True)"]


@pytest.mark.parametrize("regulariser", ["mixup", "cutmix", "label_smoothing"])
@pytest.mark.parametrize("technique", [*WEIGHTED, "selective_backprop"])
def test_composes_with_the_data_techniques(technique, regulariser):
    cbs = R.parse_recipe(f"{technique}+{regulariser}").make_callbacks(_ctx())
    learn = _image_learner(cbs)
    loss_func, before = learn.loss_func, params_of(learn)
    learn.fit(3, 5e-2)
    losses = [v[0] for v in learn.recorder.values]
    assert all(torch.isfinite(torch.tensor(v)) for v in losses) and not torch.equal(before, params_of(learn))
    assert learn.loss_func is loss_func
    tel = learn.telemetry
    source = next(s for s in tel.sources if tel.records(s, "samples"))
    acted = [r["forwarded"] < 512 or r.get("backpropagated", 512) < 512 for r in tel.records(source, "samples")]
    acted += [r.get("max_weight", 1) > 1 for r in tel.records(source, "epoch")]  # importance sampling
    assert any(acted), "the technique did not act"


@pytest.mark.parametrize("regulariser", ["mixup", "cutmix", "label_smoothing"])
@pytest.mark.parametrize("technique", WEIGHTED)
def test_the_techniques_weights_reach_the_loss(technique, regulariser):
    """Weights of zero (patched in) leave every parameter where it was: the regularised loss is
    the weighted one, not a bypass."""
    cbs = R.parse_recipe(f"{technique}+{regulariser}").make_callbacks(_ctx())
    cbs[0].weigh = lambda losses, pred=None, *yb: torch.zeros_like(losses)
    learn = _image_learner(cbs)
    before = params_of(learn)
    learn.fit(1, 5e-2)
    assert torch.equal(before, params_of(learn))
