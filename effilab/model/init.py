"""Initialisation schemes as fastai callbacks over `effilab.core.init`: applied once, at the start of the first
fit, and carried through checkpoints (a resumed fit does not initialise again)."""

from __future__ import annotations

import math

import torch
from fastai.torch_core import get_model

from ..callback import EffilabCallback
from ..core.init import _check_number, first_conv, fixup_, insert_gates, lsuv_, whiten_conv_
from ..core.residual import require_residual_blocks
from ..registry import register
from ._common import first_batch, rebuild_optimizer

__all__ = ["FixupInit", "InitCallback", "LSUVInit", "ResidualGates", "WhitenFirstConv"]


class InitCallback(EffilabCallback):
    """What the init callbacks share: `apply()` runs once, when the first fit starts training (epoch 0; not
    in `learn.validate()` or `lr_find`, which also fire `before_fit`), and again at the start of a later fit
    only with `reapply=True`. `applied` travels in checkpoints, so a fit resumed with `start_epoch > 0` keeps
    the loaded weights. Telemetry: meta with what `apply()` reported."""

    order = -10  # before anything that reads the model in before_train

    def __init__(self, reapply: bool = False):
        if not isinstance(reapply, bool):
            raise TypeError(f"reapply must be a bool, got {reapply!r}")
        self.reapply = reapply
        self.applied = False
        self._started = False

    @property
    def model(self):
        return get_model(self.learn.model)

    def check(self, model) -> None:
        """Raise a clear error before the fit does any work if the model does not suit."""

    def check_model(self, model) -> None:
        """`check`, under the name the bench calls on its model before any training."""
        self.check(model)

    def apply(self) -> dict:
        raise NotImplementedError

    def before_fit(self):
        self._started = False
        self.check(self.model)

    def before_train(self):
        if self._started or hasattr(self.learn, "lr_finder"):
            return
        self._started = True
        if self.learn.epoch != 0 or (self.applied and not self.reapply):
            return
        info = self.apply()
        self.applied = True
        self.telemetry.set_meta(self.telemetry_name, **info)

    def state_dict(self) -> dict:
        return {"applied": self.applied}

    def load_state_dict(self, state: dict) -> None:
        self.applied = bool(state["applied"])


class ResidualGates(InitCallback):
    """ReZero / SkipInit: a learnable scalar gate on every residual branch, `x + alpha * branch(x)`, with
    `alpha = init` (0: every block starts as the identity, so the signal passes unchanged at any depth).

    **What it does.** Inserts one scalar parameter per `ResidualBlock` of the model (effilab's
    `resnet_small`, `char_transformer`, or branches wrapped in `effilab.core.residual.Residual`) when the first
    fit starts, and rebuilds the optimizer so that the gates train (the other parameters keep their state).
    The gates stay in the model (export, checkpoints: `load_checkpoint` and `learn.load` recreate them).

    **Papers.** Bachlechner et al., "ReZero is All You Need", 2020 (12-layer Transformer on enwik8 56% faster
    to converge; ResNet-56 32% faster to 85% on CIFAR-10). De & Smith, "Batch Normalization Biases Residual
    Blocks Towards the Identity Function in Deep Networks" (SkipInit), NeurIPS 2020: a gate at 0 (or below
    1/sqrt(depth)) lets deep unnormalised ResNets train.

    **What it saves.** Nothing per step (one multiply per block). It may save steps to a target accuracy
    and lets deep networks without normalisation train at all; on shallow normalised models expect little.
    Measured (`benchmarks/model_depth_growth.py`, a 32-block residual MLP without normalisation, SGD): 30, 30,
    30 steps to 85% held-out accuracy over 3 seeds, against 40, 80, 70 with the default init (Fixup: 40, 40, 30).

    **Defaults.** `init=0.0` (ReZero's and SkipInit's choice).

    **Interactions.** A model without residual blocks is refused in `before_fit`. Growth copies a block's
    gate with it; stochastic depth scales the gated branch.
    """

    telemetry_name = "residual_gates"

    def __init__(self, init: float = 0.0, reapply: bool = False):
        super().__init__(reapply)
        self.init = _check_number(init, "init")

    def check(self, model):
        require_residual_blocks(model, "ResidualGates")

    def apply(self) -> dict:
        gates = insert_gates(self.model, self.init)
        if gates:
            rebuild_optimizer(self.learn)
        for block in require_residual_blocks(self.model, "ResidualGates"):
            block.gate.data.fill_(self.init)  # reapply: existing gates back to init
        return {"gates": len(require_residual_blocks(self.model, "ResidualGates")), "init": self.init}

    def prepare_load(self, state: dict) -> None:
        if state["applied"] and insert_gates(self.model, self.init):
            rebuild_optimizer(self.learn)


