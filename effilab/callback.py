"""What every effilab fastai callback shares: the Learner's telemetry store, per-sample losses and
checkpoints that carry the callbacks' state."""

from __future__ import annotations

from pathlib import Path

import fastai.callback.schedule  # noqa: F401  (Learner.fit_one_cycle and lr_find, as users expect)
import torch
from fastai.callback.core import Callback
from fastai.layers import NoneReduce
from fastai.learner import Learner
from fastai.torch_core import distrib_barrier

from .core.distributed import rank
from .core.telemetry import Telemetry

__all__ = ["PER_BATCH_EVENTS", "EffilabCallback", "load_checkpoint", "per_sample_losses", "save_checkpoint",
           "telemetry_of"]


def telemetry_of(learn: Learner) -> Telemetry:
    """The Learner's telemetry store, created on first use."""
    # `learn.__dict__`, not getattr: Learner falls back to the model's attributes.
    store = learn.__dict__.get("telemetry")
    if store is None:
        store = learn.telemetry = Telemetry()
    return store


# Events fastai fires for every batch: a callback without a handler for one should cost nothing there.
PER_BATCH_EVENTS = frozenset(("before_batch", "after_pred", "after_loss", "before_backward", "after_cancel_backward",
                              "after_backward", "before_step", "after_step", "after_cancel_batch", "after_batch"))


class EffilabCallback(Callback):
    """Base of effilab's callbacks: a telemetry shortcut and a state that checkpoints carry."""

    def __call__(self, event_name):
        # fastai calls every callback at every event and reads `learn.training` through attribute
        # delegation (~5 us each): skip the per-batch events this callback has no handler for.
        if event_name in PER_BATCH_EVENTS and not hasattr(type(self), event_name):
            return None
        return super().__call__(event_name)

    @property
    def telemetry(self) -> Telemetry:
        return telemetry_of(self.learn)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def per_sample_losses(loss_func, pred, *yb, n: int) -> torch.Tensor:
    """The Learner's loss, one value per sample (shape `(n,)`), through fastai's `NoneReduce`.

    Works for fastai losses (`CrossEntropyLossFlat`, ...), `nn.*Loss` modules and functions that take
    `reduction=`. Element-wise losses (segmentation, sequences) are averaged per sample.
    """
    try:
        with NoneReduce(loss_func) as lf:
            losses = lf(pred, *yb)
    except TypeError as e:
        raise TypeError(
            f"cannot get per-sample losses from loss {loss_func!r}: it must accept reduction='none' "
            "(a `reduction` attribute or keyword). Use e.g. fastai's CrossEntropyLossFlat() or "
            "nn.CrossEntropyLoss(), or wrap your loss so that it does."
        ) from e
    if losses.dim() == 0 or losses.numel() % n:
        raise ValueError(
            f"loss {loss_func!r} returned shape {tuple(losses.shape)} with reduction='none' for a batch of {n}: "
            "it must return one value per sample (or per element of each sample)")
    # fastai's losses come back as `TensorBase`, whose Python-level `__torch_function__` makes every
    # later op several times slower; the per-step path works on plain tensors (gradients still flow).
    losses = losses.as_subclass(torch.Tensor)
    return losses.reshape(n, -1).mean(1) if losses.numel() != n else losses.reshape(n)


def _effilab_callbacks(learn: Learner):
    return [cb for cb in learn.cbs if isinstance(cb, EffilabCallback)]


def _state_path(model_path: Path) -> Path:
    return model_path.with_name(model_path.stem + ".effilab.pth")


def save_checkpoint(learn: Learner, name: str, with_opt: bool = True) -> Path:
    """`learn.save(name)` plus the state of every effilab callback and the telemetry.

    Saved at the end of epoch `e` (e.g. from `after_epoch`), `load_checkpoint` returns `e + 1`, and
    `learn.fit(n, start_epoch=e + 1)` continues exactly as the uninterrupted run would have.
    """
    # Every rank gathers its state (that may be collective); rank 0 writes, as fastai's `save` does.
    state = {
        "resume_epoch": getattr(learn, "epoch", -1) + 1,
        "callbacks": {type(cb).__name__: cb.state_dict() for cb in _effilab_callbacks(learn)},
        "telemetry": telemetry_of(learn).__getstate__(),
    }
    path = learn.save(name, with_opt=with_opt)
    if rank() == 0:
        torch.save(state, _state_path(path))
    distrib_barrier()
    return path


def load_checkpoint(learn: Learner, name: str, with_opt: bool = True, device=None) -> int:
    """Load what `save_checkpoint` wrote into `learn` (whose callbacks must be of the same kinds);
    returns the epoch to pass as `fit(..., start_epoch=...)`."""
    path = Path(learn.path) / learn.model_dir / f"{name}.effilab.pth"
    state = torch.load(path, map_location="cpu", weights_only=False)
    cbs = {type(cb).__name__: cb for cb in _effilab_callbacks(learn)}
    missing = sorted(set(state["callbacks"]) - set(cbs))
    if missing:
        raise ValueError(f"checkpoint {name!r} holds state for {missing}, which this Learner lacks: add them "
                         "to its callbacks before loading")
    # Callbacks that change the model's structure (growth, inserted gates) rebuild it to the saved shape
    # (and the optimizer for it) before the weights and the optimizer state are loaded.
    for cb_name, cb_state in state["callbacks"].items():
        if hasattr(type(cbs[cb_name]), "prepare_load"):
            cbs[cb_name].prepare_load(cb_state)
    learn.load(name, with_opt=with_opt, device=device)
    for cb_name, cb_state in state["callbacks"].items():
        cbs[cb_name].load_state_dict(cb_state)
    telemetry_of(learn).__setstate__(state["telemetry"])
    return state["resume_epoch"]


# Convenience methods, fastai style: `learn.save_checkpoint(name)`, `learn.load_checkpoint(name)`.
Learner.save_checkpoint = save_checkpoint
Learner.load_checkpoint = load_checkpoint
