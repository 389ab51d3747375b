"""Weight averaging in plain PyTorch: EMA, SWA and LAWA over `torch.optim.swa_utils.AveragedModel`.

Each averager keeps a copy of the model (`averager.module`, an `AveragedModel`'s module, on the model's
device) and an `update(model)` that folds the model's current weights into it with `torch._foreach_*`
ops: no host reads. The number of snapshots averaged is a host-side integer (it is known without looking
at the device), mirrored into the `AveragedModel`'s `n_averaged` buffer so that `torch.save` of the
`AveragedModel` stays meaningful.

>>> from torch import nn
>>> net = nn.Linear(2, 1)
>>> ema = EmaAverage(net, decay=0.9)
>>> ema.update(net)  # after each optimizer step
>>> ema.n_averaged
1
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn

from .distributed import collective_device, is_distributed

__all__ = ["EmaAverage", "LawaAverage", "SwaAverage", "WeightAverager", "average_across_ranks", "broadcast_buffers",
           "check_decay", "check_start_frac", "copy_tensors", "ema_decay", "model_tensors", "recompute_bn"]


def check_decay(decay: float) -> None:
    if not 0.0 < decay < 1.0:
        raise ValueError(f"decay must be in (0, 1), got {decay!r}")


def check_start_frac(start_frac: float) -> None:
    if not 0.0 <= start_frac < 1.0:
        raise ValueError(f"start_frac must be in [0, 1), got {start_frac!r}")


def ema_decay(decay: float, t: int, warmup: bool = True) -> float:
    """The decay of EMA update number `t` (t = snapshots already averaged, t >= 1).

    With `warmup` (TensorFlow's `ExponentialMovingAverage(num_updates=...)`, as in timm's ModelEma):
    `min(decay, (1 + t) / (10 + t))`, so the first updates move the average quickly and a short run is not
    dominated by its early weights: 0.18 at t=1, 0.5 at t=8, 0.9 at t=80, 0.99 at t=890.
    """
    return min(decay, (1.0 + t) / (10.0 + t)) if warmup else decay


def model_tensors(model: nn.Module, with_buffers: bool = True) -> list[torch.Tensor]:
    """The model's parameters then (optionally) buffers, detached, in a fixed order."""
    tensors = [p.detach() for p in model.parameters()]
    if with_buffers:
        tensors += [b.detach() for b in model.buffers()]
    return tensors


def copy_tensors(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """`dst[i].copy_(src[i])` for all i, foreach where the dtypes allow (device ops only)."""
    if dst:
        torch._foreach_copy_(dst, src)


def _split_float(avg: list[torch.Tensor], cur: list[torch.Tensor]):
    """(float avg, float cur, other avg, other cur): integer buffers (BatchNorm's num_batches_tracked)
    take the latest value, never an average."""
    fa, fc, ia, ic = [], [], [], []
    for a, c in zip(avg, cur):
        if a.is_floating_point():
            fa.append(a)
            fc.append(c)
        else:
            ia.append(a)
            ic.append(c)
    return fa, fc, ia, ic


class WeightAverager:
    """An averaged copy of a model and the number of snapshots in it; subclasses say how to fold one in.

    `with_buffers`: buffers (BatchNorm statistics) are averaged like the parameters (`use_buffers=True`
    of `AveragedModel`); otherwise they are copied from the model at each update.
    """

    def __init__(self, model: nn.Module, with_buffers: bool = True):
        self.averaged = AveragedModel(model, use_buffers=with_buffers)
        self.with_buffers = with_buffers
        self.n_averaged = 0
        self._n_params = len(list(self.module.parameters()))

    @property
    def module(self) -> nn.Module:
        """The averaged model (same class as the source model)."""
        return self.averaged.module

    def tensors(self) -> list[torch.Tensor]:
        return model_tensors(self.module)

    def to(self, device) -> WeightAverager:
        self.averaged.to(device)
        return self

    def _pairs(self, model: nn.Module):
        avg, cur = model_tensors(self.module), model_tensors(model)
        if len(avg) != len(cur):
            raise ValueError(f"the model has {len(cur)} parameters and buffers, its average {len(avg)}: "
                             "not the same architecture")
        return avg, cur

    def update(self, model: nn.Module) -> None:
        avg, cur = self._pairs(model)
        if self.n_averaged == 0:
            copy_tensors(avg, cur)
        else:
            averaged = len(avg) if self.with_buffers else self._n_params
            fa, fc, ia, ic = _split_float(avg[:averaged], cur[:averaged])
            self._fold(fa, fc)
            copy_tensors(ia + avg[averaged:], ic + cur[averaged:])
        self.n_averaged += 1
        self.averaged.n_averaged.fill_(self.n_averaged)

    def _fold(self, avg: list[torch.Tensor], cur: list[torch.Tensor]) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "n_averaged": self.n_averaged}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.n_averaged = int(state["n_averaged"])
        self.averaged.n_averaged.fill_(self.n_averaged)


