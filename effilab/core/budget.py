"""Budgeted training in plain PyTorch: one progress clock p = spent / budget, what a step costs, and
learning-rate schedules as functions of p. No fastai, no device reads.

A budget is an amount of one resource (`UNITS`): optimiser steps, samples forwarded, tokens (elements of
the token input), training FLOPs (forward + backward of the model, counted by
`torch.utils.flop_counter.FlopCounterMode` on the meta device) or wall-clock seconds. Schedules are
functions of p, so a run that ends on its budget also ends its schedules.

>>> clock = BudgetClock(100, "samples")
>>> clock.charge(32); clock.progress
0.32
>>> rex(0.5)  # Chen et al. 2022: (1 - p) / (1 - p / 2)
0.6666666666666666
>>> epochs_for_budget(10_000, "samples", n_samples=4_000, bs=128, drop_last=True)
3
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["UNITS", "BudgetClock", "LrSchedule", "check_amount", "check_unit", "cooldown_budget", "cosine",
           "epochs_for_budget", "linear_decay", "rex", "step_flops", "StepFlops", "warm_up_flop_counting", "wsd"]

UNITS = ("steps", "samples", "tokens", "flops", "seconds")


def check_unit(unit) -> str:
    if not isinstance(unit, str) or unit not in UNITS:
        raise ValueError(f"unknown budget unit {unit!r}: use one of {', '.join(UNITS)}")
    return unit


def check_amount(amount, name: str = "amount") -> float:
    """A budget is a positive, finite number (not a bool, not a string)."""
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise TypeError(f"budget {name} must be a number, got {amount!r} ({type(amount).__name__})")
    if not math.isfinite(amount) or amount <= 0:
        raise ValueError(f"budget {name} must be a positive finite number, got {amount!r}: "
                         "e.g. Budget(50_000, 'samples') or Budget(60, 'seconds')")
    return amount


def _check_fraction(value, name: str, upper_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a number in [0, 1), got {value!r}")
    if not (0 <= value < 1 if upper_open else 0 <= value <= 1):
        raise ValueError(f"{name} is a fraction of the budget in [0, {'1)' if upper_open else '1]'}, got {value!r}")
    return float(value)


class BudgetClock:
    """Spend accounting for any training loop: `charge(cost)` after each step, read `progress` (p, clipped
    to [0, 1]) before the next one and stop when `done`.

    With `unit="seconds"`, `tick()` charges the time since the last `mark()`/`tick()` on `clock` (a
    callable returning seconds, `time.perf_counter` by default; inject a fake one in tests); `mark()` and
    `exclude()` skip what is not charged (validation, compile warm-up), which `excluded` sums. `done` then
    ends the run when the next step, at the mean step time, would overshoot the deadline by more than
    the current step undershoots it: the run ends within half a step of the budget.
    """

    def __init__(self, amount, unit: str = "samples", clock: Callable[[], float] = time.perf_counter):
        self.amount = float(check_amount(amount))
        self.unit = check_unit(unit)
        self.clock = clock
        self.spent = 0.0
        self.steps = 0  # steps charged (the mean step cost is spent / steps)
        self.excluded = 0.0  # seconds not charged
        self._mark: float | None = None

    @property
    def progress(self) -> float:
        return min(1.0, self.spent / self.amount)

    @property
    def mean_cost(self) -> float:
        return self.spent / self.steps if self.steps else 0.0

    @property
    def done(self) -> bool:
        if self.unit == "seconds":
            return self.spent + 0.5 * self.mean_cost >= self.amount
        return self.spent >= self.amount

    def charge(self, cost: float) -> None:
        self.spent += cost
        self.steps += 1

    def mark(self) -> None:
        """Start (or restart) charging time from now."""
        self._mark = self.clock()

    def tick(self) -> float:
        """Charge (as one step) the seconds since the last mark and mark again; returns them."""
        now = self.clock()
        dt = 0.0 if self._mark is None else now - self._mark
        self._mark = now
        self.charge(dt)
        return dt

    def exclude(self) -> float:
        """The seconds since the last mark are not charged (validation, warm-up): count them in `excluded`,
        mark again, and return them."""
        now = self.clock()
        dt = 0.0 if self._mark is None else now - self._mark
        self.excluded += dt
        self._mark = now
        return dt

    def state_dict(self) -> dict:
        return {"amount": self.amount, "unit": self.unit, "spent": self.spent, "steps": self.steps,
                "excluded": self.excluded}

    def load_state_dict(self, state: dict) -> None:
        self.spent, self.steps, self.excluded = state["spent"], state["steps"], state["excluded"]


def epochs_for_budget(amount, unit: str = "samples", *, n_samples: int, bs: int, drop_last: bool = False,
                      min_fraction: float = 1.0, tokens_per_sample: int | None = None) -> int:
    """The smallest epoch count that can spend `amount` (an upper bound to pass to `fit`, the budget ends
    the fit): an epoch forwards `n_samples` (whole batches of `bs` with `drop_last`) in `ceil` or `floor`
    steps. `min_fraction`: the smallest fraction of an epoch a technique may forward (InfoBatch prunes to
    about 0.6-0.8 of it: pass 0.5 to be safe). Steps, samples and tokens only: FLOPs and seconds are known
    once a step ran (give those budgets a generous upper bound)."""
    check_amount(amount)
    check_unit(unit)
    for name, v in (("n_samples", n_samples), ("bs", bs)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if isinstance(min_fraction, bool) or not isinstance(min_fraction, (int, float)) or not 0 < min_fraction <= 1:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction!r}")
    steps = n_samples // bs if drop_last else math.ceil(n_samples / bs)
    if steps < 1:
        raise ValueError(f"{n_samples} samples make no batch of {bs} with drop_last=True")
    per_epoch = {"steps": steps, "samples": steps * bs if drop_last else n_samples}
    if unit == "tokens":
        if tokens_per_sample is None:
            raise ValueError("a token budget needs tokens_per_sample (e.g. the sequence length)")
        per_epoch["tokens"] = per_epoch["samples"] * tokens_per_sample
    if unit not in per_epoch:
        raise ValueError(f"epochs_for_budget sizes steps, samples and tokens budgets; a {unit} budget depends on "
                         "the machine or the model: give the fit a generous epoch count, the budget ends it")
    return max(1, math.ceil(amount / (per_epoch[unit] * min_fraction) - 1e-9))


def cooldown_budget(spent: float, decay: float) -> float:
    """The budget that makes a warmup-stable-decay run start its cooldown now (at `spent`): branch a
    finished model off any stable-phase checkpoint ("anytime" training)."""
    check_amount(spent, "spent")
    _check_fraction(decay, "decay")
    return spent / (1.0 - decay)


# ---- FLOPs per step


def _meta_like(t: torch.Tensor, requires_grad: bool = False) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta", requires_grad=requires_grad)


class _Call(nn.Module):
    """`fn(*inputs)` as the forward of a module holding `model`, so that `functional_call` swaps the model's
    parameters for the whole of `fn`."""

    def __init__(self, model: nn.Module, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *inputs):
        return self.fn(*inputs)


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


@contextlib.contextmanager
def _hooks_off(model: nn.Module):
    """The model's module hooks and the global ones set aside: the counting pass is not a forward that anybody
    registered a hook for (a user's forward counter, fastai's ActivationStats, a technique's own measurement
    must not see meta tensors). The same dict objects are emptied and refilled, so hook handles stay valid."""
    from torch.nn.modules import module as M

    dicts = [getattr(m, name) for m in model.modules() for name in _HOOK_DICTS]
    dicts += [getattr(M, f"_global{name}") for name in _HOOK_DICTS]
    saved = [dict(d) for d in dicts]
    for d in dicts:
        d.clear()
    try:
        yield
    finally:
        for d, items in zip(dicts, saved):
            d.clear()
            d.update(items)


def step_flops(model: nn.Module, inputs: Sequence[torch.Tensor]) -> int:
    """FLOPs of one training step's forward and backward of `model` on inputs of these shapes, counted by
    `FlopCounterMode` (matmuls, convolutions, attention; element-wise ops count 0) on the meta device: no
    memory, no change to the model, its BatchNorm statistics, its gradients or any random generator, and no
    module hook called. The backward is that of the outputs' sum, the same cost as the loss's."""
    from torch.func import functional_call
    from torch.utils.flop_counter import FlopCounterMode

    params = {k: _meta_like(p, p.requires_grad) for k, p in model.named_parameters()}
    buffers = {k: _meta_like(b) for k, b in model.named_buffers()}
    meta_inputs = tuple(_meta_like(x) if isinstance(x, torch.Tensor) else x for x in inputs)
    trainable = [p for p in params.values() if p.requires_grad]

    def forward_backward(*xs):
        # the backward inside the functional call: activation checkpointing recomputes its blocks during the
        # backward, which must still see the meta parameters
        out = model(*xs)
        leaves = [o for o in (out if isinstance(out, (tuple, list)) else (out,))
                  if isinstance(o, torch.Tensor) and o.requires_grad]
        if leaves and trainable:
            torch.autograd.grad(sum(o.float().sum() for o in leaves), trainable, allow_unused=True)

    try:
        # meta-device dropout still draws from the CPU generator: leave the run's random stream alone
        with _hooks_off(model), torch.random.fork_rng(devices=[]), FlopCounterMode(display=False) as counter:
            functional_call(_Call(model, forward_backward), {f"model.{k}": v for k, v in {**params, **buffers}.items()},
                            meta_inputs)
    except Exception as e:
        raise RuntimeError(f"cannot count the FLOPs of {type(model).__name__} on the meta device ({e}); "
                           "use a samples, tokens or steps budget for this model") from e
    return int(counter.get_total_flops())


@functools.cache
def warm_up_flop_counting() -> None:
    """Pay the one-off cost of the first FLOP count in this process (~1 s of CPU here: imports and the meta
    device's first dispatch) on a tiny module, so that it does not land in a measured fit."""
    step_flops(nn.Linear(2, 2), (torch.zeros(1, 2),))


class StepFlops:
    """`step_flops` remembered per input shapes and dtypes and per trainable-parameter pattern: a new batch
    shape, a frozen layer or a grown model is counted again, an unchanged step is a dictionary lookup.
    Returns None for a model the meta device cannot run (then always None: FLOPs unknown)."""

    def __init__(self):
        self._counts: dict = {}
        self.failed: str | None = None

    def __call__(self, model: nn.Module, inputs: Sequence[torch.Tensor]) -> int | None:
        if self.failed is not None:
            return None
        key = (tuple((tuple(x.shape), x.dtype) for x in inputs if isinstance(x, torch.Tensor)),
               tuple(p.requires_grad for p in model.parameters()))
        if key not in self._counts:
            try:
                self._counts[key] = step_flops(model, inputs)
            except RuntimeError as e:
                self.failed = str(e)
                return None
        return self._counts[key]

    def __len__(self) -> int:  # distinct steps counted
        return len(self._counts)


# ---- schedules: multipliers of the peak learning rate as functions of progress p in [0, 1]


def linear_decay(p):
    """Linear decay to zero over the budget (Li, Yumer & Ramanan, ICLR 2020): 1 - p."""
    return 1.0 - p


def rex(p):
    """REX (Chen, Wolfe & Kyrillidis, MLSys 2022): (1 - p) / (1/2 + (1 - p) / 2)."""
    return (1.0 - p) / (0.5 + 0.5 * (1.0 - p))


def cosine(p):
    """Cosine decay to zero: (1 + cos(pi p)) / 2."""
    return 0.5 * (1.0 + math.cos(math.pi * p))


COOLDOWN_SHAPES = ("linear", "1-sqrt")


def wsd(p, decay: float = 0.2, shape: str = "1-sqrt"):
    """Warmup-stable-decay without the warm-up: 1 until the last `decay` of the budget, then a cooldown to 0,
    linear (MiniCPM, Hu et al. 2024) or 1 - sqrt (Hägele et al., NeurIPS 2024) of the cooldown's fraction."""
    if p <= 1.0 - decay:
        return 1.0
    x = min(1.0, (p - 1.0 + decay) / decay)
    return 1.0 - x if shape == "linear" else 1.0 - math.sqrt(x)


_SHAPES = {"linear_decay": linear_decay, "rex": rex, "cosine": cosine, "wsd": wsd}


class LrSchedule:
    """A fastai schedule function of p (`ParamScheduler({"lr": LrSchedule("rex", peak=1e-2)})`):
    `peak * shape(q)` after a linear warm-up from 0 over the first `warmup` of the budget, `q` the
    progress through the rest (for "wsd" the cooldown stays the last `decay` of the whole budget), never
    below `final * peak`. `peak` may be an array (one value per parameter group). Picklable."""

    def __init__(self, shape: str = "linear_decay", peak=1.0, warmup: float = 0.0, final: float = 0.0,
                 decay: float = 0.2, cooldown: str = "1-sqrt"):
        if shape not in _SHAPES:
            raise ValueError(f"unknown schedule shape {shape!r}: use one of {', '.join(_SHAPES)}")
        self.shape, self.peak = shape, peak
        self.warmup = _check_fraction(warmup, "warmup")
        self.final = _check_fraction(final, "final")
        if shape == "wsd":
            self.decay = _check_fraction(decay, "decay")
            if not self.decay > 0:
                raise ValueError("decay must be > 0: the share of the budget the cooldown takes, e.g. 0.2")
            if self.warmup + self.decay > 1:
                raise ValueError(f"warmup ({warmup}) + decay ({decay}) exceed the budget")
            if cooldown not in COOLDOWN_SHAPES:
                raise ValueError(f"unknown cooldown shape {cooldown!r}: use one of {', '.join(COOLDOWN_SHAPES)}")
        self.decay, self.cooldown = decay, cooldown

    def multiplier(self, p: float) -> float:
        p = min(1.0, max(0.0, float(p)))
        if self.warmup and p < self.warmup:
            return p / self.warmup
        if self.shape == "wsd":
            m = wsd(p, self.decay, self.cooldown)
        else:
            m = _SHAPES[self.shape]((p - self.warmup) / (1.0 - self.warmup))
        return self.final + (1.0 - self.final) * float(m)

    def __call__(self, p):
        return self.peak * self.multiplier(p)

    def __repr__(self):
        return f"LrSchedule({self.shape!r}, peak={self.peak!r}, warmup={self.warmup}, final={self.final})"
