"""Data sampling cores on tensors: importance sampling is unbiased, Selective Backprop selects by
percentile, static pruning keeps the hardest."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from effilab.core.sampling import (
    LossHistory,
    el2n,
    hardest,
    importance_plan,
    importance_probabilities,
    percentile_ranks,
    select_exact,
    select_fixed,
    stale_selection_plan,
    static_plan,
)


def _per_sample_grads(n=200, dim=5, seed=0):
    """A fixed tiny linear model: per-sample gradients (the estimators are linear in them) and losses."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, dim, generator=g), torch.randint(0, 3, (n,), generator=g)
    model = torch.nn.Linear(dim, 3)
    with torch.no_grad():
        model.weight.copy_(torch.randn(3, dim, generator=g))
    grads = []
    for i in range(n):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    with torch.no_grad():
        losses = F.cross_entropy(model(x), y, reduction="none")
    return torch.stack(grads), losses


def test_importance_weights_make_the_expected_gradient_the_full_data_gradient():
    grads, losses = _per_sample_grads()
    n = len(losses)
    full = grads.mean(0)
    p = importance_probabilities(losses, 0.2)
    assert torch.all(p >= 0.2 / n - 1e-9) and p.sum() == pytest.approx(1.0, abs=1e-5)
    # Exactly, over the sampling distribution: sum_i p_i * w_i * g_i.
    plan = importance_plan(losses, 0, seed=1, uniform=0.2)
    torch.testing.assert_close((p[:, None] * plan.weights[:, None] * grads).sum(0), full, rtol=1e-4, atol=1e-6)
    # Monte Carlo over real plans: the weighted mean gradient of the drawn samples.
    weighted, unweighted = torch.zeros_like(full), torch.zeros_like(full)
    plans = 300
    counts = torch.zeros(n)
    for epoch in range(plans):
        plan = importance_plan(losses, epoch, seed=1, uniform=0.2)
        idx = plan.indices
        assert idx.numel() == n
        weighted += (plan.weights[idx, None] * grads[idx]).mean(0)
        unweighted += grads[idx].mean(0)
        counts += torch.bincount(idx, minlength=n)
    rel = ((weighted / plans - full).norm() / full.norm()).item()
    rel_unweighted = ((unweighted / plans - full).norm() / full.norm()).item()
    assert rel < 0.05, rel
    assert rel_unweighted > 4 * rel and rel_unweighted > 0.15, (rel, rel_unweighted)  # the weights matter
    # The draws follow p (within a few standard errors over the whole table).
    freq = counts / counts.sum()
    assert ((freq - p).abs() / (p * (1 - p) / counts.sum()).sqrt()).max() < 5


def test_uniform_until_scores_exist_and_plan_counts():
    scores = torch.rand(100, generator=torch.Generator().manual_seed(0))
    first = importance_plan(scores, 0, seed=0, uniform=0.3, scored=False)
    assert sorted(first.indices.tolist()) == list(range(100)) and torch.all(first.weights == 1)
    half = importance_plan(scores, 0, seed=0, uniform=0.3, draws=0.5, scored=False)
    assert half.indices.unique().numel() == 50 and torch.all(half.weights == 1)
    plan = importance_plan(scores, 3, seed=0, uniform=0.3, draws=0.5)
    s = plan.summary()
    assert len(plan) == 50 and s["kept"] == plan.indices.unique().numel() and s["kept"] + s["pruned"] == 100
    assert s["max_weight"] <= 1 / 0.3 + 1e-5 and 0 < s["ess"] <= 1 and s["prob_spread"] > 1
    # Same (scores, seed, epoch): same plan; another epoch: another draw.
    assert torch.equal(plan.indices, importance_plan(scores, 3, 0, 0.3, 0.5).indices)
    assert not torch.equal(plan.indices, importance_plan(scores, 4, 0, 0.3, 0.5).indices)
    # Equal scores: uniform probabilities, weights 1 (up to rounding).
    torch.testing.assert_close(importance_plan(torch.ones(7), 0, 0, 0.3).weights, torch.ones(7))


