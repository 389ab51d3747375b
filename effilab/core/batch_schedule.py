"""Batch-size schedules (Smith, Kindermans, Ying & Le 2018: increase the batch size instead of decaying the
learning rate), large-batch learning-rate scaling (Goyal et al. 2017) and a schedule transform that holds
a learning rate at its peak. Plain Python: no fastai, no device.

>>> batch_sizes(4, 32, milestones=(0.5, 0.75), factor=2)
[32, 32, 64, 128]
>>> scaled_lr_and_warmup(1024, base_bs=256, base_lr=0.1, warmup_epochs=5, epochs=90)
(0.4, 0.05555555555555555)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from fractions import Fraction

__all__ = ["HoldPeak", "batch_size_at", "batch_sizes", "check_batch_schedule", "exact", "floor_times",
           "linear_scaling", "planned_curve", "round_times", "scaled_lr_and_warmup"]


def exact(x) -> Fraction:
    """`x` as the rational number it is written as: 0.7 is 7/10, not the binary float just below it, so
    that a boundary `fraction * count` lands where the decimal says (0.7 * 90 is 63, not 62.99...)."""
    if isinstance(x, (Fraction, int)):
        return Fraction(x)
    return Fraction(repr(float(x)))


def floor_times(fraction, count: int) -> int:
    """floor(`fraction` * `count`), exactly."""
    return math.floor(exact(fraction) * count)


def round_times(fraction, count: int) -> int:
    """round(`fraction` * `count`) (halves to even, as Python's `round`), exactly."""
    return round(exact(fraction) * count)


def check_batch_schedule(milestones: Sequence[float], factor: float | None = None,
                         sizes: Sequence[int] | None = None) -> None:
    """Errors for schedules that cannot be meant: milestones outside (0, 1) or not increasing, a factor
    below 1, sizes that are not increasing positive integers or do not match the milestones."""
    milestones = list(milestones)
    if not milestones:
        raise ValueError("milestones must name at least one point of the fit, e.g. milestones=(0.5, 0.75)")
    for m in milestones:
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 < m < 1.0:
            raise ValueError(f"each milestone is a fraction of the fit in (0, 1), got {m!r} in {milestones}")
    if any(b <= a for a, b in zip(milestones, milestones[1:])):
        raise ValueError(f"milestones must be strictly increasing, got {milestones}")
    if sizes is not None:
        if factor is not None:
            raise ValueError("give sizes or factor, not both")
        sizes = list(sizes)
        if len(sizes) != len(milestones) + 1:
            raise ValueError(f"sizes has one batch size per phase: {len(milestones) + 1} for {len(milestones)} "
                             f"milestones, got {len(sizes)} ({sizes})")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
            raise ValueError(f"sizes must be positive integers, got {sizes}")
        if any(b <= a for a, b in zip(sizes, sizes[1:])):
            raise ValueError(f"sizes must be strictly increasing (the batch size grows), got {sizes}")
    elif factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1):
        raise ValueError(f"factor must be a number >= 1 (the batch size grows), got {factor!r}")


def batch_size_at(epoch: int, n_epoch: int, base_bs: int, milestones: Sequence[float], factor: float = 2.0,
                  sizes: Sequence[int] | None = None) -> int:
    """The batch size of `epoch` (0-based) of an `n_epoch` fit: the phase is the number of milestones at or
    before the epoch's start (`epoch / n_epoch >= m`, exactly: milestone m switches at epoch ceil(m * n_epoch),
    0.55 of 100 epochs at epoch 55); the size is `sizes[phase]`, else `round(base_bs * factor ** phase)`."""
    phase = sum(epoch >= exact(m) * n_epoch for m in milestones)
    return int(sizes[phase]) if sizes is not None else max(1, round(base_bs * factor ** phase))


def batch_sizes(n_epoch: int, base_bs: int, milestones: Sequence[float], factor: float = 2.0,
                sizes: Sequence[int] | None = None) -> list[int]:
    """The batch size of every epoch of an `n_epoch` fit."""
    return [batch_size_at(e, n_epoch, base_bs, milestones, factor, sizes) for e in range(n_epoch)]


def planned_curve(per_epoch: Sequence[float]) -> dict:
    """A per-epoch value as a step curve over the fraction of the fit (`{"pct": [...], "value": [...]}`)."""
    n = len(per_epoch)
    pct, value = [], []
    for e, v in enumerate(per_epoch):
        pct += [e / n, (e + 1) / n]
        value += [v, v]
    return {"pct": pct, "value": value}


def linear_scaling(base_lr: float, base_bs: int, bs: int) -> float:
    """The linear scaling rule (Goyal et al. 2017): multiply the learning rate by the batch-size ratio."""
    if not base_lr > 0:
        raise ValueError(f"base_lr must be > 0, got {base_lr!r}")
    for name, v in (("base_bs", base_bs), ("bs", bs)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return base_lr * bs / base_bs


def scaled_lr_and_warmup(bs: int, base_bs: int = 256, base_lr: float = 0.1, warmup_epochs: float = 5,
                         epochs: int = 90) -> tuple[float, float]:
    """`(lr, pct_start)` for a fit of `epochs` epochs at batch size `bs`: the learning rate by the linear
    scaling rule from `base_lr` at `base_bs` (Goyal et al. 2017: 0.1 at 256 for ResNet-50), and the
    warm-up (Goyal et al.: 5 epochs) as a fraction of the fit, for `fit_one_cycle(epochs, lr,
    pct_start=pct_start)` or a `ParamScheduler` with a linear warm-up.
    """
    lr = linear_scaling(base_lr, base_bs, bs)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if not 0 <= warmup_epochs < epochs:
        raise ValueError(f"warmup_epochs must be in [0, epochs={epochs}), got {warmup_epochs!r}")
    return lr, warmup_epochs / epochs


class HoldPeak:
    """A schedule `f(pct)` that follows `sched` up to its peak and stays there: one-cycle's warm-up, then a
    flat learning rate instead of the annealing. The peak is found on a grid of `grid` points."""

    def __init__(self, sched: Callable[[float], float], grid: int = 1000):
        self.sched = sched
        values = [_scalar(sched(i / grid)) for i in range(grid + 1)]
        self.peak_pct = values.index(max(values)) / grid

    def __call__(self, pct: float):
        return self.sched(min(pct, self.peak_pct))


def _scalar(v) -> float:
    try:
        return float(v)
    except TypeError:  # one value per parameter group (discriminative learning rates)
        return float(sum(v) / len(v))
