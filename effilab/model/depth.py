"""Stochastic depth and progressive layer dropping as fastai callbacks over `effilab.core.depth`."""

from __future__ import annotations

import math
import warnings

from fastai.torch_core import get_model

from ..callback import EffilabCallback
from ..core.depth import MODES, DepthDropper, _check_prob, linear_decay_keep, pld_keep, pld_theta
from ..core.residual import require_residual_blocks, residual_blocks
from ..registry import register

__all__ = ["ProgressiveLayerDrop", "StochasticDepth"]


class StochasticDepth(EffilabCallback):
    """Stochastic depth: during training each residual block is skipped with a probability that grows
    linearly with depth; a skipped block is not computed at all.

    **What it does.** Block l of L (in `effilab.core.residual.residual_blocks(model)` order) is kept with
    `p_l = 1 - l / L * (1 - final_keep)`. `mode="block"`: per step, a dropped block is skipped for the whole
    batch (its output is its shortcut), a kept one adds `branch(x) / p_l`. `mode="sample"`: per step and
    block, each sample is kept with `p_l`; the branch runs on the kept samples only (`index_select`) and is
    added back at their rows (`index_add`), scaled by `1 / p_l`. Validation and the exported model are the
    plain model (inverted scaling at train time, as timm/torchvision; the paper scales by `p_l` at test time
    instead, which is equivalent in expectation).

    **Paper.** Huang, Sun, Liu, Sedra, Weinberger, "Deep Networks with Stochastic Depth", ECCV 2016
    (linear decay rule, `p_L = 0.5`: 25% less training time on a 110-layer ResNet and lower test error).

    **What it saves.** Compute, really: a dropped block costs no forward and no backward. Expected saving of
    the blocks' training FLOPs: `1 - mean(p_l)` (25% at `final_keep=0.5`); the rest of the model (stem, head,
    embeddings) is unaffected. Both modes skip real work (timm's and torchvision's `drop_path` multiply a
    computed output by a mask and save nothing; Composer's sample-wise mode was 5% slower); sample mode pays
    for the gather/scatter and smaller matrix products, which on a GPU may eat its saving. Telemetry counts
    the FLOPs skipped. Measured (`benchmarks/model_depth_growth.py`, 2-core CPU, `resnet_small` width 32
    with 8 blocks, batch 128, keep linear to 0.5, 28% of the blocks' FLOPs expected skipped): CPU time per
    step 0.83x the plain model's in block mode, 0.73x in sample mode. Also a regulariser (the paper's accuracy
    gain is on deep ResNets; a 2-block model gains nothing). In a short fit it costs accuracy: on the bench's
    5-block `resnet` (10k Fashion-MNIST images, 3 epochs, 3 seeds, `benchmarks/model_centric.py`) 72% of the
    training FLOPs, -10.5 points at equal epochs and -8.7 (p = 0.018) against the plain recipe given the
    same FLOPs (PLD: 75%, -8.3, p = 0.045); on the 2-block character transformer 67% of the FLOPs and -2.5
    (p = 0.003) against the matched baseline.

    **Defaults.** `final_keep=0.5` (the paper's), `mode="block"` (no gather/scatter; the decision is one CPU
    draw per block and step).

    **Use.** `Learner(dls, resnet_small(task), cbs=StochasticDepth())` on a model built from
    `ResidualBlock`s (`effilab.datasets.resnet_small`, `char_transformer`, or branches wrapped in
    `effilab.core.residual.Residual`). A model without residual blocks is refused in `before_fit`.

    **Randomness.** From its own CPU generator, reseeded per (seed, fit, step, block): the same run draws
    the same blocks, a resumed run continues exactly, no global RNG is touched, no device value is read.

    **Interactions.** One depth-dropping callback per Learner: with several (`StochasticDepth`,
    `ProgressiveLayerDrop`), the first by order and position drops and the others warn and do nothing.
    Finds the blocks again each step, so it follows model growth. With BatchNorm inside a
    branch, sample mode normalises over the kept samples only. Under DDP (`effilab.system.distrib_ctx`,
    `effilab bench --nproc`): every rank draws the same blocks (the generator is seeded by the seed and the step,
    and each rank takes the same number of steps), and the dropped blocks' parameters get no gradient on any
    rank; `distrib_ctx` wraps the model with `find_unused_parameters=True` for this callback (a plain
    `DistributedDataParallel` without it fails at the next step). Give every rank the same `seed` (the bench
    gives the run's).

    **Interrupted fits.** `after_cancel_fit` removes the hooks; after an exception (Ctrl-C), for which fastai
    runs no event, they stay inert in eval mode and are removed by the next `fit` or `validate`.

    **Telemetry.** Source `"stochastic_depth"`: meta `keep_planned`; stream `"step"` {`fit`, `step`,
    `keep` (per block), `ran` (per block: 1/0, or the fraction of samples in sample mode)}; stream `"epoch"`
    {`fit`, `epoch`, `ran_blocks`, `samples_run`, `samples_seen`, `kept_fraction` (per block), `flops_skipped`,
    `flops_blocks`, `flops_saved_frac`}.
    """

    order = 5  # after a growth callback (-5) so that a grown model is dropped from
    telemetry_name = "stochastic_depth"
    leaves_parameters_unused = True  # a dropped block has no gradient: `distrib_ctx` tells DDP so

    def __init__(self, final_keep: float = 0.5, mode: str = "block", seed: int = 0, log_steps: bool = True):
        self.final_keep = _check_prob(final_keep, "final_keep")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.mode, self.seed, self.log_steps = mode, seed, bool(log_steps)
        self.fit_count = 0
        self._trained = False
        self.dropper: DepthDropper | None = None

    def keep_probs(self, n_blocks: int, progress: float) -> list[float]:
        return linear_decay_keep(n_blocks, self.final_keep)

    def check_model(self, model) -> None:
        """A clear error (`NotResidualError`) for a model without residual blocks, before any work."""
        require_residual_blocks(model, type(self).__name__)

    def before_fit(self):
        model = get_model(self.learn.model)
        self.check_model(model)
        if hasattr(self.learn, "lr_finder"):
            return
        first = next(cb for cb in self.learn.cbs.sorted("order") if isinstance(cb, StochasticDepth))
        if first is not self:
            warnings.warn(f"{type(self).__name__}: {type(first).__name__} on the same Learner already drops blocks; "
                          f"{type(self).__name__} does nothing in this fit", stacklevel=2)
            return
        self._trained = False
        for block in residual_blocks(model):  # a fit interrupted by an exception left its hooks (no event ran)
            block.depth_hook = None
        self.dropper = DepthDropper(model, self.mode, self.seed, type(self).__name__)
        self.dropper.stream = self.fit_count
        n = len(self.dropper.blocks)
        self.telemetry.set_meta(self.telemetry_name, mode=self.mode,
                                keep_planned={f"{p:.2f}": self.keep_probs(n, p) for p in (0.0, 0.25, 0.5, 0.75, 1.0)})

    def before_epoch(self):
        if self.dropper is not None:
            self.dropper.reset_counts()

    def before_train(self):
        self._trained = True

    def before_batch(self):
        if self.dropper is None or not self.training:
            return
        blocks = self.dropper.refresh()
        step = self.epoch * self.n_iter + self.iter  # from the loop's counters: the same after a resume
        self.dropper.begin_step(step, self.keep_probs(len(blocks), self.learn.pct_train))

    def before_step(self):
        if self.dropper is not None and self.dropper.dropped:
            self.dropper.clear_dropped_grads()

    def after_step(self):
        if self.dropper is not None:
            self.dropper.after_optimizer_step()

    def after_batch(self):
        if self.dropper is None or not self.training or self.dropper.step < 0:
            return
        if self.log_steps:  # host lists, no device value
            self.telemetry.record(self.telemetry_name, "step", fit=self.fit_count, step=self.dropper.step,
                                  keep=list(self.dropper.keep), ran=self.dropper.end_step())
        self.dropper.step = -1

    def after_cancel_batch(self):
        if self.dropper is not None:
            self.dropper.step = -1

    def after_epoch(self):
        if self.dropper is None or not self.dropper.steps:
            return
        summary = self.dropper.epoch_summary()
        total = summary["flops_blocks"]
        self.telemetry.record(self.telemetry_name, "epoch", fit=self.fit_count, epoch=self.epoch, **summary,
                              flops_saved_frac=summary["flops_skipped"] / total if total else 0.0,
                              **self.epoch_extra())

    def epoch_extra(self) -> dict:
        return {}

    def _detach(self):
        if self.dropper is not None:
            self.dropper.remove()
            self.dropper = None
            if self._trained:  # not after validate(), which fires before_fit/after_fit too
                self.fit_count += 1

    def after_fit(self):
        self._detach()

    def after_cancel_fit(self):
        self._detach()

    def state_dict(self) -> dict:
        return {"fit_count": self.fit_count}

    def load_state_dict(self, state: dict) -> None:
        self.fit_count = int(state["fit_count"])