def test_percentiles_against_the_history_ring():
    hist = LossHistory(size=4)
    assert torch.all(hist.percentiles(torch.tensor([0.1, 5.0])) == 1)  # empty: select everything
    hist.push(torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(hist.percentiles(torch.tensor([0.5, 2.0, 9.0])), torch.tensor([0.0, 2 / 3, 1.0]))
    hist.push(torch.tensor([4.0, 5.0, float("nan")]))  # wraps around: 5, nan->0 replace 1, 2
    assert (hist.pos, hist.filled) == (2, 4)
    assert sorted(hist.values.tolist()) == [0.0, 3.0, 4.0, 5.0]
    hist.push(torch.arange(10.0))  # more than the ring holds: the last 4
    assert sorted(hist.values.tolist()) == [6.0, 7.0, 8.0, 9.0]
    torch.testing.assert_close(percentile_ranks(torch.tensor([3.0, 1.0, 2.0, 2.0])), torch.tensor([1, .25, .75, .75]))


@pytest.mark.parametrize("beta", [1.0, 2.0, 0.5])
def test_exact_selection_matches_the_formula_and_is_never_empty(beta):
    gen = torch.Generator().manual_seed(0)
    data = torch.Generator().manual_seed(1)
    hist = LossHistory(size=512)
    hist.push(torch.rand(512, generator=data) ** 2)
    kept, expected, batches = 0, 0.0, 400
    for _ in range(batches):
        losses = torch.rand(32, generator=data) ** 2  # like the history: percentiles ~ uniform
        probs = hist.percentiles(losses) ** beta
        sel = select_exact(losses, probs, gen)
        assert sel.numel() >= 1 and losses.argmax() in sel
        assert sel.unique().numel() == sel.numel()
        kept += sel.numel()
        expected += probs.sum().item() + (1 - probs[losses.argmax()]).item()
    # Against the formula, batch by batch (sd of the total ~ sqrt(sum p(1-p)) < sqrt(400 * 32 / 4) = 57).
    assert abs(kept - expected) < 4 * 57
    # ... and against the closed form for uniform percentiles: 1/(1+beta).
    assert kept / (batches * 32) == pytest.approx(1 / (1 + beta), abs=0.04)


def test_exact_selection_never_empty_even_with_tiny_probabilities():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        losses = torch.rand(8, generator=gen)
        sel = select_exact(losses, torch.zeros(8), gen)
        assert sel.tolist() == [losses.argmax().item()]


def test_fixed_selection_has_the_size_and_prefers_high_losses():
    gen = torch.Generator().manual_seed(0)
    probs = percentile_ranks(torch.arange(32.0)) ** 2
    hits = torch.zeros(32)
    for _ in range(300):
        sel = select_fixed(probs, 11, gen)
        assert sel.numel() == 11 and sel.unique().numel() == 11
        hits[sel] += 1
    assert hits[24:].sum() > 3 * hits[:8].sum()


def test_stale_plan_keeps_by_percentile():
    scores = torch.rand(2000, generator=torch.Generator().manual_seed(0))
    plan = stale_selection_plan(scores, 1.0, epoch=0, seed=0)
    kept = torch.zeros(2000, dtype=torch.bool)
    kept[plan.indices] = True
    assert plan.indices.unique().numel() == len(plan) and kept[scores.argmax()]
    assert len(plan) / 2000 == pytest.approx(0.5, abs=0.04)
    top, bottom = kept[scores > 0.75].float().mean(), kept[scores < 0.25].float().mean()
    assert top == pytest.approx(0.875, abs=0.06) and bottom == pytest.approx(0.125, abs=0.06)
    assert torch.all(plan.weights == 1)


def test_hardest_and_static_plan():
    scores = torch.tensor([0.3, 0.9, 0.1, 0.9, 0.5, 0.0, 0.7, 0.2, 0.6, 0.4])
    keep = hardest(scores, 0.3)
    assert keep.tolist() == [1, 3, 6, 8, 4, 9, 0]
    plan = static_plan(keep, scores, epoch=2, seed=5)
    assert sorted(plan.indices.tolist()) == sorted(keep.tolist())
    assert plan.summary()["kept"] == 7 and plan.summary()["threshold"] == pytest.approx(0.3)
    assert not torch.equal(plan.indices, static_plan(keep, scores, epoch=3, seed=5).indices)
    assert hardest(scores, 0.0).numel() == 10


def test_el2n_is_the_distance_to_the_one_hot_label():
    pred = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    y = torch.tensor([0, 2])
    got = el2n(pred, y)
    p = pred.softmax(-1)
    assert got[0] < 1e-3
    assert got[1] == pytest.approx(((p[1] - torch.tensor([0.0, 0.0, 1.0])) ** 2).sum().sqrt().item())
    with pytest.raises(ValueError, match="score='loss'"):
        el2n(torch.randn(4), torch.randn(4))
