"""Dynamic sparse training: ERK densities, drop/regrow (RigL by gradient, SET at random), masked optimizer
state, the fastai callback's telemetry and its bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
from fastai.optimizer import Adam as FastaiAdam
from torch import nn

from effilab.callback import telemetry_of
from effilab.core.sparse import DynamicSparsity, cosine_drop_fraction, erk_densities, mask_optimizer_state
from effilab.model import SET, RigL

from ..conftest import make_learner
from ..spies import HostReadSpy


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))


# ----------------------------------------------------------------------------------------- core


def test_erk_densities_keep_the_overall_density_and_favour_small_layers():
    shapes = [(300, 784), (100, 300), (10, 100)]
    d = erk_densities(shapes, 0.1)
    numels = [math.prod(s) for s in shapes]
    assert sum(x * n for x, n in zip(d, numels)) / sum(numels) == pytest.approx(0.1)
    assert d[0] < d[1] < d[2] <= 1.0
    # The scale is common: density / (sum of dims / product of dims) is one eps for the sparse layers.
    eps = [x / (sum(s) / math.prod(s)) for x, s in zip(d, shapes) if x < 1]
    assert max(eps) == pytest.approx(min(eps))


def test_erk_makes_a_layer_dense_where_its_density_would_exceed_one():
    shapes = [(512, 512), (4, 512), (2, 4)]  # the tiny last layer would get eps * 6 / 8 > 1
    d = erk_densities(shapes, 0.01)
    assert d[2] == 1.0 and all(x < 1 for x in d[:2])
    numels = [math.prod(s) for s in shapes]
    assert sum(x * n for x, n in zip(d, numels)) / sum(numels) == pytest.approx(0.01)


def test_cosine_drop_fraction():
    assert cosine_drop_fraction(0.0, 0.3, 0.75) == pytest.approx(0.3)
    assert cosine_drop_fraction(0.375, 0.3, 0.75) == pytest.approx(0.15)
    assert cosine_drop_fraction(0.75, 0.3, 0.75) == 0.0 and cosine_drop_fraction(0.9, 0.3, 0.75) == 0.0


def test_masks_hold_the_erk_counts_and_zero_the_weights():
    model = _mlp()
    sp = DynamicSparsity(model, density=0.2, seed=0)
    expected = erk_densities([tuple(p.shape) for p in sp.params], 0.2)
    for p, m, k, n, d in zip(sp.params, sp.masks, sp.n_active, sp.numels, expected):
        assert m.dtype == torch.bool and m.shape == p.shape and int(m.sum()) == k == round(d * n)
        assert torch.all(p[~m] == 0) and torch.all(p[m] != 0)
    assert sp.overall_density == pytest.approx(0.2, abs=1e-3)


def test_rigl_drops_the_smallest_and_regrows_the_largest_gradients():
    model = nn.Sequential(nn.Linear(10, 10))
    sp = DynamicSparsity(model, density=0.5, distribution="uniform", method="rigl", seed=0)
    w, old = model[0].weight, sp.masks[0].clone()
    with torch.no_grad():
        w.copy_(torch.arange(1, 101, dtype=torch.float).view(10, 10) * old)  # magnitudes all distinct
    w.grad = torch.rand(10, 10, generator=torch.Generator().manual_seed(1))
    values = w.detach().clone()
    churn = sp.update(0.2)
    new = sp.masks[0]
    k = 10  # 0.2 of the 50 active
    kept = old.clone().flatten()
    kept[torch.topk(torch.where(old, values, float("inf")).flatten(), k, largest=False).indices] = False
    expected = kept.clone()
    expected[torch.topk(torch.where(kept, -1.0, w.grad.flatten()), k).indices] = True
    assert torch.equal(new.flatten(), expected) and int(new.sum()) == 50
    assert float(churn[0]) == pytest.approx(int((new & ~old).sum()) / 50) and float(churn[0]) > 0
    assert torch.all(w.detach()[~new] == 0) and torch.all(w.detach()[new & ~old] == 0)  # regrown start at 0


def test_rigl_keeps_the_mask_of_a_layer_without_gradient():
    model = _mlp()
    sp = DynamicSparsity(model, density=0.3, method="rigl", seed=0)
    model(torch.randn(8, 20)).square().mean().backward()
    model[0].weight.grad = None  # a frozen layer, or one in a dropped block: nothing to regrow by
    before = [m.clone() for m in sp.masks]
    churn = sp.update(0.3)
    assert sp.skipped == ["0"]
    assert torch.equal(sp.masks[0], before[0]) and float(churn[0]) == 0
    assert not torch.equal(sp.masks[1], before[1]) and float(churn[1]) > 0
    assert [int(m.sum()) for m in sp.masks] == sp.n_active
    sp.update(0.3)  # every layer has its gradient again
    model[0].weight.grad = torch.rand_like(model[0].weight)
    sp.update(0.3)
    assert sp.skipped == []


def test_rigl_beside_layer_freezing_skips_the_frozen_layers_and_says_so():
    from effilab.model import LayerFreezing

    cb = RigL(density=0.3, delta_t=2, seed=0, end_frac=1.0)
    learn = make_learner([cb, LayerFreezing(start=0.2, end=0.5)], n=256, batchnorm=False)
    learn.fit(2, 1e-2)
    updates = telemetry_of(learn).records("sparse", "update")
    skipped = [u["skipped"] for u in updates]
    assert skipped[0] == [] and ["0"] in skipped, skipped  # the first layer froze, RigL left it alone
    for u in updates:
        assert all(c == 0 for name, c in zip(["0", "2"], u["churn"]) if name in u["skipped"])
    for p, m, k in zip(cb.sparsity.params, cb.sparsity.masks, cb.sparsity.n_active):
        assert torch.all(p.detach()[~m] == 0) and int(m.sum()) == k


def test_set_regrows_at_random_from_its_own_generator():
    def masks_after(seed):
        model = _mlp()
        sp = DynamicSparsity(model, density=0.3, method="set", seed=seed)
        torch.manual_seed(123)
        state = torch.get_rng_state()
        sp.update(0.3)
        assert torch.equal(state, torch.get_rng_state()), "SET drew from the global RNG"
        return [m.clone() for m in sp.masks], sp

    a, sp = masks_after(0)
    b, _ = masks_after(0)
    c, _ = masks_after(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert [int(m.sum()) for m in a] == sp.n_active


@pytest.mark.parametrize("which", ["torch_adam", "fastai_adam", "torch_sgd_momentum"])
def test_every_optimizer_state_is_masked(which):
    model = _mlp()
    sp = DynamicSparsity(model, density=0.3, method="rigl", delta_t=1, seed=0)
    if which == "torch_adam":
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        state_of = opt.state
    elif which == "torch_sgd_momentum":
        opt = torch.optim.SGD(model.parameters(), 1e-2, momentum=0.9)
        state_of = opt.state
    else:
        opt = FastaiAdam(list(model.parameters()), lr=1e-2)
        state_of = opt.state
    x = torch.randn(32, 20)
    for step in range(3):
        model(x).square().mean().backward()
        # Dense optimizer state first, as if an optimizer had stepped without masked gradients.
        if step == 0:
            opt.step()
            for st in state_of.values():
                for v in st.values():
                    if torch.is_tensor(v) and v.dim() > 0:
                        v.add_(1.0)
        old = [m.clone() for m in sp.masks]
        churn = sp.before_step(progress=0.0, optimizer_state=state_of)
        assert churn is not None
        opt.step()
        opt.zero_grad()
        sp.after_step()
        keys = 0
        for p, m, o in zip(sp.params, sp.masks, old):
            for key, v in state_of[p].items():
                if torch.is_tensor(v) and v.shape == p.shape:
                    keys += 1
                    assert torch.all(v[~m] == 0), f"{key}: state of masked weights is not zero"
                    if step == 0:
                        # Regrown entries had state 1 + something before the update; their state restarted at 0
                        # and only this step's (masked) gradient moved it.
                        assert torch.all(v[m & ~o].abs() < 1), key
            assert torch.all(p.detach()[~m] == 0)
        assert keys >= len(sp.params)


def test_mask_optimizer_state_leaves_scalars_alone():
    p = nn.Parameter(torch.ones(2, 2))
    state = {p: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 2)}}
    mask_optimizer_state(state, [p], [torch.tensor([[True, False], [False, True]])])
    assert state[p]["step"] == 3 and state[p]["exp_avg"].sum() == 2


def test_state_dict_round_trip():
    model = _mlp()
    sp = DynamicSparsity(model, density=0.3, method="set", seed=0)
    sp.step = 7
    sp.update(0.3)
    other = DynamicSparsity(_mlp(), density=0.3, method="set", seed=5, apply=False)
    other.load_state_dict(sp.state_dict())
    assert other.step == 7 and other.seed == 0 and other.n_updates == 1
    assert all(torch.equal(a, b) for a, b in zip(sp.masks, other.masks))


# ----------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("density", [0, 0.0, -0.1, 1.5, float("nan")])
def test_density_outside_0_1_is_refused(density):
    # NaN is refused by the callbacks' annotation check (`effilab.callback.check_annotated_args`) first
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]|density must be float, got nan"):
        RigL(density=density)
    with pytest.raises(ValueError):
        DynamicSparsity(_mlp(), density=density)


@pytest.mark.parametrize("density", [True, "0.1", None])
def test_density_of_the_wrong_type_is_refused(density):
    with pytest.raises(TypeError, match="density must be (a )?float"):
        SET(density=density)
    with pytest.raises(TypeError, match="density must be a float"):
        DynamicSparsity(_mlp(), density=density)


@pytest.mark.parametrize("kwargs, match", [
    (dict(delta_t=0), "delta_t"), (dict(delta_t=2.5), "delta_t"), (dict(alpha=1.0), "alpha"),
    (dict(end_frac=0.0), "end_frac"), (dict(distribution="normal"), "distribution"), (dict(seed="1"), "seed"),
])
def test_other_bad_arguments_are_refused(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        RigL(**kwargs)


def test_a_model_without_linear_or_conv_layers_is_refused():
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv"):
        DynamicSparsity(nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4)), density=0.5)


# ----------------------------------------------------------------------------------------- fastai


@pytest.mark.parametrize("cls", [RigL, SET])
def test_fit_keeps_weights_sparse_and_updates_masks(cls):
    cb = cls(density=0.3, delta_t=2, seed=0)
    learn = make_learner([cb], n=256, batchnorm=False)
    learn.fit_one_cycle(1, 1e-2)  # creates the masks
    first = [m.clone() for m in cb.sparsity.masks]
    learn.fit_one_cycle(3, 1e-2)
    sp = cb.sparsity
    for p, m, k in zip(sp.params, sp.masks, sp.n_active):
        assert torch.all(p.detach()[~m] == 0) and int(m.sum()) == k
    assert any(not torch.equal(a, b) for a, b in zip(first, sp.masks)), "the masks never changed"
    tele = telemetry_of(learn)
    meta = tele.meta("sparse")
    assert meta["method"] == cls.method and meta["layers"] == ["0", "2"]
    assert meta["flops_fraction"] == pytest.approx(
        sum(f * d for f, d in zip(meta["dense_flops"], meta["densities"])) / sum(meta["dense_flops"]))
    assert meta["dense_flops"] == [2 * 12 * 32, 2 * 32 * 4]  # per sample, forward
    updates = tele.records("sparse", "update")
    fits = [u["fit"] for u in updates]
    assert fits == sorted(fits) and set(fits) == {0, 1}
    # 8 steps per epoch, an update every 2nd step while progress < 0.75: steps 2, 4, 6 of the 1-epoch fit,
    # steps 2, 4, ..., 18 of the 24-step one.
    assert fits.count(0) == 3 and fits.count(1) == 9
    assert [u["step"] for u in updates if u["fit"] == 1] == list(range(2, 19, 2))
    fractions = [u["fraction"] for u in updates if u["fit"] == 1]
    assert fractions == sorted(fractions, reverse=True) and fractions[0] < 0.3
    assert all(0 <= c <= 1 for u in updates for c in u["churn"]) and max(max(u["churn"]) for u in updates) > 0
    epochs = tele.records("sparse", "epoch")
    assert len(epochs) == 4 and epochs[-1]["densities"] == pytest.approx(sp.densities)
    first_layer = tele.records("sparse", "first_layer")[-1]
    assert first_layer["shape"] == [12] and sum(first_layer["in_degree"]) == sp.n_active[0]
    assert torch.equal(cb.first_layer_mask().sum(0), torch.tensor(first_layer["in_degree"]))
    assert len(tele.records("sparse", "timing")) == 4


def test_rigl_on_a_cnn_and_a_transformer():
    for task in ("image", "sequence"):
        cb = RigL(density=0.4, delta_t=3, seed=0)
        learn = make_learner([cb], n=128, task=task)
        learn.fit(1, 1e-2)
        assert telemetry_of(learn).records("sparse", "update"), task
        if task == "image":  # conv FLOPs: 2 x outputs x (c_in x kernel taps) per sample
            assert telemetry_of(learn).meta("sparse")["dense_flops"] == [2 * 8 * 16 * 16 * 9, 2 * 16 * 8 * 8 * 72,
                                                                           2 * 16 * 4]
        for p, m in zip(cb.sparsity.params, cb.sparsity.masks):
            assert torch.all(p.detach()[~m] == 0), task


def test_no_host_read_per_step(monkeypatch):
    spy = HostReadSpy(monkeypatch)
    learn = make_learner([RigL(density=0.3, delta_t=2, seed=0), *spy.callbacks()], n=128)
    learn.fit(2, 1e-2)
    assert len(spy.per_batch) == 8 and all(not reads for reads in spy.per_batch), spy.per_batch


def test_inactive_in_lr_find():
    cb = RigL(density=0.3, delta_t=1, seed=0)
    learn = make_learner([cb], n=128)
    learn.lr_find(num_it=5, show_plot=False)
    assert cb.sparsity is None and not telemetry_of(learn).records("sparse", "update")


def test_an_update_step_interrupted_before_the_step_leaves_the_weights_alone():
    from fastai.callback.core import Callback, CancelFitException

    class StopAtUpdate(Callback):
        order = 1000  # after the sparse callback's before_step (the mask update)

        def before_batch(self):
            self.raw = torch.cat([p.detach().flatten().clone() for p in self.learn.model.parameters()])

        def before_step(self):
            if cb.sparsity.step == 4:  # the 4th step (delta_t=4) just updated the masks
                self.masks = [m.clone() for m in cb.sparsity.masks]
                raise CancelFitException()

    cb = RigL(density=0.3, delta_t=4, seed=0)
    stop = StopAtUpdate()
    learn = make_learner([cb, stop], n=256)
    learn.fit(2, 1e-2)
    assert [u["step"] for u in telemetry_of(learn).records("sparse", "update")] == [4]  # reported at the fit's end
    now = torch.cat([p.detach().flatten() for p in learn.model.parameters()])
    assert torch.equal(now, stop.raw)
    learn.remove_cb(stop)
    learn.fit(1, 1e-2)  # the next fit masks the weights with the updated masks
    for p, m in zip(cb.sparsity.params, cb.sparsity.masks):
        assert torch.all(p.detach()[~m] == 0)
