"""What the model-centric callbacks that change a model's parameters share: rebuilding the fastai optimizer
around the new parameters with the old ones' state, and a batch drawn without moving any random stream."""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from fastai.learner import Learner

__all__ = ["first_batch", "rebuild_optimizer"]


def rebuild_optimizer(learn: Learner, migrate: dict | None = None) -> None:
    """`learn.create_opt()` for a model whose parameters changed, keeping what the old optimizer knew: the
    hyper-parameters of each group and the state of every parameter that is still in the model.
    `migrate` maps a new parameter to `(old parameter, fn)`: its state is `fn(old state)` (e.g. widened
    moments). New parameters start with empty state. No optimizer is made before the first exists.

    Then every callback of the Learner with an `after_model_change()` method is told (e.g. weight averaging
    restarts its average, whose parameters no longer match)."""
    old = learn.opt
    if old is not None:
        _carry_state(learn, old, migrate or {})
    for cb in learn.cbs:
        if hasattr(type(cb), "after_model_change"):
            cb.after_model_change()


def _carry_state(learn: Learner, old, migrate: dict) -> None:
    learn.create_opt()
    new = learn.opt
    for h_new, h_old in zip(new.hypers, old.hypers):
        h_new.update(h_old)
    for group in new.param_lists:
        for p in group:
            if p in old.state:
                new.state[p] = old.state[p]
            elif p in migrate:
                old_p, fn = migrate[p]
                if old_p in old.state:
                    new.state[p] = {**new.state.get(p, {}), **fn(old.state[old_p])}


def first_batch(dl) -> tuple:
    """One training batch (`dl.one_batch()`) with the loader's, Python's and torch's random streams put back:
    a data-dependent init must not change the order the fit then sees."""
    rng = getattr(dl, "rng", None)  # fastai replaces `dl.rng` by a new generator on each iteration
    states = (rng.getstate() if rng is not None else None, random.getstate(), torch.get_rng_state())
    try:
        return dl.one_batch()
    finally:
        if rng is not None:
            rng.setstate(states[0])
            dl.rng = rng
        random.setstate(states[1])
        torch.set_rng_state(states[2])


def tensor_state_map(state: dict, fn: Callable[[torch.Tensor], torch.Tensor], shape) -> dict:
    """`state` with `fn` applied to each tensor of the parameter's (old) `shape` (moments), others copied."""
    return {k: fn(v) if isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(shape) else v
            for k, v in state.items()}
