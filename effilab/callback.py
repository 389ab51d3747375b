"""What every effilab fastai callback shares: the Learner's telemetry store, per-sample losses and
checkpoints that carry the callbacks' state."""

from __future__ import annotations

import functools
import inspect
import math
from pathlib import Path

import fastai.callback.schedule  # noqa: F401  (Learner.fit_one_cycle and lr_find, as users expect)
import torch
from fastai.callback.core import Callback
from fastai.layers import NoneReduce
from fastai.learner import Learner
from fastai.torch_core import distrib_barrier
from fastcore.basics import noop

from .core.distributed import rank
from .core.telemetry import Telemetry

__all__ = ["PER_BATCH_EVENTS", "ArgumentTypeError", "EffilabCallback", "check_annotated_args", "load_checkpoint",
           "per_sample_loss_parts", "per_sample_losses", "refuse_beside", "save_checkpoint", "telemetry_of"]


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


class ArgumentTypeError(TypeError, ValueError):
    """A constructor argument of the wrong type (a TypeError, and a ValueError like every other bad input)."""


_KINDS = {  # annotation -> (accepted types, rejected types)
    "float": ((int, float), (bool,)), "int": ((int,), (bool,)), "bool": ((bool,), ()), "str": ((str,), ()),
    "None": ((type(None),), ()),
}


def check_annotated_args(owner: str, fn, args: tuple, kwargs: dict) -> None:
    """Reject arguments whose type is not the one annotated (`float`, `int`, `bool`, `str`, unions of them and
    `None`): `"no"` for a bool, `True` or `"0.5"` for a float, `1.5` for an int, NaN for a float. Arguments with
    other annotations (sequences, callables) or none are left to the constructor."""
    sig = inspect.signature(fn)
    try:
        bound = sig.bind(None, *args, **kwargs)
    except TypeError:
        return  # Python's own error follows
    for name, value in list(bound.arguments.items())[1:]:
        param = sig.parameters[name]
        ann = param.annotation
        ann = ann.__name__ if ann in (float, int, bool, str) else ann
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or not isinstance(ann, str):
            continue
        kinds = [k.strip() for k in ann.split("|")]
        if not all(k in _KINDS for k in kinds):
            continue
        ok = any(isinstance(value, _KINDS[k][0]) and not isinstance(value, _KINDS[k][1]) for k in kinds)
        if ok and isinstance(value, float) and math.isnan(value):
            ok = False
        if not ok:
            raise ArgumentTypeError(f"{owner}: {name} must be {' or '.join(kinds)}, got {value!r} "
                                    f"({type(value).__name__})")


