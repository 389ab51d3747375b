"""Function-preserving model growth on residual models: deepening (Net2DeeperNet / progressive stacking with
an identity-initialised copy) and widening (Net2WiderNet), checked numerically, with a map from the new
parameters to the old ones so that optimiser state can follow.

Deepening inserts, after a block with an identity shortcut, a copy of it whose branch output is zero (its gate
set to 0 if it has one, else its `last_layers()` zeroed): the model computes the same function and the copy
starts from trained features. Widening replicates hidden units of a block's `widen_pairs()` (the producing
layer's rows, the per-unit BatchNorm entries) and splits each unit's outgoing weights between its copies
(fractions summing to one, made unequal by `noise` to break the symmetry): the same function again.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .residual import ResidualBlock, require_residual_blocks

__all__ = ["GrowthError", "check_preserved", "deepen_", "train_flops_per_sample", "widen_"]


class GrowthError(ValueError):
    """A growth operation that cannot preserve the model's function (or cannot be applied to this model)."""


def _parent_and_key(model: nn.Module, module: nn.Module) -> tuple[nn.Module, str]:
    for parent in model.modules():
        for key, child in parent._modules.items():
            if child is module:
                return parent, key
    raise GrowthError(f"{type(module).__name__} is not a submodule of {type(model).__name__}")


def _insert_after(parent: nn.Module, key: str, new: nn.Module) -> None:
    if not isinstance(parent, (nn.Sequential, nn.ModuleList)):
        raise GrowthError(f"cannot insert a block into {type(parent).__name__}: deepening needs the blocks to sit in "
                          "an nn.Sequential or nn.ModuleList (which define the forward order)")
    children = list(parent._modules.values())
    keys = list(parent._modules)
    children.insert(keys.index(key) + 1, new)
    parent._modules.clear()
    for i, child in enumerate(children):
        parent._modules[str(i)] = child


@torch.no_grad()
def deepen_(model: nn.Module, block: ResidualBlock) -> ResidualBlock:
    """Insert after `block` a copy of it whose residual branch outputs zero (function-preserving). Returns the
    new block. `block` must keep its input's shape (identity shortcut) and sit in an nn.Sequential/ModuleList."""
    if not isinstance(block, ResidualBlock):
        raise GrowthError(f"deepening copies a ResidualBlock, got {type(block).__name__}")
    if not block.identity_shortcut:
        raise GrowthError(f"cannot deepen after {type(block).__name__}: its shortcut is not the identity (it changes "
                          "the shape), so a copy would not fit after it; deepen after a shape-keeping block")
    parent, key = _parent_and_key(model, block)
    new = copy.deepcopy(block)
    if new.gate is not None:
        new.gate.zero_()
    else:
        last = new.last_layers()
        if not last:
            raise GrowthError(f"{type(block).__name__} names no last layer to zero and has no gate: add gates "
                              "(effilab.core.init.insert_gates) or override ResidualBlock.last_layers()")
        for layer in last:
            layer.weight.zero_()
            if getattr(layer, "bias", None) is not None:
                layer.bias.zero_()
    _insert_after(parent, key, new)
    return new


def _moment_scale(name: str, frac: torch.Tensor, state_value: torch.Tensor) -> torch.Tensor:
    """Optimiser moments of a replicated unit's incoming weights: gradients there scale with the unit's share
    of its outgoing weights, so first moments scale by it and second moments (names with 'sq') by its square.
    Adam's update `m / sqrt(v)` is then exactly the old unit's."""
    f = frac if "sq" not in name.lower() else frac * frac
    return state_value * f.view(-1, *([1] * (state_value.dim() - 1))).to(state_value)


def _set_param(module: nn.Module, name: str, value: torch.Tensor) -> nn.Parameter:
    old = getattr(module, name)
    new = nn.Parameter(value.contiguous(), requires_grad=old.requires_grad)
    setattr(module, name, new)
    return new


