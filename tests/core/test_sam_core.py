"""The plain-PyTorch SAM/LookSAM core: the perturbation, its exact undoing, the gradient it returns."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from effilab.core.sam import SharpnessAwareGradient, batchnorm_buffers


def _problem(seed=0, bn=False):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(5, 7), *([nn.BatchNorm1d(7)] if bn else []), nn.Tanh(), nn.Linear(7, 3))
    return model, x, y


def _loss(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def _grads_at(model, x, y, weights):
    """Gradient of the loss at `weights` (a list like model.parameters()), computed functionally."""
    names = [n for n, _ in model.named_parameters()]
    ws = [w.detach().clone().requires_grad_() for w in weights]
    loss = nn.functional.cross_entropy(torch.func.functional_call(model, dict(zip(names, ws)), (x,)), y)
    return torch.autograd.grad(loss, ws)


def test_gradient_is_the_gradient_at_the_perturbed_weights_and_weights_are_restored_exactly():
    model, x, y = _problem()
    params = list(model.parameters())
    original = [p.detach().clone() for p in params]
    _loss(model, x, y).backward()
    g = [p.grad.clone() for p in params]
    seen = []

    def closure():
        seen.append([p.detach().clone() for p in params])
        _loss(model, x, y).backward()

    sam = SharpnessAwareGradient(rho=0.1)
    sam.step(params, closure)
    assert len(seen) == 1
    perturbation = [s - o for s, o in zip(seen[0], original)]
    assert math.isclose(float(torch.cat([e.flatten() for e in perturbation]).norm()), 0.1, rel_tol=1e-5)
    gnorm = torch.cat([t.flatten() for t in g]).norm()
    for e, gi in zip(perturbation, g):  # along the gradient
        assert torch.allclose(e, 0.1 * gi / gnorm, atol=1e-6)
    for p, o in zip(params, original):
        assert torch.equal(p.detach(), o)  # bit-exact
    expected = _grads_at(model, x, y, [o + 0.1 * gi / gnorm for o, gi in zip(original, g)])
    for p, e in zip(params, expected):
        assert torch.allclose(p.grad, e, atol=1e-6)
    assert not all(torch.allclose(p.grad, gi) for p, gi in zip(params, g))  # it is not the plain gradient
    assert math.isclose(sam.take_stats()["ascent_norm_sum"], 0.1, rel_tol=1e-5)


def test_the_loss_scale_does_not_change_the_perturbation():
    """With a GradScaler both losses are multiplied by S: the result must be S times the unscaled one."""
    results = []
    for scale in (1.0, 1024.0):
        model, x, y = _problem()
        params = list(model.parameters())
        (scale * _loss(model, x, y)).backward()
        SharpnessAwareGradient(0.05).step(
            params, lambda scale=scale, model=model, x=x, y=y: (scale * _loss(model, x, y)).backward())
        results.append([p.grad / scale for p in params])
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-6)


def test_batchnorm_statistics_are_those_of_the_first_forward():
    model, x, y = _problem(bn=True)
    params = list(model.parameters())
    _loss(model, x, y).backward()
    after_first = [b.clone() for b in batchnorm_buffers(model)]
    assert len(after_first) == 3
    SharpnessAwareGradient(0.05).step(params, lambda: _loss(model, x, y).backward(), batchnorm_buffers(model))
    for b, a in zip(batchnorm_buffers(model), after_first):
        assert torch.equal(b, a)


def test_overflow_gives_a_non_finite_gradient_and_restores_the_weights():
    model, x, y = _problem()
    params = list(model.parameters())
    original = [p.detach().clone() for p in params]
    _loss(model, x, y).backward()
    params[0].grad[0, 0] = math.inf
    sam = SharpnessAwareGradient(0.05)
    sam.step(params, lambda: _loss(model, x, y).backward())
    assert not all(torch.isfinite(p.grad).all() for p in params)
    for p, o in zip(params, original):
        assert torch.equal(p.detach(), o)
    stats = sam.take_stats()
    assert stats == {"ascent_norm_sum": 0.0, "nonfinite_grads": 1}


def test_looksam_reuses_the_sharpness_direction_between_full_steps():
    model, x, y = _problem()
    params = list(model.parameters())
    sam = SharpnessAwareGradient(0.05, every=3, alpha=0.7)
    calls, stored = [], []
    for step in range(7):
        xs, ys = x[step % 2::2], y[step % 2::2]
        _loss(model, xs, ys).backward()
        plain = [p.grad.clone() for p in params]

        def closure(step=step, xs=xs, ys=ys):
            calls.append(step)
            _loss(model, xs, ys).backward()

        sam.step(params, closure)
        flat_g = torch.cat([t.flatten() for t in plain])
        gv = torch.cat([t.flatten() for t in sam.sharpness_grad])
        if step % 3 == 0:
            # g_v = g_s - proj_g(g_s): orthogonal to the plain gradient
            assert abs(float(gv @ flat_g)) < 1e-5 * float(gv.norm() * flat_g.norm()) + 1e-9
            sam_grad = torch.cat([p.grad.flatten() for p in params])
            assert torch.allclose(gv, sam_grad - (sam_grad @ flat_g) / flat_g.norm() ** 2 * flat_g, atol=1e-6)
            stored.append(gv.clone())
        else:
            assert torch.equal(gv, stored[-1])  # kept as is
            expected = flat_g + 0.7 * flat_g.norm() / gv.norm() * gv
            assert torch.allclose(torch.cat([p.grad.flatten() for p in params]), expected, atol=1e-6)
        with torch.no_grad():
            for p in params:
                p -= 0.1 * p.grad
                p.grad = None
    assert calls == [0, 3, 6]  # ceil(7 / 3) extra passes
    assert (sam.steps, sam.full_steps) == (7, 3)
    state = sam.state_dict()
    other = SharpnessAwareGradient(0.05, every=3, alpha=0.7)
    other.load_state_dict(state)
    assert other.steps == 7 and all(torch.equal(a, b) for a, b in zip(other.sharpness_grad, sam.sharpness_grad))


def test_looksam_keeps_its_direction_when_a_full_step_overflows():
    model, x, y = _problem()
    params = list(model.parameters())
    sam = SharpnessAwareGradient(0.05, every=2, alpha=0.5)
    for step in range(3):
        _loss(model, x, y).backward()
        if step == 2:
            before = [t.clone() for t in sam.sharpness_grad]
            params[1].grad[0] = math.nan
        sam.step(params, lambda: _loss(model, x, y).backward())
        for p in params:
            p.grad = None
    assert all(torch.equal(a, b) for a, b in zip(sam.sharpness_grad, before))


@pytest.mark.parametrize("kwargs, match", [
    ({"rho": 0.0}, "rho"), ({"rho": -0.1}, "rho"), ({"rho": math.nan}, "rho"),
    ({"every": 0}, "every"), ({"every": 1.5}, "every"), ({"alpha": -0.1}, "alpha"),
])
def test_bad_arguments_get_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SharpnessAwareGradient(**kwargs)
