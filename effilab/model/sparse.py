"""Dynamic sparse training (RigL, SET) as a fastai callback over `effilab.core.sparse.DynamicSparsity`."""

from __future__ import annotations

import math
import time

import torch
from fastai.optimizer import OptimWrapper
from fastai.torch_core import get_model

from ..callback import EffilabCallback
from ..core.distributed import broadcast_from_rank0
from ..core.infobatch import derive_seed
from ..core.sparse import DynamicSparsity, check_density, cosine_drop_fraction, sparse_layers
from ..registry import register

__all__ = ["DynamicSparse", "RigL", "SET"]


def optimizer_state(opt):
    """The per-parameter state dict of a fastai `Optimizer` or of the torch optimizer in an `OptimWrapper`."""
    return opt.opt.state if isinstance(opt, OptimWrapper) else opt.state


def _dense_flops_hook(store: dict, name: str):
    """Forward multiply-add FLOPs of one sample through a Linear/Conv layer, from shapes only (no device read)."""

    def hook(module, args, out):
        per_output = module.in_features if hasattr(module, "in_features") else (
            module.in_channels // module.groups * math.prod(module.kernel_size))
        store[name] = 2 * out.numel() // max(out.shape[0], 1) * per_output
    return hook


class DynamicSparse(EffilabCallback):
    """Dynamic sparse training: a fixed fraction of the weights trains, and which ones changes during the fit.

    **What it does.** Keeps a boolean mask per weight of the model's `nn.Linear` and `nn.Conv1d/2d/3d`
    layers, on the training device (per-layer densities by Erdos-Renyi-Kernel, `distribution="erk"`, or
    uniform). Before every optimizer step the gradients are masked; after it the weights are, so pruned
    weights stay exactly zero. Every `delta_t` steps, until `end_frac` of the fit, each sparse layer drops
    the fraction `alpha/2 * (1 + cos(pi * progress / end_frac))` of its active weights with the smallest
    magnitude and regrows as many: **RigL** where the dense gradient is largest, **SET** at random. Regrown
    weights start at zero, and every optimizer-state tensor shaped like a weight (Adam's moments, momentum)
    is masked too: zero for the regrown, kept at zero for the dropped. All on the device (multiplications
    and `topk`); no host read per step.

    **Papers.** Evci, Gale, Menick, Castro & Elsen, "Rigging the Lottery: Making All Tickets Winners",
    ICML 2020 (RigL, ERK); Mocanu et al., "Scalable training of artificial neural networks with adaptive
    sparse connectivity inspired by network science", Nature Communications 2018 (SET).

    **Defaults and why.** `density=0.1` (90% sparse, RigL's headline setting), ERK (more density for small
    layers, which RigL found better than uniform at the same count), `delta_t=100`, `alpha=0.3`,
    `end_frac=0.75` (RigL's ImageNet/MNIST settings). `seed` (default: the run's torch seed, shared by all
    ranks) draws the initial masks and SET's regrowth. For short fits lower `delta_t` so that updates happen.

    **What it SAVES: nothing measurable here.** The masked layers still run dense kernels on CPU and GPU:
    wall-clock and memory are those of the dense model (plus the masks). What falls is the *theoretical*
    FLOPs count of the sparse layers (dense FLOPs x density per layer), which only sparse kernels or
    hardware would turn into time. It is the accuracy at that parameter count that RigL/SET are about;
    telemetry reports density, theoretical FLOPs and measured time side by side.

    **Interactions.** Runs after `MixedPrecision` unscales the gradients (order 12), after SAM's second
    pass, and not on steps `GradientAccumulation` skips. RigL's dense gradient costs nothing extra here:
    the masked layers compute it at every step anyway; it is read only at update steps, before masking. It
    is the gradient the optimizer would use (all-reduced under DDP, so every rank picks the same
    connections; SET's generator is seeded alike on every rank). The packed in-projection of
    `nn.MultiheadAttention` and embeddings stay dense; a weight tied to a sparse layer (a tied LM head)
    is made sparse with it. Weight averaging (EMA/SWA/LAWA) averages sparse snapshots whose masks
    differ: its result is not sparse. Inactive in `lr_find`.

    **Telemetry** (source `"sparse"`). Meta: `method`, `layers`, `shapes`, `numels`, `densities`,
    `density`, `dense_flops` (forward FLOPs per sample of each sparse layer, measured on the first batch),
    `sparse_flops`, `flops_fraction`. Stream `"epoch"`: `fit`, `epoch`, `step`, `updates`, `density`,
    `densities`, `flops_fraction`. Stream `"update"`: `fit`, `step`, `fraction`, `churn` (per sparse
    layer, the fraction of its active weights that are new), `skipped` (the layers RigL left as they were
    because they had no gradient at that step: frozen by `LayerFreezing`, or in a block stochastic depth
    dropped). Stream `"first_layer"`: `epoch`, `shape` and
    `in_degree` (surviving connections per input unit of the first layer, flat: reshape it to the image;
    also `cb.first_layer_mask()`). Stream `"timing"` (this machine's clock, so not identical across
    ranks): `epoch`, `train_s`, `steps`.
    """

    order = 12  # after SAM (8) and MixedPrecision's unscaling (10)
    method = "rigl"
    telemetry_name = "sparse"

    def __init__(self, density: float = 0.1, distribution: str = "erk", delta_t: int = 100, alpha: float = 0.3,
                 end_frac: float = 0.75, seed: int | None = None):
        check_density(density)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        self.kwargs = dict(density=density, method=self.method, distribution=distribution, delta_t=delta_t,
                           alpha=alpha, end_frac=end_frac)
        # Check every argument now, before any fit, on a throwaway layer.
        DynamicSparsity(torch.nn.Linear(2, 2), seed=0, **self.kwargs)
        self.seed = int(torch.initial_seed() % 2**63) if seed is None else seed
        self.sparsity: DynamicSparsity | None = None
        self.fit_count = 0
        self.dense_flops: list[int] | None = None
        self._pending: list = []
        self._in_fit = False
        self._hooks: list = []

    # -- helpers
    @property
    def _opt_state(self):
        return optimizer_state(self.learn.opt)

    def first_layer_mask(self) -> torch.Tensor:
        """The first sparse layer's mask (bool, on the CPU): the connections that survive."""
        return self.sparsity.masks[0].detach().cpu()  # sync-ok: called by the user, not per step

    # -- events
    def before_fit(self):
        self._in_fit = False
        self._remove_hooks()  # left by a fit that an exception ended without any event

    def before_train(self):
        if hasattr(self.learn, "lr_finder") or self._in_fit:
            self._t0 = time.perf_counter()
            return
        self._in_fit = True
        model = get_model(self.learn.model)
        if self.sparsity is None:
            (self.seed,) = broadcast_from_rank0([self.seed])  # every rank draws the same masks
            self.sparsity = DynamicSparsity(model, seed=self.seed, **self.kwargs)
        self.sparsity.bind(model)
        if self.learn.epoch == 0:  # a new fit (not one resumed mid-way): the schedule starts again
            self.sparsity.step = 0
            self.sparsity.seed = self.seed if self.fit_count == 0 else derive_seed(self.seed, self.fit_count)
        self.sparsity.after_step(self._opt_state)
        self._pending = []
        if self.dense_flops is None:
            self._flops = {}
            layers = sparse_layers(model)
            self._hooks = [layers[n].register_forward_hook(_dense_flops_hook(self._flops, n))
                           for n in self.sparsity.names]
        self.telemetry.set_meta(self.telemetry_name, method=self.method, layers=list(self.sparsity.names),
                                shapes=[list(p.shape) for p in self.sparsity.params], numels=self.sparsity.numels,
                                densities=self.sparsity.densities, density=self.sparsity.overall_density)
        self._t0 = time.perf_counter()

    def after_pred(self):
        if self._hooks:
            self._remove_hooks()
            self.dense_flops = [self._flops.get(n, 0) for n in self.sparsity.names]
            self.telemetry.set_meta(self.telemetry_name, dense_flops=self.dense_flops, **self._flops_summary())

    def before_step(self):
        if not self._in_fit or not self.training:
            return
        progress = self.learn.pct_train
        step = self.sparsity.step + 1
        churn = self.sparsity.before_step(progress, self._opt_state)
        if churn is not None:
            fraction = cosine_drop_fraction(progress, self.sparsity.alpha, self.sparsity.end_frac)
            self._pending.append((step, fraction, churn, list(self.sparsity.skipped)))

    def after_step(self):
        if self._in_fit and self.training:
            self.sparsity.after_step()

    def after_train(self):
        if not self._in_fit or hasattr(self.learn, "lr_finder"):
            return
        train_s = time.perf_counter() - self._t0
        sp = self.sparsity
        self._report_updates()
        self.telemetry.record(self.telemetry_name, "epoch", fit=self.fit_count, epoch=self.learn.epoch, step=sp.step,
                              updates=sp.n_updates, density=sp.overall_density, densities=sp.densities,
                              flops_fraction=self._flops_summary().get("flops_fraction"))
        mask = sp.masks[0]
        in_degree = mask.sum(0)  # per input feature (Linear) or per (c_in, kernel tap) (Conv)
        self.telemetry.record(self.telemetry_name, "first_layer", fit=self.fit_count, epoch=self.learn.epoch,
                              layer=sp.names[0], shape=list(in_degree.shape),
                              in_degree=in_degree.flatten().tolist())  # sync-ok: once per epoch
        self.telemetry.record(self.telemetry_name, "timing", fit=self.fit_count, epoch=self.learn.epoch,
                              train_s=train_s, steps=sp.step)

    def _report_updates(self):
        if self._pending:
            stacked = torch.stack([torch.stack(c) if c else torch.zeros(0) for _, _, c, _ in self._pending])
            churns = stacked.tolist()  # sync-ok: once per epoch
            for (step, fraction, _, skipped), churn in zip(self._pending, churns):
                self.telemetry.record(self.telemetry_name, "update", fit=self.fit_count, step=step,
                                      fraction=fraction, churn=churn, skipped=skipped)
            self._pending = []

    def after_fit(self):
        self._remove_hooks()
        self._report_updates()  # those of an epoch cut short by a cancelled fit
        if self._in_fit:
            self.fit_count += 1
        self._in_fit = False

    def after_cancel_fit(self):
        self.after_fit()

    def _remove_hooks(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _flops_summary(self) -> dict:
        if self.dense_flops is None or self.sparsity is None:
            return {}
        dense = sum(self.dense_flops)
        sparse = self.sparsity.theoretical_flops(self.dense_flops)
        return {"sparse_flops": sparse, "flops_fraction": sparse / dense if dense else None}

    # -- state
    def state_dict(self) -> dict:
        return {"seed": self.seed, "fit_count": self.fit_count, "dense_flops": self.dense_flops,
                "sparsity": None if self.sparsity is None else self.sparsity.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.fit_count, self.dense_flops = state["seed"], state["fit_count"], state["dense_flops"]
        self.sparsity = None
        if state["sparsity"] is not None:
            self.sparsity = DynamicSparsity(get_model(self.learn.model), seed=self.seed, apply=False, **self.kwargs)
            self.sparsity.load_state_dict(state["sparsity"])

    def __getstate__(self):  # hooks don't pickle (an export taken mid-fit)
        return {k: v for k, v in self.__dict__.items() if k != "_hooks"} | {"_hooks": []}


class RigL(DynamicSparse):
    __doc__ = DynamicSparse.__doc__.replace("Dynamic sparse training:", "RigL, dynamic sparse training:", 1)
    method = "rigl"


class SET(DynamicSparse):
    __doc__ = DynamicSparse.__doc__.replace("Dynamic sparse training:", "SET, dynamic sparse training:", 1)
    method = "set"


# Small settings for the generic suite: updates every 4 steps (16 steps per epoch there).
register("sparse_rigl", lambda: RigL(density=0.3, delta_t=4, seed=0), "model", stateful=True)
register("sparse_set", lambda: SET(density=0.3, delta_t=4, seed=0), "model", stateful=True)
