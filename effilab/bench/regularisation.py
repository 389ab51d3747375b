"""Dataset regularisation for recipes: fastai's MixUp, CutMix and label smoothing, with the arguments a
recipe may give (`mixup(alpha=0.4)`, `cutmix(alpha=1.0)`, `label_smoothing(eps=0.1)`).

They are fastai's own; only label smoothing needs a wrapper, because it is a loss and the runner
builds the Learner with `CrossEntropyLossFlat()`: `LabelSmoothing` swaps the loss for the fit.
"""

from __future__ import annotations

from fastai.callback.core import Callback
from fastai.callback.mixup import CutMix, MixUp
from fastai.losses import LabelSmoothingCrossEntropyFlat

__all__ = ["LabelSmoothing", "cutmix", "label_smoothing", "mixup"]


def _check_alpha(alpha: float) -> None:
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0 (the Beta(alpha, alpha) mixing distribution), got {alpha}")


def mixup(alpha: float = 0.4) -> MixUp:
    """fastai's `MixUp` (Zhang et al., ICLR 2018): train on convex combinations of pairs of samples."""
    _check_alpha(alpha)
    return MixUp(alpha)


def cutmix(alpha: float = 1.0) -> CutMix:
    """fastai's `CutMix` (Yun et al., ICCV 2019): paste a box of one image into another (images only)."""
    _check_alpha(alpha)
    return CutMix(alpha)


class LabelSmoothing(Callback):
    """Trains with fastai's `LabelSmoothingCrossEntropyFlat(eps)` (Szegedy et al., CVPR 2016) and gives
    the Learner its own loss back after the fit.

    Runs first (order -50), so the techniques that wrap the loss (InfoBatch, importance sampling, MixUp)
    wrap the smoothed one.
    """

    order = -50

    def __init__(self, eps: float = 0.1):
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"eps must be in [0, 1) (the probability mass spread over all classes), got {eps}")
        self.eps = eps
        self._saved = None

    def before_fit(self):
        if self._saved is None:  # else a fit interrupted before after_fit left the smoothed loss in place
            self._saved = self.learn.loss_func
            self.learn.loss_func = LabelSmoothingCrossEntropyFlat(eps=self.eps)

    def after_fit(self):
        if self._saved is not None:
            self.learn.loss_func, self._saved = self._saved, None


def label_smoothing(eps: float = 0.1) -> LabelSmoothing:
    return LabelSmoothing(eps)
