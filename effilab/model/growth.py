"""Model growth as a fastai callback over `effilab.core.growth`: start small, deepen or widen the model at
chosen points of the fit without changing its function, and count the compute saved."""

from __future__ import annotations

import math

import torch
from fastai.torch_core import get_model
from torch.nn.parallel import DistributedDataParallel

from ..callback import EffilabCallback
from ..core.growth import (
    GrowthError,
    check_preserved,
    copy_without_hooks,
    eval_output,
    grow_blocks,
    train_flops_per_sample,
)
from ..core.residual import require_residual_blocks
from ..registry import register
from ._common import first_batch, rebuild_optimizer

__all__ = ["GrowthError", "ModelGrowth", "ModelWidening"]

OPS = ("deepen", "widen")


class ModelGrowth(EffilabCallback):
    """Model growth: train a small residual model first and grow it, function-preservingly, at chosen points
    of the fit (Net2Net, progressive stacking).

    **What it does.** At each progress fraction in `at` (fastai's `pct_train`, so the schedule scales with the
    run's budget) the model grows once: `op="deepen"` inserts after every block with an identity shortcut a
    copy of it whose residual branch outputs zero (its gate zeroed if it has one, else its last layer):
    progressive stacking's doubling, started as the identity; `op="widen"` multiplies the hidden width of
    every block's `widen_pairs()` by `factor` (Net2WiderNet: replicated units, outgoing weights split between
    copies, made unequal by `noise` to break the symmetry). Each event is checked on the current batch: the
    outputs before and after (eval mode) must agree to `tol`, else `GrowthError` says why. The fastai
    optimizer is rebuilt for the new parameters: old parameters keep their state (moments), widened ones get
    their old state replicated (first moments scaled by each copy's share, second moments by its square, so
    Adam's step is the old unit's), new blocks start with none.

    **Papers.** Chen, Goodfellow & Shlens, "Net2Net", ICLR 2016; Gong et al., "Efficient Training of BERT by
    Progressively Stacking", ICML 2019 (~25% less time); bert2BERT (ACL 2022, ~45% compute saved) and LiGO
    (ICLR 2023, up to 50%). No Train No Gain (Kaddour et al. 2023): stacking's gains vanished against a
    fully-decayed learning-rate baseline at equal compute; compare at equal FLOPs.

    **What it saves.** Compute: the steps before the last growth run a smaller model. Counted with
    `torch.utils.flop_counter` (training FLOPs per sample measured for each stage) and reported as the fraction
    saved against training the final (large) model throughout; `planned_saving` is known at the start. The
    final model has the large model's size and cost: nothing is saved at inference, nor in peak memory.
    Measured (`benchmarks/model_depth_growth.py`): `resnet_small` deepened from 2 to 5 blocks at 25% and 50%
    of the run spends 26% fewer training FLOPs than the 5-block model throughout (38.8M, 60.4M, 103.8M
    FLOPs per sample in the three stages). On the bench (`benchmarks/model_centric.py`: the `resnet` (4, 1)
    grown from (1, 1) at 25% and 50%, 10k Fashion-MNIST images, 3 epochs, 3 seeds) it spent 74% of the grown
    model's training FLOPs and beat it: +0.55 points over that model trained throughout, +2.57 (p = 0.042) over
    that model given the same FLOPs. On the 2-block character transformer grown from 1 block at half the fit it
    spent 76% and lost: -2.25 points, and -1.00 (p = 0.023) against the 2-block model given the same FLOPs.
    Not in the bench's work column: the check of each event (two eval-mode forwards of one batch) and the FLOP
    counts (a forward and backward of 2 samples per stage), a few batches against the fit's thousands; nor
    the saving itself, which is in FLOPs per sample, not in samples: read `saved_frac`.

    **Defaults.** `at=(0.25, 0.5)`, `op="deepen"`, `factor=2.0` (widen), `noise=0.01` (widen), `tol=1e-5`.
    Events happen once per callback (a second fit trains the grown model on; `load_checkpoint` regrows a fresh
    model to the saved shape before loading its weights, and `learn.load` of a grown checkpoint needs the
    same: call `cb.grow_to(n_events)` first).

    **Interactions.** Order -5: grows before stochastic depth (which follows the new blocks) and mixed
    precision. Refuses to train beside `FP8Training`, which swaps layers by name that growth copies or
    resizes. Not under DDP (the wrapper would need rebuilding): refused. A compile callback must recompile
    after growth. An interrupted fit keeps the grown model (like trained weights).

    **Telemetry.** Source `"growth"`: meta `planned` {stage flops_per_sample, boundaries, planned_saving};
    stream `"event"` {fit, epoch, iter, pct, op, n_params, n_blocks, max_abs_change, flops_per_sample};
    stream `"epoch"` {fit, epoch, n_params, flops_spent, flops_large, saved_frac} (training FLOPs so far).
    """

    order = -5
    telemetry_name = "growth"

    def __init__(self, at=(0.25, 0.5), op: str = "deepen", factor: float = 2.0, noise: float = 0.01,
                 tol: float = 1e-5, seed: int = 0):
        if isinstance(at, (int, float)) and not isinstance(at, bool):
            at = (at,)
        at = tuple(at)
        if not at or any(isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 < a < 1 for a in at):
            raise ValueError(f"at must be progress fractions in (0, 1) (when to grow), got {at!r}")
        if list(at) != sorted(set(at)):
            raise ValueError(f"at must be strictly increasing, got {at!r}")
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")
        for name, value in (("factor", factor), ("noise", noise), ("tol", tol)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"{name} must be a finite number, got {value!r}")
        if op == "widen" and not factor > 1:
            raise ValueError(f"factor must be > 1 to widen, got {factor}")
        if not 0 <= noise < 0.5:
            raise ValueError(f"noise must be in [0, 0.5) (the spread of the split of outgoing weights), got {noise}")
        if not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.at, self.op, self.factor, self.noise, self.tol, self.seed = at, op, float(factor), float(noise), \
            float(tol), seed
        self.done = 0  # growth events applied to the model
        self.fit_count = 0
        self.flops_spent = self.flops_large = 0.0
        self._flops_now = None  # training FLOPs per sample of the current model
        self._flops_final = None
        self._active = False

    @property
    def model(self):
        return get_model(self.learn.model)

    def _grow(self, model, event: int) -> dict:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + event)
        return grow_blocks(model, self.op, self.factor, gen, self.noise)

    def grow_to(self, events: int) -> None:
        """Grow the model (and optimizer) by the first `events` events, as the fit would have (weights aside):
        to load a grown checkpoint into a fresh model of the initial architecture."""
        while self.done < events:
            self._grow(self.model, self.done)
            self.done += 1
        rebuild_optimizer(self.learn)

    def check_model(self, model) -> None:
        """A clear error (`NotResidualError`) for a model without residual blocks, before any work."""
        require_residual_blocks(model, type(self).__name__)

    def before_fit(self):
        self._active = self._trained = False
        if isinstance(self.learn.model, DistributedDataParallel):
            raise RuntimeError("ModelGrowth does not run under DDP: the DDP wrapper would have to be rebuilt around "
                               "the grown model. Grow in a single-process run.")
        self.check_model(self.model)
        fp8 = [cb for cb in self.learn.cbs if type(cb).__name__ == "FP8Training"]
        if fp8:
            raise ValueError(f"{type(self).__name__} cannot train beside FP8Training on the same Learner: FP8Training "
                             "swaps the Linear layers for float8 ones and swaps them back by name after the fit, and "
                             "growth copies (deepen) or resizes (widen) those layers, so the wrong layers would come "
                             "back; widening also changes their float8 scales, so it no longer preserves the function. "
                             "Grow without FP8Training, or use FP8Training on the grown model in a later fit.")

    def before_train(self):
        # the first trained epoch of a real fit (validate() and lr_find fire before_fit too)
        self._trained = True
        if self._active or hasattr(self.learn, "lr_finder"):
            return
        self._active = True
        x = self._probe()
        self._flops_now = train_flops_per_sample(self.model, x)
        if self.done < len(self.at):
            self._plan(x)
        elif self._flops_final is None:
            self._flops_final = self._flops_now

    def _probe(self):
        xb = first_batch(self.learn.dls.train)
        return xb[0].as_subclass(torch.Tensor)[:2]

    def _plan(self, x):
        """Grow a copy through the remaining events: per-stage training FLOPs and the planned saving."""
        model = copy_without_hooks(self.model)
        stages = [self._flops_now]
        for event in range(self.done, len(self.at)):
            self._grow(model, event)
            stages.append(train_flops_per_sample(model, x))
        self._flops_final = stages[-1]
        bounds = [0.0, *self.at[self.done:], 1.0]
        spent = sum(f * (b - a) for f, a, b in zip(stages, bounds[:-1], bounds[1:]))
        self.telemetry.set_meta(self.telemetry_name, planned={
            "flops_per_sample": stages, "boundaries": bounds, "planned_saving": 1 - spent / stages[-1]})

    def before_batch(self):
        if not (self._active and self.training):
            return
        while self.done < len(self.at) and self.learn.pct_train >= self.at[self.done]:
            self._event()
        n = self.x.shape[0]
        self.flops_spent += self._flops_now * n
        self.flops_large += self._flops_final * n

    def _event(self):
        model, x = self.model, self.x.as_subclass(torch.Tensor)
        before = eval_output(model, x)
        migrate = self._grow(model, self.done)
        change = check_preserved(before, eval_output(model, x), self.tol, f"growth event {self.done} ({self.op})")
        self.done += 1
        rebuild_optimizer(self.learn, migrate)
        self._flops_now = train_flops_per_sample(model, x[:2])
        self.telemetry.record(self.telemetry_name, "event", fit=self.fit_count, epoch=self.epoch, iter=self.iter,
                              pct=self.learn.pct_train, op=self.op, n_params=sum(p.numel() for p in model.parameters()),
                              n_blocks=len(require_residual_blocks(model, "ModelGrowth")), max_abs_change=change,
                              flops_per_sample=self._flops_now)

    def after_epoch(self):
        if not (self._active and self._trained):
            return
        self._trained = False
        self.telemetry.record(self.telemetry_name, "epoch", fit=self.fit_count, epoch=self.epoch,
                              n_params=sum(p.numel() for p in self.model.parameters()),
                              flops_spent=self.flops_spent, flops_large=self.flops_large,
                              saved_frac=1 - self.flops_spent / self.flops_large if self.flops_large else 0.0)

    def after_fit(self):
        if self._active:
            self._active = False
            self.fit_count += 1

    def after_cancel_fit(self):
        self.after_fit()

    def state_dict(self) -> dict:
        return {"done": self.done, "fit_count": self.fit_count, "flops_spent": self.flops_spent,
                "flops_large": self.flops_large, "flops_final": self._flops_final}

    def prepare_load(self, state: dict) -> None:
        if self.done > state["done"]:
            raise GrowthError(f"this model has grown {self.done} times, the checkpoint only {state['done']}: load it "
                              "into a fresh Learner of the initial architecture")
        self.grow_to(state["done"])

    def load_state_dict(self, state: dict) -> None:
        if self.done != state["done"]:
            raise GrowthError(f"the model has grown {self.done} times but the checkpoint {state['done']}: "
                              "load it with learn.load_checkpoint (which regrows the model first)")
        self.fit_count = state["fit_count"]
        self.flops_spent, self.flops_large = state["flops_spent"], state["flops_large"]
        self._flops_final = state["flops_final"]


class ModelWidening(ModelGrowth):
    """`ModelGrowth` with `op="widen"` (Net2WiderNet): each event multiplies the hidden width of every block's
    `widen_pairs()` by `factor` (default 2). See `ModelGrowth` for the method card."""

    def __init__(self, at=(0.25, 0.5), factor: float = 2.0, noise: float = 0.01, tol: float = 1e-5, seed: int = 0):
        super().__init__(at=at, op="widen", factor=factor, noise=noise, tol=tol, seed=seed)


register("model_growth", lambda: ModelGrowth(at=(0.3,), op="deepen"), "model", stateful=False, task="sequence",
         keeps_model_changes=True, conflicts=("fp8",))
register("model_widening", lambda: ModelWidening(at=(0.3,), factor=1.5), "model", stateful=False, task="sequence",
         conflicts=("fp8",))
