"""What the model-centric callbacks that change a model's parameters share: rebuilding the fastai optimizer
around the new parameters with the old ones' state, and a batch drawn without moving any random stream."""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from fastai.learner import Learner
from fastai.optimizer import OptimWrapper

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


def _groups_and_state(opt) -> tuple[list[dict], dict]:
    """The per-group settings and the per-parameter state of a fastai `Optimizer` (`hypers`, `state`) or of the
    torch optimizer inside an `OptimWrapper` (whose `hypers` are fresh copies and whose own `state` is unused)."""
    if isinstance(opt, OptimWrapper):
        return opt.opt.param_groups, opt.opt.state
    return opt.hypers, opt.state


def _carry_state(learn: Learner, old, migrate: dict) -> None:
    learn.create_opt()
    new = learn.opt
    (new_groups, new_state), (old_groups, old_state) = _groups_and_state(new), _groups_and_state(old)
    for g_new, g_old in zip(new_groups, old_groups):
        # every setting but the parameters: lr, betas, and an optimizer's own (schedule-free's train_mode, k)
        g_new.update({k: v for k, v in g_old.items() if k != "params" and k in g_new})
    for group in new.param_lists:
        for p in group:
            if p in old_state:
                new_state[p] = old_state[p]
            elif p in migrate:
                old_p, fn = migrate[p]
                if old_p in old_state:
                    new_state[p] = {**new_state.get(p, {}), **fn(old_state[old_p])}


def first_batch(dl) -> tuple:
    """One training batch (`dl.one_batch()`) with the loader's, Python's and torch's random streams put back:
    a data-dependent init must not change the order the fit then sees."""
    from fastai.distributed import DistributedDL

    if isinstance(dl, DistributedDL):  # its one_batch reaches for the dataset; the wrapped loader has the batches
        dl = dl.dl
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