class FixupInit(InitCallback):
    """Fixup-style initialisation of a residual model: the last layer of every residual branch set to zero and
    the branch's other weight layers scaled by `L ** (-1 / (2m - 2))` (L branches, m layers per branch).

    **What it does.** Applies `effilab.core.init.fixup_` once when the first fit starts: every block then starts
    as the identity (its zeroed last layer still receives gradients), and the signal variance stays bounded in
    depth without relying on normalisation. With `multiplier=True` a learnable scalar multiplier (a gate at 1)
    is added to each branch, as in the paper.

    **Paper.** Zhang, Dauphin & Ma, "Fixup Initialization: Residual Learning Without Normalization", ICLR 2019
    (10,000-layer networks train; ResNets without BatchNorm match normalised ones). Not added: Fixup's scalar
    biases and the zero-initialised classifier (they need model-specific code).

    **What it saves.** Nothing per step; possibly steps to a target and the need for normalisation layers.
    Expect little on the shallow normalised models of the tests.

    **Defaults.** `multiplier=False` (no change to the architecture).
    """

    telemetry_name = "fixup"

    def __init__(self, multiplier: bool = False, reapply: bool = False):
        super().__init__(reapply)
        if not isinstance(multiplier, bool):
            raise TypeError(f"multiplier must be a bool, got {multiplier!r}")
        self.multiplier = multiplier

    def check(self, model):
        require_residual_blocks(model, "FixupInit")

    def apply(self) -> dict:
        rows = fixup_(self.model)
        if self.multiplier and insert_gates(self.model, 1.0):
            rebuild_optimizer(self.learn)
        return {"blocks": rows}

    def prepare_load(self, state: dict) -> None:
        if state["applied"] and self.multiplier and insert_gates(self.model, 1.0):
            rebuild_optimizer(self.learn)