class EmaAverage(WeightAverager):
    """Exponential moving average of the weights (and buffers), updated after every optimizer step.

    The first update copies the model; update t >= 1 does `avg = lerp(avg, model, 1 - ema_decay(decay, t))`
    (`torch._foreach_lerp_`, the kernel of `swa_utils.get_ema_multi_avg_fn`, with the warm-up decay of
    `ema_decay`). The decay is a Python float computed from the host-side counter: no device read.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        check_decay(decay)
        super().__init__(model, with_buffers=True)
        self.decay, self.warmup = decay, warmup

    @property
    def current_decay(self) -> float:
        """The decay the next update uses."""
        return ema_decay(self.decay, max(self.n_averaged, 1), self.warmup)

    def _fold(self, avg, cur):
        if avg:
            torch._foreach_lerp_(avg, cur, 1.0 - self.current_decay)


class SwaAverage(WeightAverager):
    """Stochastic weight averaging: the equal-weight mean of the snapshots given to `update` (epoch ends).

    Update n (n snapshots already in) does `avg += (model - avg) / (n + 1)`, which is
    `swa_utils.get_swa_multi_avg_fn`'s rule. Buffers are copied, not averaged: BatchNorm statistics of the
    averaged weights come from `recompute_bn` over the training data.
    """

    def __init__(self, model: nn.Module):
        super().__init__(model, with_buffers=False)

    def _fold(self, avg, cur):
        if avg:
            torch._foreach_lerp_(avg, cur, 1.0 / (self.n_averaged + 1))


class LawaAverage(WeightAverager):
    """Latest weight averaging (Kaddour 2022): the mean of the latest `k` snapshots (epoch ends).

    Keeps a ring of the k latest snapshots (parameters and buffers) on the model's device; `update` writes
    the newest over the oldest and recomputes the mean into `module` (k foreach adds: once per epoch).
    """

    def __init__(self, model: nn.Module, k: int = 5):
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        super().__init__(model, with_buffers=True)
        self.k = k
        self.ring: list[list[torch.Tensor]] = []  # oldest first

    def update(self, model: nn.Module) -> None:
        avg, cur = self._pairs(model)
        if len(self.ring) < self.k:
            self.ring.append([c.clone() for c in cur])
        else:  # reuse the oldest snapshot's memory for the newest
            oldest = self.ring.pop(0)
            copy_tensors(oldest, cur)
            self.ring.append(oldest)
        self.n_averaged = len(self.ring)
        self.averaged.n_averaged.fill_(self.n_averaged)
        fa, _, ia, ic = _split_float(avg, cur)
        if fa:
            float_idx = [i for i, a in enumerate(avg) if a.is_floating_point()]
            torch._foreach_zero_(fa)
            for snap in self.ring:
                torch._foreach_add_(fa, [snap[i] for i in float_idx])
            torch._foreach_div_(fa, float(len(self.ring)))
        copy_tensors(ia, ic)

    def state_dict(self) -> dict:
        return super().state_dict() | {"ring": [[t.clone() for t in snap] for snap in self.ring]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        device = next(iter(self.tensors())).device
        self.ring = [[t.to(device) for t in snap] for snap in state["ring"]]


def average_across_ranks(tensors: list[torch.Tensor]) -> None:
    """Replace float tensors by their mean over the ranks of the default process group (in place).
    Collective; nothing in a single process."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    dev = collective_device()
    for t in tensors:
        if t.is_floating_point():
            buf = t.to(dev, copy=True)
            dist.all_reduce(buf)
            t.copy_(buf / world)


def broadcast_buffers(*modules: nn.Module) -> None:
    """The modules' buffers replaced by rank 0's (in place). DDP broadcasts rank 0's buffers (BatchNorm
    statistics) at the start of every forward, so between forwards the other ranks hold rank 0's plus
    their own last batch; this is what the next forward would do. Collective; nothing in one process."""
    if not is_distributed():
        return
    dev = collective_device()
    for module in modules:
        for b in module.buffers():
            buf = b.detach().to(dev, copy=True)
            dist.broadcast(buf, 0)
            b.detach().copy_(buf)


def recompute_bn(model: nn.Module, inputs: Iterable[torch.Tensor], device=None) -> bool:
    """BatchNorm statistics of `model` recomputed over `inputs` (model inputs, one tensor per batch) with
    `torch.optim.swa_utils.update_bn` (a cumulative mean over the batches), then averaged over the ranks
    under DDP. Returns False (and does nothing) when the model has no BatchNorm layer."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return False
    update_bn(inputs, model, device=device)
    average_across_ranks([t for m in bns for t in (m.running_mean, m.running_var) if t is not None])
    return True