class ProgressiveLayerDrop(StochasticDepth):
    """Progressive layer dropping (PLD): stochastic depth whose keep probability starts at 1 and decays over
    the run, deeper blocks dropped more.

    **What it does.** At progress `t` (fastai's `pct_train` in [0, 1], so the schedule scales with the
    run's budget) the global keep probability is `theta(t) = (1 - theta_bar) * exp(-gamma * t) + theta_bar`
    and block l of L is kept with `1 - l / L * (1 - theta(t))`. Dropping as `StochasticDepth` (block mode:
    a dropped block is not computed; sample mode: the branch runs on the kept samples).

    **Paper.** Zhang & He, "Accelerating Training of Transformer-Based Language Models with Progressive Layer
    Dropping", NeurIPS 2020 (BERT pre-training 24% less time per sample, 2.5x faster to the same GLUE with a
    higher learning rate; defaults theta_bar=0.5, gamma=0.001 per step). DeepSpeed removed its
    implementation in 2026; No Train No Gain (Kaddour et al. 2023) found layer dropping's gains vanish
    against a fully-decayed learning-rate baseline at equal compute: compare at equal FLOPs.

    **What it saves.** Compute: the expected fraction of block FLOPs skipped is about `(1 - theta_bar) / 2`
    once theta has decayed (about 25% at theta_bar=0.5), less early in the run. Measured and reported as
    `flops_saved_frac` per epoch.

    **Defaults.** `theta_bar=0.5` (the paper's), `gamma=10` per unit of progress (theta within 1% of
    theta_bar after half the run; DeepSpeed's 0.001/step over 10k steps), `mode="block"`.

    **Telemetry.** As `StochasticDepth`, source `"progressive_layer_drop"`, with `theta` in the epoch
    records (at the epoch's end).
    """

    telemetry_name = "progressive_layer_drop"

    def __init__(self, theta_bar: float = 0.5, gamma: float = 10.0, mode: str = "block", seed: int = 0,
                 log_steps: bool = True):
        theta_bar = _check_prob(theta_bar, "theta_bar")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma < 0:
            raise ValueError(f"gamma must be a finite number >= 0 (decay rate per unit of progress), got {gamma!r}")
        super().__init__(final_keep=theta_bar, mode=mode, seed=seed, log_steps=log_steps)
        self.theta_bar, self.gamma = theta_bar, float(gamma)

    def keep_probs(self, n_blocks: int, progress: float) -> list[float]:
        return pld_keep(n_blocks, progress, self.theta_bar, self.gamma)

    def epoch_extra(self) -> dict:
        return {"theta": pld_theta(self.learn.pct_train, self.theta_bar, self.gamma)}


register("stochastic_depth", lambda: StochasticDepth(final_keep=0.8, mode="sample", seed=0), "model",
         stateful=False, task="sequence")
register("progressive_layer_drop", lambda: ProgressiveLayerDrop(theta_bar=0.5, gamma=5.0, mode="block", seed=0),
         "model", stateful=False, task="sequence")
