"""The plain-PyTorch budget pieces: input checks, spend accounting, FLOPs per step, schedules of p."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from effilab.core.budget import (
    UNITS,
    BudgetClock,
    LrSchedule,
    check_amount,
    check_unit,
    cooldown_budget,
    epochs_for_budget,
    linear_decay,
    rex,
    step_flops,
    wsd,
)


@pytest.mark.parametrize("amount", [0, -1, -0.5, float("nan"), float("inf"), -float("inf")])
def test_amount_must_be_positive_and_finite(amount):
    with pytest.raises(ValueError, match="positive finite"):
        check_amount(amount)


@pytest.mark.parametrize("amount", [True, "100", None, [10]])
def test_amount_must_be_a_number(amount):
    with pytest.raises(TypeError, match="must be a number"):
        check_amount(amount)


@pytest.mark.parametrize("unit", ["epochs", "Samples", "", None, 3])
def test_unknown_unit_names_the_known_ones(unit):
    with pytest.raises(ValueError, match="steps, samples, tokens, flops, seconds"):
        check_unit(unit)
    assert [check_unit(u) for u in UNITS] == list(UNITS)


def test_clock_charges_and_reports_progress():
    clock = BudgetClock(100, "samples")
    for _ in range(3):
        clock.charge(32)
    assert clock.spent == 96 and clock.steps == 3 and clock.progress == pytest.approx(0.96) and not clock.done
    clock.charge(32)
    assert clock.done and clock.progress == 1.0  # clipped


def test_seconds_clock_ends_within_half_a_step_and_excludes():
    t = [0.0]
    clock = BudgetClock(10.0, "seconds", clock=lambda: t[0])
    clock.mark()
    steps = 0
    while not clock.done:
        t[0] += 0.37
        clock.tick()
        steps += 1
        if steps % 10 == 0:  # "validation": not charged
            t[0] += 5.0
            assert clock.exclude() == pytest.approx(5.0)
    assert abs(clock.spent - 10.0) <= 0.5 * 0.37 + 1e-9
    assert steps == 27 and clock.excluded == pytest.approx(10.0)


def test_clock_state_round_trips():
    a = BudgetClock(50, "steps")
    a.charge(1)
    a.charge(1)
    b = BudgetClock(50, "steps")
    b.load_state_dict(a.state_dict())
    assert (b.spent, b.steps, b.progress) == (2, 2, 0.04)


def test_epochs_for_budget():
    assert epochs_for_budget(1000, "samples", n_samples=500, bs=32) == 2
    assert epochs_for_budget(1001, "samples", n_samples=500, bs=32) == 3
    assert epochs_for_budget(1000, "samples", n_samples=500, bs=32, drop_last=True) == 3  # 480 per epoch
    assert epochs_for_budget(1000, "samples", n_samples=500, bs=32, min_fraction=0.5) == 4
    assert epochs_for_budget(32, "steps", n_samples=512, bs=32, drop_last=True) == 2
    assert epochs_for_budget(4096, "tokens", n_samples=64, bs=8, tokens_per_sample=32) == 2
    with pytest.raises(ValueError, match="tokens_per_sample"):
        epochs_for_budget(4096, "tokens", n_samples=64, bs=8)
    with pytest.raises(ValueError, match="generous epoch count"):
        epochs_for_budget(1e9, "flops", n_samples=64, bs=8)
    with pytest.raises(ValueError, match="no batch"):
        epochs_for_budget(10, "samples", n_samples=8, bs=16, drop_last=True)
    with pytest.raises(ValueError, match="min_fraction"):
        epochs_for_budget(10, "samples", n_samples=8, bs=4, min_fraction=0)


def test_step_flops_counts_forward_and_backward_without_touching_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 4))
    bn = model[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    x = torch.randn(8, 12)
    rng = torch.get_rng_state()
    flops = step_flops(model, (x,))
    # forward 2*B*in*out per linear; backward: weight grads (both) + the input grad of the second only
    fwd = 2 * 8 * 12 * 32 + 2 * 8 * 32 * 4
    assert flops == fwd + fwd + 2 * 8 * 32 * 4
    assert torch.equal(rng, torch.get_rng_state())  # dropout drew nothing
    assert step_flops(model, (torch.randn(16, 12),)) == 2 * flops  # linear in the batch size
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert int(bn.num_batches_tracked) == stats[2]
    assert all(p.grad is None for p in model.parameters())


def test_step_flops_calls_no_hook_and_leaves_every_hook_in_place():
    from torch.nn.modules.module import register_module_forward_hook

    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4))
    seen = []
    handles = [model.register_forward_hook(lambda m, a, o: seen.append("model")),
               model[0].register_forward_pre_hook(lambda m, a: seen.append("pre")),
               model[2].register_full_backward_hook(lambda m, gi, go: seen.append("backward")),
               register_module_forward_hook(lambda m, a, o: seen.append("global"))]
    try:
        assert step_flops(model, (torch.randn(8, 12),)) > 0
        assert seen == []  # a user's forward counter (or fastai's ActivationStats) never sees the meta pass
        model(torch.randn(8, 12, requires_grad=True)).sum().backward()
        assert {"model", "pre", "backward", "global"} <= set(seen)  # still registered
    finally:
        for h in handles:
            h.remove()
    seen.clear()
    model(torch.randn(8, 12))
    assert seen == []  # the handles still remove them


def _paper_rex(t, T):
    """Chen, Wolfe & Kyrillidis 2022, eq. for REX: eta_t = eta_0 * (1 - t/T) / (1/2 + 1/2 * (1 - t/T))."""
    z = 1 - t / T
    return z / (0.5 + 0.5 * z)


def test_rex_is_the_paper_formula():
    T = 400
    for t in range(0, T + 1, 7):
        assert rex(t / T) == pytest.approx(_paper_rex(t, T), abs=1e-12)
    assert rex(0.0) == 1.0 and rex(1.0) == 0.0 and rex(0.5) == pytest.approx(2 / 3)
    # not the look-alikes in circulation (exp(-10p), (1-p)^(1/(1-p)))
    assert abs(rex(0.5) - math.exp(-5)) > 0.5 and abs(rex(0.5) - 0.5 ** 2) > 0.3


def test_linear_decay_and_wsd_shapes():
    assert [linear_decay(p) for p in (0, 0.25, 1)] == [1, 0.75, 0]
    assert wsd(0.5, decay=0.2) == 1.0 and wsd(0.8, decay=0.2) == 1.0 and wsd(1.0, decay=0.2) == 0.0
    assert wsd(0.9, decay=0.2, shape="linear") == pytest.approx(0.5)
    assert wsd(0.9, decay=0.2, shape="1-sqrt") == pytest.approx(1 - math.sqrt(0.5))
    assert wsd(0.85, 0.2, "1-sqrt") < wsd(0.85, 0.2, "linear")  # 1-sqrt cools faster at first


def test_lr_schedule_warmup_final_and_peak():
    s = LrSchedule("linear_decay", peak=0.1, warmup=0.2, final=0.1)
    assert s(0.0) == 0.0 and s(0.1) == pytest.approx(0.05) and s(0.2) == pytest.approx(0.1)
    assert s(0.6) == pytest.approx(0.1 * (0.1 + 0.9 * 0.5)) and s(1.0) == pytest.approx(0.01)
    assert s(1.5) == s(1.0) and s(-1) == 0.0  # clipped to [0, 1]
    w = LrSchedule("wsd", peak=2.0, warmup=0.1, decay=0.3, cooldown="linear")
    assert w(0.05) == pytest.approx(1.0) and w(0.5) == 2.0 and w(0.85) == pytest.approx(1.0) and w(1.0) == 0.0
    import numpy as np

    assert np.allclose(LrSchedule("rex", peak=np.array([1.0, 2.0]))(0.5), [2 / 3, 4 / 3])  # per group


@pytest.mark.parametrize("kwargs, match", [
    ({"shape": "step"}, "unknown schedule shape"),
    ({"shape": "wsd", "cooldown": "cosine"}, "unknown cooldown shape"),
    ({"shape": "wsd", "decay": 0.0}, "decay must be > 0"),
    ({"shape": "wsd", "warmup": 0.5, "decay": 0.6}, "exceed the budget"),
    ({"warmup": 1.0}, "fraction of the budget"),
    ({"final": -0.1}, "fraction of the budget"),
])
def test_lr_schedule_rejects_bad_input(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LrSchedule(**kwargs)


def test_cooldown_budget_starts_the_cooldown_now():
    amount = cooldown_budget(600, 0.25)
    assert amount == 800 and wsd(600 / amount, 0.25) == 1.0 and wsd(601 / amount, 0.25) < 1.0
    with pytest.raises(ValueError):
        cooldown_budget(0, 0.25)
