"""Progressive layer freezing on modules: the model's layers in forward order, a schedule of progress that
says how many of the first layers are frozen, and a freezer that freezes a prefix and gives it all back.

Plain PyTorch only. References: Brock et al., "FreezeOut: Accelerate Training by Progressively Freezing
Layers", arXiv 1706.04983; MosaicML Composer's LayerFreezing.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["PrefixCache", "PrefixFreezer", "check_schedule", "forward_layers", "freeze_points", "frozen_count"]

_CONTAINERS = (nn.Sequential, nn.ModuleList)


def forward_layers(model: nn.Module, names: list[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The model's layers in forward order, as (name, module).

    Default: the model's children in registration order, containers (`nn.Sequential`, `nn.ModuleList`)
    opened up, modules without parameters left out. That is the forward order of sequential models and of
    most others (embedding, blocks, norm, head); for a model whose forward runs its children in another
    order, pass `names` (module names in forward order, e.g. `["stem", "layer1", "layer2"]`)."""
    modules = dict(model.named_modules())
    if names is not None:
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise TypeError(f"layers must be a list of module names, got {names!r}")
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"layers {missing} are not modules of the model; some of its modules: "
                             f"{[n for n in modules if n][:12]}")
        return [(n, modules[n]) for n in names]

    def walk(module: nn.Module, prefix: str):
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if isinstance(child, _CONTAINERS):
                yield from walk(child, full + ".")
            elif any(True for _ in child.parameters()):
                yield full, child

    return list(walk(model, ""))


def check_schedule(start, end) -> None:
    for name, value in (("start", start), ("end", end)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TypeError(f"{name} must be a finite number (a fraction of training), got {value!r}")
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(f"need 0 <= start < end <= 1 (fractions of training), got start={start}, end={end}")


def freeze_points(n_freeze: int, start: float, end: float) -> list[float]:
    """Progress at which layer k (k < n_freeze) freezes: evenly spaced from `start`, the last before `end`."""
    return [start + (end - start) * k / n_freeze for k in range(n_freeze)]


def frozen_count(progress: float, n_freeze: int, start: float, end: float) -> int:
    """How many of the first layers are frozen at `progress` in [0, 1]: none before `start`, then one more
    at each of `freeze_points`, all `n_freeze` from the last point on."""
    if n_freeze == 0 or progress < start:
        return 0
    return min(n_freeze, math.floor((progress - start) / (end - start) * n_freeze + 1e-9) + 1)


class PrefixFreezer:
    """Freezes the first `n` of `layers` (requires_grad False, gradients dropped, BatchNorm in eval mode) and
    restores exactly what it found (each parameter's requires_grad, each norm layer's mode).

    A parameter shared with a layer after the prefix (tied input/output embeddings) is not frozen.
    Frozen parameters stay where they are (in the model and the optimiser, whose state is kept): with no
    gradient the optimiser skips them, and checkpoints keep their shapes. Once the inputs of layer `n` do
    not require grad, autograd records nothing before it: the backward pass stops at the first trainable
    layer by itself.
    """

    def __init__(self, layers: list[tuple[str, nn.Module]]):
        self.layers = layers
        self.n_frozen = 0
        self._saved_requires_grad: dict[nn.Parameter, bool] = {}

    def _norms(self, n: int):
        for _, layer in self.layers[:n]:
            for m in layer.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    yield m

    def freeze_to(self, n: int) -> list[int]:
        """Make exactly the first `n` layers frozen; returns the indices newly frozen."""
        if not 0 <= n <= len(self.layers):
            raise ValueError(f"cannot freeze {n} of {len(self.layers)} layers")
        newly = list(range(self.n_frozen, n))
        # A parameter shared with a layer that still trains (tied embeddings) keeps training.
        still_training = {p for _, layer in self.layers[n:] for p in layer.parameters()}
        for i in newly:
            for p in self.layers[i][1].parameters():
                if p in still_training:
                    continue
                self._saved_requires_grad.setdefault(p, p.requires_grad)
                p.requires_grad_(False)
                p.grad = None
        if n < self.n_frozen:  # fewer frozen than before (a new fit): thaw the rest
            for i in range(n, self.n_frozen):
                for p in self.layers[i][1].parameters():
                    if p in self._saved_requires_grad:
                        p.requires_grad_(self._saved_requires_grad.pop(p))
        self.n_frozen = n
        self.norms_to_eval()
        return newly

    def norms_to_eval(self) -> None:
        """Frozen BatchNorm layers normalise with their running statistics and stop updating them
        (`model.train()` at each epoch start switches them back: call this after it)."""
        for m in self._norms(self.n_frozen):
            m.eval()

    def restore(self, training: bool) -> None:
        """Thaw everything: each parameter's own requires_grad, and the norm layers' mode `training`."""
        for m in self._norms(self.n_frozen):
            m.train(training)
        for p, requires_grad in self._saved_requires_grad.items():
            p.requires_grad_(requires_grad)
        self._saved_requires_grad.clear()
        self.n_frozen = 0


class PrefixCache:
    """The frozen prefix's output per training sample, on the device: written the first time a sample passes
    through the prefix, read afterwards instead of computing it.

    Only valid while the prefix is frozen (its weights and BatchNorm statistics fixed) and every sample's
    input is the same each epoch (no augmentation, no mixing): the caller checks. Which samples are
    filled is host-side bookkeeping over host indices (they come from the sampler), so reads and writes
    never sync with the device. `reset(depth)` empties it for a new prefix depth.
    """

    def __init__(self, n_samples: int):
        self.n = int(n_samples)
        self.depth = 0
        self.store = None
        self._filled: set[int] = set()

    def reset(self, depth: int) -> None:
        self.depth, self.store = depth, None
        self._filled.clear()

    def missing(self, idx: list[int]) -> list[int]:
        """Positions in `idx` of the samples not stored yet."""
        return [pos for pos, i in enumerate(idx) if i not in self._filled]

    def write(self, idx: list[int], out) -> None:
        if self.store is None:
            self.store = torch.empty((self.n, *out.shape[1:]), dtype=out.dtype, device=out.device)
        self.store.index_copy_(0, torch.tensor(idx, device=out.device), out.detach())
        self._filled.update(idx)

    def read(self, idx: list[int]):
        return self.store.index_select(0, torch.tensor(idx, device=self.store.device))

    @property
    def filled(self) -> int:
        return len(self._filled)