@torch.no_grad()
def widen_(block: ResidualBlock, factor: float = 2.0, generator: torch.Generator | None = None,
           noise: float = 0.0) -> dict:
    """Net2WiderNet on each of `block.widen_pairs()`: the hidden width `n` becomes `ceil(n * factor)`; the extra
    units copy randomly chosen old ones. Returns `{new parameter: (old parameter, fn)}` where `fn` maps the
    old parameter's optimiser state (a dict) to the new one's."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 1:
        raise GrowthError(f"factor must be a number > 1 (the width multiplier), got {factor!r}")
    pairs = block.widen_pairs()
    if not pairs:
        raise GrowthError(f"{type(block).__name__} declares no widen_pairs(): nothing can be widened "
                          "function-preservingly in it")
    migrate = {}
    for producer, per_unit, consumer in pairs:
        n_old = producer.weight.shape[0]
        n_new = math.ceil(n_old * factor)
        if n_new <= n_old:
            raise GrowthError(f"factor {factor} does not add a unit to a width of {n_old}")
        for norm in per_unit:
            if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
                raise GrowthError(f"{type(norm).__name__} between the widened layers normalises across units: "
                                  "replicating units would change its output (only BatchNorm is per-unit)")
        device = producer.weight.device
        extra = torch.randint(0, n_old, (n_new - n_old,), generator=generator)
        g = torch.cat([torch.arange(n_old), extra])
        counts = torch.bincount(g, minlength=n_old).double()
        frac = 1.0 / counts[g]
        if noise:
            frac = frac * (1.0 + noise * torch.randn(n_new, generator=generator, dtype=torch.float64))
        frac = frac / torch.zeros(n_old, dtype=torch.float64).index_add_(0, g, frac)[g]  # copies sum to one
        g, frac = g.to(device), frac.to(device)

        def rows(state, shape, frac=frac, g=g):
            out = {}
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(shape):
                    out[k] = _moment_scale(k, frac, v.index_select(0, g))
                else:
                    out[k] = v
            return out

        def cols(state, shape, g=g):
            return {k: v.index_select(1, g) if isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(shape) else v
                    for k, v in state.items()}

        for module in (producer, *per_unit):
            for name in ("weight", "bias"):
                old = getattr(module, name, None)
                if old is None:
                    continue
                new = _set_param(module, name, old.index_select(0, g))
                migrate[new] = (old, lambda s, shape=tuple(old.shape), f=rows: f(s, shape))
            for name in ("running_mean", "running_var"):
                buf = getattr(module, name, None)
                if buf is not None:
                    setattr(module, name, buf.index_select(0, g))
        old = consumer.weight
        scale = frac.view(1, -1, *([1] * (old.dim() - 2))).to(old.dtype)
        new = _set_param(consumer, "weight", old.index_select(1, g) * scale)
        migrate[new] = (old, lambda s, shape=tuple(old.shape), f=cols: f(s, shape))
        for module in (producer, *per_unit):
            for attr in ("out_features", "out_channels", "num_features"):
                if hasattr(module, attr):
                    setattr(module, attr, n_new)
        for attr in ("in_features", "in_channels"):
            if hasattr(consumer, attr):
                setattr(consumer, attr, n_new)
    return migrate


@torch.no_grad()
def check_preserved(before: torch.Tensor, after: torch.Tensor, tol: float = 1e-5, what: str = "growth") -> float:
    """The largest absolute change of the outputs (relative to their scale when above 1); raises GrowthError
    above `tol`. One host read (growth happens a few times per fit)."""
    scale = max(1.0, float(before.abs().max()))  # sync-ok: once per growth event
    diff = float((after.float() - before.float()).abs().max()) / scale  # sync-ok: once per growth event
    if not diff <= tol:
        raise GrowthError(f"{what} changed the model's outputs by {diff:.3g} (> tol={tol:g}): it does not preserve "
                          "the function. Blocks whose branch ends in a normalisation (zeroing the last layer leaves "
                          "its bias) need gates: add ResidualGates (or effilab.core.init.insert_gates) first, "
                          "then growth zeroes the new block's gate.")
    return diff


def eval_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's output on `x` in eval mode (no BatchNorm update, no dropout), train/eval flags restored."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            return model(x)
    finally:
        for m, flag in flags:
            m.training = flag


def train_flops_per_sample(model: nn.Module, x: torch.Tensor, loss_func=None) -> float:
    """Training FLOPs (forward + backward) per sample of `model` on the batch `x`, counted by
    `torch.utils.flop_counter.FlopCounterMode` on a copy (the model, its statistics and the random streams
    are untouched)."""
    probe = copy.deepcopy(model)
    probe.train()
    for p in probe.parameters():
        p.requires_grad_(True)
    with torch.random.fork_rng(devices=[]) if x.device.type == "cpu" else contextlib.nullcontext():
        with FlopCounterMode(display=False) as counter:
            out = probe(x)
            loss = out.float().pow(2).mean() if loss_func is None else loss_func(out)
            loss.backward()
    return counter.get_total_flops() / x.shape[0]


def grow_blocks(model: nn.Module, op: str, factor: float, generator: torch.Generator, noise: float) -> dict:
    """One growth event over the whole model: `op="deepen"` inserts a zero-branch copy after every block with an
    identity shortcut (progressive stacking's doubling); `op="widen"` widens every block that declares
    `widen_pairs()` by `factor`. Returns the parameter migration map (empty for deepening)."""
    blocks = require_residual_blocks(model, "model growth")
    if op == "deepen":
        targets = [b for b in blocks if b.identity_shortcut]
        if not targets:
            raise GrowthError("no residual block keeps its input's shape (identity shortcut): nothing to deepen after")
        for b in targets:
            deepen_(model, b)
        return {}
    if op == "widen":
        targets = [b for b in blocks if b.widen_pairs()]
        if not targets:
            raise GrowthError("no residual block declares widen_pairs(): nothing can be widened")
        migrate = {}
        for b in targets:
            migrate.update(widen_(b, factor, generator, noise))
        return migrate
    raise ValueError(f"op must be 'deepen' or 'widen', got {op!r}")
