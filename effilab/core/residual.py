"""The residual-block protocol that stochastic depth, residual gates (ReZero/SkipInit), Fixup and model growth
work on: a block computes `shortcut(x) + gate * branch(x)` and says which layers end and make up its branch.

Any model built from `ResidualBlock`s (effilab's `resnet_small` and `char_transformer`, or any model whose
residual branches are wrapped in `Residual(branch)`) gets these techniques without changes to its code.
"""

from __future__ import annotations

from torch import nn

__all__ = ["NotResidualError", "Residual", "ResidualBlock", "require_residual_blocks", "residual_blocks"]

WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class NotResidualError(TypeError):
    """The model has no `ResidualBlock`s for a technique that needs them."""


class ResidualBlock(nn.Module):
    """A residual block: `forward(x) = shortcut(x) + gate * branch(x)`.

    Subclasses implement `branch` (and `shortcut` when it is not the identity) and may override
    `branch_layers` (the weight layers of the branch in forward order; default: every Linear/Conv in the
    branch's submodules, registration order) and `last_layers` (the layers whose zeroing makes the branch
    output zero; default: the last of `branch_layers`), and `widen_pairs` for Net2WiderNet growth.

    `gate` is an optional learnable scalar (None until `effilab.core.init.insert_gates` adds one). A depth
    controller (`effilab.core.depth`) may take over the forward through `depth_hook` during training.
    """

    def __init__(self):
        super().__init__()
        self.register_parameter("gate", None)
        self.depth_hook = None  # callable(block, x) -> output, set by stochastic depth during a fit

    def branch(self, x):
        raise NotImplementedError

    def shortcut(self, x):
        return x

    @property
    def identity_shortcut(self) -> bool:
        """True when the shortcut is the identity (the block keeps the input's shape)."""
        return type(self).shortcut is ResidualBlock.shortcut

    def branch_layers(self) -> list[nn.Module]:
        return [m for m in self.modules() if m is not self and isinstance(m, WEIGHT_LAYERS)]

    def last_layers(self) -> list[nn.Module]:
        layers = self.branch_layers()
        return layers[-1:]

    def widen_pairs(self) -> list[tuple[nn.Module, list[nn.Module], nn.Module]]:
        """(layer producing hidden units, per-unit layers between (BatchNorm), layer consuming them) triples
        whose hidden width can grow without changing the block's input or output (Net2WiderNet)."""
        return []

    def scaled_branch(self, f):
        return f if self.gate is None else f * self.gate.to(f.dtype)

    def forward(self, x):
        if self.depth_hook is not None and self.training:
            return self.depth_hook(self, x)
        return self.shortcut(x) + self.scaled_branch(self.branch(x))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint of a gated model loads into an ungated one of the same architecture (load_learner,
        # learn.load): the gate is created first (its value comes from the checkpoint).
        if self.gate is None and prefix + "gate" in state_dict:
            from .init import insert_gates

            insert_gates(self, float("nan"))  # overwritten by the checkpoint's value just below
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __getstate__(self):
        # Never pickle a fit's controller with the model (learn.export mid-fit, deepcopy during growth).
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["depth_hook"] = None
        return state


class Residual(ResidualBlock):
    """`x + branch(x)` (or `shortcut(x) + branch(x)`) around any module: makes a plain model's residual
    branches visible to stochastic depth, gates, Fixup and growth.

    >>> block = Residual(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)))
    """

    def __init__(self, branch: nn.Module, shortcut: nn.Module | None = None):
        super().__init__()
        if not isinstance(branch, nn.Module):
            raise TypeError(f"branch must be an nn.Module, got {type(branch).__name__}")
        self.body = branch
        self.skip = shortcut

    def branch(self, x):
        return self.body(x)

    def shortcut(self, x):
        return x if self.skip is None else self.skip(x)

    @property
    def identity_shortcut(self) -> bool:
        return self.skip is None

    def branch_layers(self) -> list[nn.Module]:
        return [m for m in self.body.modules() if isinstance(m, WEIGHT_LAYERS)]


def residual_blocks(model: nn.Module) -> list[ResidualBlock]:
    """The model's residual blocks in registration order (outermost first; a block nested in a block counts
    as its own block)."""
    return [m for m in model.modules() if isinstance(m, ResidualBlock)]


def require_residual_blocks(model: nn.Module, technique: str) -> list[ResidualBlock]:
    blocks = residual_blocks(model)
    if not blocks:
        raise NotResidualError(
            f"{technique} needs a residual model, but {type(model).__name__} has no ResidualBlock. Build it from "
            "effilab.core.residual.ResidualBlock subclasses or wrap each residual branch as Residual(branch) "
            "(forward = x + branch(x)), or use effilab.datasets.resnet_small / char_transformer.")
    return blocks