class EffilabCallback(Callback):
    """Base of effilab's callbacks: a telemetry shortcut and a state that checkpoints carry.

    Every subclass's constructor checks its arguments against their annotations (`check_annotated_args`)."""

    # The per-batch events this class has no handler for (set for each subclass).
    _ignored: frozenset = PER_BATCH_EVENTS
    # Per-batch events whose handler is called straight away, without fastai's dispatch (which reads
    # `learn.training` through two attribute delegations, ~5 us): the handler checks itself that a fit trains.
    _direct: frozenset = frozenset()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._ignored = frozenset(e for e in PER_BATCH_EVENTS if not hasattr(cls, e))
        init = cls.__dict__.get("__init__")
        if init is None or getattr(init, "_checks_types", False):
            return

        @functools.wraps(init)
        def checked_init(self, *args, **kw):
            check_annotated_args(type(self).__name__, init, args, kw)
            init(self, *args, **kw)

        checked_init._checks_types = True
        cls.__init__ = checked_init

    def __call__(self, event_name):
        # fastai calls every callback at every event and reads `learn.training` through attribute
        # delegation (~5 us each): skip the per-batch events this callback has no handler for.
        if event_name in self._ignored:
            return None
        if event_name in self._direct:
            return getattr(self, event_name)()
        return super().__call__(event_name)

    @property
    def telemetry(self) -> Telemetry:
        return telemetry_of(self.learn)

    def after_cancel_fit(self):
        """Restore whatever this callback changed on the Learner (loss, loaders, weights, ...).

        Runs when a fit is cancelled (then `after_fit` follows) and when any exception leaves a fit
        (effilab fires it then; fastai fires no event). It may run when this callback never
        changed anything, or twice: it must be idempotent."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def refuse_beside(cb: Callback, role: str, what: str) -> None:
    """Raise a clear error if a callback that runs before `cb` on its Learner (fastai's order) has the same `role`
    (a class attribute set to True): two of them cannot both `what`. The earlier one goes on; the later refuses."""
    holders = [c for c in cb.learn.cbs.sorted("order") if getattr(type(c), role, False)]
    if len(holders) > 1 and holders[0] is not cb:
        raise ValueError(f"{type(cb).__name__} cannot train beside {type(holders[0]).__name__} on the same Learner: "
                         f"both {what}. Keep one of them.")


def per_sample_loss_parts(loss_func, pred, *yb, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Learner's loss per sample as `(sums, counts)`, both of shape `(n,)`: the sum of each sample's
    element losses (one element for a classifier, T for a sequence of T tokens) and how many of them count,
    i.e. whose target is not the loss's `ignore_index`. Through fastai's `NoneReduce`.

    The wrapped loss's reductions are then exact: `sums.sum()` for 'sum', `sums.sum() / counts.sum()` for
    'mean' (ignored elements count in neither), and `sums / counts` is each sample's own mean loss.
    Works for fastai losses (`CrossEntropyLossFlat`, ...), `nn.*Loss` modules and functions that take
    `reduction=`.
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
    losses = losses.as_subclass(torch.Tensor).reshape(n, -1)
    ignore_index = getattr(loss_func, "ignore_index", None)
    target = yb[0] if yb and isinstance(yb[0], torch.Tensor) else None
    if (ignore_index is not None and target is not None and not target.is_floating_point()
            and target.numel() == losses.numel()):
        counts = (target.as_subclass(torch.Tensor).reshape(n, -1) != ignore_index).sum(1).to(losses.dtype)
    else:
        counts = torch.full((n,), float(losses.shape[1]), dtype=losses.dtype, device=losses.device)
    return losses.sum(1), counts


def per_sample_losses(loss_func, pred, *yb, n: int) -> torch.Tensor:
    """The Learner's loss, one value per sample (shape `(n,)`): each sample's mean over its elements
    that count (see `per_sample_loss_parts`); 0 for a sample whose every element is ignored."""
    sums, counts = per_sample_loss_parts(loss_func, pred, *yb, n=n)
    return sums / counts.clamp_min(1)


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


_fastai_with_events = getattr(Learner._with_events, "__wrapped__", Learner._with_events)  # not ours on re-import


def _with_events(self, f, event_type, ex, final=noop):
    # fastai fires no event when an exception other than its Cancel*Exception (an error, Ctrl-C) leaves a
    # fit, then removes the callbacks passed as `fit(cbs=...)`: fire its cancel event here, while they are
    # still attached, so that every callback restores what it changed (loss, loaders, weights) on any exit.
    if event_type != "fit":
        return _fastai_with_events(self, f, event_type, ex, final)
    try:
        return _fastai_with_events(self, f, event_type, ex, final)
    except BaseException as error:
        # Each callback on its own: one whose set-up never ran (fastai's MixUp when an earlier callback refused
        # in before_fit) may fail to clean up; that must neither hide the error nor skip the others' cleanup.
        for cb in self.cbs.sorted("order"):
            try:
                cb("after_cancel_fit")
            except Exception as cleanup:
                error.add_note(f"and {type(cb).__name__}.after_cancel_fit failed: {cleanup}")
        raise


_with_events.__wrapped__ = _fastai_with_events
Learner._with_events = _with_events


# Convenience methods, fastai style: `learn.save_checkpoint(name)`, `learn.load_checkpoint(name)`.
Learner.save_checkpoint = save_checkpoint
Learner.load_checkpoint = load_checkpoint
