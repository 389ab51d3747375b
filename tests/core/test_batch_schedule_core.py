"""Batch-size schedule, linear scaling and HoldPeak maths."""

from __future__ import annotations

import pytest
from fastai.callback.schedule import combined_cos

from effilab.core.batch_schedule import (
    HoldPeak,
    batch_size_at,
    batch_sizes,
    linear_scaling,
    planned_curve,
    scaled_lr_and_warmup,
)


def test_milestones_take_effect_at_the_first_epoch_starting_at_or_after_them():
    assert batch_sizes(4, 32, (0.5, 0.75)) == [32, 32, 64, 128]
    assert batch_sizes(10, 32, (0.5, 0.75), factor=2) == [32] * 5 + [64] * 3 + [128] * 2
    assert batch_sizes(3, 32, (0.5,)) == [32, 32, 64]  # epoch 1 starts at 1/3 < 0.5
    assert batch_sizes(4, 10, (0.5,), factor=1.5) == [10, 10, 15, 15]
    assert batch_sizes(4, 10, (0.25, 0.5), sizes=[16, 48, 100]) == [16, 48, 100, 100]
    assert batch_size_at(0, 1, 7, (0.5,)) == 7


def test_planned_curve_is_a_step_over_the_fit():
    assert planned_curve([1, 2]) == {"pct": [0.0, 0.5, 0.5, 1.0], "value": [1, 1, 2, 2]}


def test_linear_scaling_rule_and_warmup():
    assert linear_scaling(0.1, 256, 8192) == pytest.approx(3.2)  # Goyal et al.: 8k minibatch
    lr, pct = scaled_lr_and_warmup(8192, base_bs=256, base_lr=0.1, warmup_epochs=5, epochs=90)
    assert lr == pytest.approx(3.2) and pct == pytest.approx(5 / 90)
    assert scaled_lr_and_warmup(128, base_bs=256, base_lr=0.2, warmup_epochs=0, epochs=3) == (0.1, 0.0)


@pytest.mark.parametrize("kwargs, match", [
    ({"bs": 0}, "bs must be"), ({"bs": 64, "base_bs": 0}, "base_bs must be"),
    ({"bs": 64, "base_lr": 0}, "base_lr"), ({"bs": 64, "warmup_epochs": 90}, "warmup_epochs"),
    ({"bs": 64, "warmup_epochs": -1}, "warmup_epochs"), ({"bs": 64, "epochs": 0}, "epochs must be"),
])
def test_scaling_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        scaled_lr_and_warmup(**kwargs)


def test_hold_peak_warms_up_then_stays_flat():
    sched = combined_cos(0.25, 0.004, 0.1, 1e-6)
    held = HoldPeak(sched)
    assert held.peak_pct == pytest.approx(0.25, abs=1e-3)
    assert held(0.0) == pytest.approx(sched(0.0)) and held(0.1) == pytest.approx(sched(0.1))
    assert held(0.6) == pytest.approx(0.1) and held(1.0) == pytest.approx(0.1)


# ---- exact boundaries: a fraction written as a decimal times a count, in integer arithmetic

from fractions import Fraction  # noqa: E402

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from effilab.core.batch_schedule import exact, floor_times, round_times  # noqa: E402
from effilab.core.infobatch import InfoBatchPruner  # noqa: E402

_DECIMALS = st.builds(lambda k, digits: (k, digits), st.integers(1, 9999), st.integers(1, 4)).filter(
    lambda kd: kd[0] < 10 ** kd[1])


@pytest.mark.parametrize("fraction, count, floor", [(0.7, 90, 63), (0.55, 100, 55), (0.28, 25, 7), (0.875, 8, 7)])
def test_the_known_float_traps_land_on_the_decimal_boundary(fraction, count, floor):
    assert floor_times(fraction, count) == floor


def test_infobatch_anneals_and_the_batch_size_switches_where_the_decimal_says():
    assert InfoBatchPruner(10, num_epochs=90, delta=0.7).anneal_epoch == 63
    assert batch_sizes(100, 32, milestones=(0.55,), factor=2).index(64) == 55


@given(_DECIMALS, st.integers(1, 1000))
def test_boundaries_are_exact_for_any_decimal_fraction_and_count(kd, count):
    k, digits = kd
    fraction = float(f"0.{k:0{digits}d}")
    num, den = k, 10**digits  # the decimal as written
    assert exact(fraction) == Fraction(num, den)
    assert floor_times(fraction, count) == num * count // den
    assert round_times(fraction, count) == round(Fraction(num * count, den))
    assert InfoBatchPruner(4, num_epochs=count, delta=fraction).anneal_epoch == num * count // den
    sizes = batch_sizes(count, 8, milestones=(fraction,), factor=2)
    first_switch = -(-num * count // den)  # ceil: the first epoch e with e / count >= fraction
    assert sizes == [8] * first_switch + [16] * (count - first_switch)
