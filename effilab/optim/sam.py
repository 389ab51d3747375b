"""SAM and LookSAM as fastai callbacks: the optimizer steps with the sharpness-aware gradient."""

from __future__ import annotations

import contextlib

import torch
from fastai.callback.training import GradientAccumulation
from fastai.torch_core import find_bs, to_float

from ..callback import EffilabCallback
from ..core.sam import SharpnessAwareGradient, batchnorm_buffers
from ..registry import register

__all__ = ["SAM", "LookSAM"]

_AUTOCAST_DEVICES = ("cuda", "cpu")


class _SharpnessAware(EffilabCallback):
    """What SAM and LookSAM share: the second pass over the batch(es), the telemetry and the state."""

    order = 8  # after GradientAccumulation's before_step (6) decided to step; before MixedPrecision unscales (10)
    telemetry_name = "sam"

    def __init__(self, rho: float, every: int, alpha: float):
        self.sam = SharpnessAwareGradient(rho, every, alpha)
        self.rho = rho
        self.active = False
        self._extra_forward = self._extra_samples = 0  # host counts, known from the schedule
        self._clear()

    @property
    def extra_pass_samples(self) -> int:
        """Samples given the second forward + backward so far: a FLOP budget charges them."""
        return self._extra_samples

    def _clear(self):
        self._trainable, self._bn_stats, self._pending, self._autocast = [], [], [], ()
        self._accumulate = None

    def before_fit(self):
        self.active = not hasattr(self.learn, "lr_finder")
        self._clear()
        self._accumulate = next((cb.n_acc for cb in self.learn.cbs if isinstance(cb, GradientAccumulation)), None)
        if self.active:
            self.telemetry.set_meta(self.telemetry_name, rho=self.sam.rho, every=self.sam.every,
                                    alpha=self.sam.alpha, accumulate=self._accumulate)

    def before_train(self):
        if not self.active:
            return
        model = self.learn.model
        self._trainable = [p for p in model.parameters() if p.requires_grad]
        self._bn_stats = batchnorm_buffers(model)
        self._epoch_start = (self.sam.steps, self.sam.full_steps, self._extra_forward,
                             self._extra_samples)

    def after_model_change(self):
        """The model's parameters changed (model growth, inserted gates): the SAM step follows the new ones."""
        if self.active and self._trainable:
            self._trainable = [p for p in self.learn.model.parameters() if p.requires_grad]
            self._bn_stats = batchnorm_buffers(self.learn.model)

    def after_pred(self):
        if self.active and self.training:
            # Autocast (MixedPrecision, bf16...) is on now and off again after the loss: remember it.
            self._autocast = tuple((d, torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES
                                   if torch.is_autocast_enabled(d))

    def after_backward(self):
        if self.active and self._accumulate is not None:
            # GradientAccumulation divides each micro-batch's loss by n_acc / bs: the replay does too.
            self._pending.append((self.learn.xb, self.learn.yb, find_bs(self.learn.yb) / self._accumulate))

    def before_step(self):
        if not self.active:
            return
        batches = self._pending if self._accumulate is not None else [(self.learn.xb, self.learn.yb, 1.0)]
        if self.sam.is_full_step():
            self._extra_forward += len(batches)
            self._extra_samples += sum(find_bs(yb) for _, yb, _ in batches)
        self.sam.step(self._trainable, lambda: self._second_pass(batches), self._bn_stats)
        self._pending = []

    def _second_pass(self, batches):
        learn = self.learn
        scaler = learn.__dict__.get("scaler")
        for xb, yb, weight in batches:
            with contextlib.ExitStack() as stack:
                for device, dtype in self._autocast:
                    stack.enter_context(torch.autocast(device, dtype=dtype))
                pred = learn.model(*xb)
                if self._autocast:
                    pred = to_float(pred)  # as MixedPrecision's after_pred
                loss = learn.loss_func(pred, *yb)
            if weight != 1.0:
                loss = loss * weight
            if scaler is not None and scaler.is_enabled():
                loss = scaler.scale(loss)
            loss.backward()

    def after_train(self):
        if not self.active:
            return
        steps0, full0, fwd0, samples0 = self._epoch_start
        extra = self._extra_forward - fwd0
        stats = self.sam.take_stats()
        full = self.sam.full_steps - full0
        self.telemetry.record(
            self.telemetry_name, "epoch", epoch=self.learn.epoch, steps=self.sam.steps - steps0, full_steps=full,
            extra_forward=extra, extra_backward=extra, extra_samples=self._extra_samples - samples0,
            ascent_norm=stats["ascent_norm_sum"] / full if full else None, nonfinite_grads=stats["nonfinite_grads"])

    def after_fit(self):
        self.sam.release()  # the weight copy: not kept between fits nor pickled by `export`
        self._clear()

    after_cancel_fit = after_fit  # an interrupted fit lets the copy go too

    def state_dict(self) -> dict:
        return {"sam": self.sam.state_dict(), "extra_forward": self._extra_forward,
                "extra_samples": self._extra_samples}

    def load_state_dict(self, state: dict) -> None:
        self.sam.load_state_dict(state["sam"])
        self._extra_forward, self._extra_samples = state["extra_forward"], state["extra_samples"]


class SAM(_SharpnessAware):
    """SAM: Sharpness-Aware Minimization.

    **What it does.** Before each optimizer step, moves the weights to w + e with e = rho * g/||g||
    (g: the batch gradient, ||.||: the L2 norm over all parameters), recomputes the gradient of the
    same batch there (a second forward and backward), puts the weights back exactly (from a saved
    copy) and lets the optimizer step with that second gradient. It seeks weights whose whole
    neighbourhood has a low loss (flat minima), which tends to generalise better. Costs ~2x per step
    and one copy of the weights in memory (LookSAM: also a copy of the gradient and g_v).

    **Paper.** Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization",
    ICLR 2021, arXiv 2010.01412: lower test error than the same training without SAM for every
    CIFAR-10/100 model and augmentation tried, and on ImageNet ResNets; ~2x the cost per step.

    **Defaults.** `rho=0.05`, the reference implementation's default (the paper grid-searches rho
    in 0.01-0.5).

    **Use.** `Learner(..., cbs=SAM(0.05))` with any optimizer; the reported training loss is the plain
    one (at w). `LookSAM` is the cheaper variant.

    **Interactions.** `MixedPrecision`: the second forward runs under the same autocast as the first
    (re-entered), its loss is scaled by the same `GradScaler`; the direction G/||G|| does not depend on
    the loss scale, and on overflow the second gradient is made NaN so the scaler skips the step, as in
    plain training (no host sync). `GradientAccumulation`: the perturbation uses the accumulated
    gradient at the real step, and the second pass replays every accumulated micro-batch (kept by
    reference) with the same loss weights, so SAM + GradientAccumulation(n_acc) is SAM on the batch of
    n_acc samples (exact without batch-norm; with it, each micro-batch has its own statistics, as in its
    first pass). Replays call the Learner's loss again: losses holding per-batch state (MixUp/CutMix,
    InfoBatch's weighting) see the current batch's state, exact only without accumulation; InfoBatch's
    scores then hold the losses of the second pass (at w + e). Batch-norm running statistics are saved
    and restored around the second forward (a SAM step counts its batch once). `GradientClip` (after it)
    clips the SAM gradient. Under DDP both backwards all-reduce, so every rank uses the same global norm
    (SAM on the global batch, not the paper's per-device "m-sharpness"). Works with a second `fit`,
    `save_checkpoint`/`load_checkpoint`, `export`. Inactive during `lr_find`.

    **Telemetry** (`learn.telemetry`, source `"sam"`, stream `"epoch"`): `steps`, `full_steps` (with a
    perturbation), `extra_forward` / `extra_backward` (passes on top of plain training: one each per
    step, per micro-batch with accumulation), `extra_samples`, `ascent_norm` (mean ||e||: equals rho)
    and `nonfinite_grads` (steps whose first gradient overflowed).
    """

    telemetry_name = "sam"

    def __init__(self, rho: float = 0.05):
        super().__init__(rho, every=1, alpha=0.0)


class LookSAM(_SharpnessAware):
    """LookSAM: SAM's extra pass only every `every` steps, its sharpness direction reused in between.

    **What it does.** Every `every`-th optimizer step is a full SAM step (see `SAM`) that also stores
    g_v, the component of the SAM gradient g_s orthogonal to the plain gradient g
    (g_v = g_s - (g_s.g/||g||^2) g). The other steps cost what plain training costs: the optimizer
    uses g + alpha * ||g||/||g_v|| * g_v, the current gradient nudged along the stored sharpness
    direction (rescaled to the current gradient's size).

    **Paper.** Liu et al., "Towards Efficient and Scalable Sharpness-Aware Minimization", CVPR 2022,
    arXiv 2203.02714. ViT/ResNet on ImageNet: accuracy close to SAM's at k=5 with ~1/k of its extra
    cost. Simplified: a global g_v (the paper also has layer-wise variants and LAMB-style scaling).

    **Defaults.** `rho=0.05`, `every=5`, `alpha=0.7` (the paper's k=5, alpha=0.7, for ViTs trained with
    large batches). At small batches the stored direction goes stale fast: on Fashion-MNIST (6k images,
    bs 128, 4 epochs, Adam, one seed) its cosine with the current sharpness direction was within about
    +-0.4 (mostly near 0) from the very next step on; alpha=0.7 lost 11 points of accuracy against SAM
    and alpha=0.1 was on par with it. Lower `alpha` there.

    **Use.** `cbs=LookSAM(0.05, every=5)`; `every=1` is plain SAM.

    **Interactions.** As `SAM`; g_v and the step count are part of `state_dict` (a resumed run continues
    the same schedule with the same g_v), and a full step whose first gradient overflowed keeps the
    previous g_v.

    **Telemetry** (source `"looksam"`): as `SAM`; `extra_forward` = ceil(steps / every) over a fit
    started at step 0 (one per full step).
    """

    telemetry_name = "looksam"

    def __init__(self, rho: float = 0.05, every: int = 5, alpha: float = 0.7):
        super().__init__(rho, every, alpha)
        self.every, self.alpha = every, alpha


def _sam_for_tests():
    return SAM(rho=0.05)


def _looksam_for_tests():
    return LookSAM(rho=0.05, every=3, alpha=0.7)


register("sam", _sam_for_tests, "optim", stateful=False)
register("looksam", _looksam_for_tests, "optim", stateful=True)