class LSUVInit(InitCallback):
    """LSUV: layer-sequential unit-variance initialisation from one training batch.

    **What it does.** When the first fit starts, every Linear/Conv (registration order) gets an orthogonal
    weight, then is rescaled until its output on one training batch has standard deviation 1 (within `tol`,
    at most `max_iter` forwards per layer). The model runs in eval mode meanwhile (BatchNorm statistics
    untouched) and every module's mode and the hooks are restored; the batch is drawn with every random
    stream put back (the fit sees the same data order as without LSUV). Layers tied to an embedding are skipped.

    **Paper.** Mishkin & Matas, "All you need is a good init", ICLR 2016 (deep thin nets without BatchNorm
    train; similar accuracy to BN nets at lower cost per step).

    **What it saves.** Nothing per step; costs up to `max_iter + 1` forwards of one batch per layer once
    (telemetry meta `forward_only_samples`, which the bench's work column counts). May save steps to a
    target on networks without normalisation.

    **Defaults.** `tol=0.1`, `max_iter=10` (the reference implementation's), `seed=0` (orthogonal init).
    Telemetry meta `"lsuv"`: one row per layer {layer, std_before, std_after, iterations}.
    """

    telemetry_name = "lsuv"

    def __init__(self, tol: float = 0.1, max_iter: int = 10, seed: int = 0, reapply: bool = False):
        super().__init__(reapply)
        self.tol = _check_number(tol, "tol")
        if not self.tol > 0:
            raise ValueError(f"tol must be > 0, got {tol}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.max_iter, self.seed = max_iter, seed

    def apply(self) -> dict:
        xb = first_batch(self.learn.dls.train)[:getattr(self.learn.dls, "n_inp", 1)]
        x = xb[0].as_subclass(torch.Tensor)
        gen = torch.Generator(device=x.device).manual_seed(self.seed)
        rows = lsuv_(self.model, x, self.tol, self.max_iter, generator=gen)
        # Each layer's forwards of the whole model on the batch: work the bench counts (forward only).
        return {"layers": rows, "forward_only_samples": len(x) * sum(r["iterations"] + 1 for r in rows)}


class WhitenFirstConv(InitCallback):
    """airbench's whitening first convolution: the first Conv2d's filters become the principal directions
    of the training images' patches, scaled to unit variance, plus their negatives; the weight is then
    frozen for the fit (`freeze=True`).

    **What it does.** When the first fit starts, takes `n_images` training images (drawn without moving any
    random stream), computes the covariance of their k x k patches, and sets the first conv's first 2k'
    filters to `+-eigvec / sqrt(eigval + eps)` for the k' = min(out_channels/2, C*k*k) largest eigenvalues.
    With `freeze=True` the weight does not train during any fit with this callback (`requires_grad` is put
    back after each fit, also an interrupted one); the bias trains.

    **Source.** Keller Jordan's airbench (cifar10-airbench, `init_whiten`: 2x2 patches, eps=5e-4, frozen
    weights) and Page's ResNet-9 DAWNBench ladder (a fixed PCA-whitening conv cut time to 94% from 43 s to
    36 s on a V100).

    **What it saves.** Steps to a target accuracy (a better-conditioned input); with `freeze=True` also the
    first layer's weight gradient (small). Nothing per step otherwise. Its one-off cost, the covariance of
    the images' patches, runs no model pass, so the bench's work column (model passes) does not count it.

    **Defaults.** `n_images=5000` (airbench's), `eps=5e-4`, `freeze=True`. Telemetry meta `"whiten"`:
    {layer, eigenvalues}.
    """

    telemetry_name = "whiten"

    def __init__(self, n_images: int = 5000, eps: float = 5e-4, freeze: bool = True, reapply: bool = False):
        super().__init__(reapply)
        if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
            raise ValueError(f"n_images must be an int >= 1, got {n_images!r}")
        self.eps = _check_number(eps, "eps")
        if not self.eps > 0 or not math.isfinite(self.eps):
            raise ValueError(f"eps must be > 0, got {eps}")
        if not isinstance(freeze, bool):
            raise TypeError(f"freeze must be a bool, got {freeze!r}")
        self.n_images, self.freeze = n_images, freeze
        self._frozen = None

    def check(self, model):
        first_conv(model)

    def _images(self):
        dl = self.learn.dls.train
        ds = dl.dataset
        n = min(self.n_images, len(ds))
        items = [ds[i][0] for i in range(n)]  # the first n images: no random stream touched
        return torch.stack([torch.as_tensor(x) for x in items]).to(self.model_device())

    def model_device(self):
        return next(self.model.parameters()).device

    def apply(self) -> dict:
        conv = first_conv(self.model)
        eig = whiten_conv_(conv, self._images(), self.eps)
        name = next(n for n, m in self.model.named_modules() if m is conv)
        return {"layer": name, "eigenvalues": [float(e) for e in eig]}  # sync-ok: once

    def before_train(self):
        super().before_train()
        if self.freeze and self._frozen is None:
            conv = first_conv(self.model)
            self._frozen = (conv.weight, conv.weight.requires_grad)
            conv.weight.requires_grad_(False)

    def _unfreeze(self):
        if self._frozen is not None:
            weight, flag = self._frozen
            weight.requires_grad_(flag)
            self._frozen = None

    def after_fit(self):
        self._unfreeze()

    def after_cancel_fit(self):
        self._unfreeze()


register("rezero", lambda: ResidualGates(init=0.0), "model", stateful=False, task="sequence",
         keeps_model_changes=True)
register("fixup", lambda: FixupInit(), "model", stateful=False, task="sequence")
register("lsuv", lambda: LSUVInit(tol=0.1, max_iter=5), "model", stateful=False, task="tabular")
register("whiten_first_conv", lambda: WhitenFirstConv(n_images=256), "model", stateful=False, task="image",
         inputs=("image",))
