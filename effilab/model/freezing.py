"""Progressive layer freezing (FreezeOut, Composer's LayerFreezing) as a fastai callback."""

from __future__ import annotations

from torch.nn.parallel import DistributedDataParallel

from ..core.freezing import PrefixFreezer, check_schedule, forward_layers, freeze_points, frozen_count
from ..registry import register
from ._restore import RestoringCallback

__all__ = ["LayerFreezing"]


class LayerFreezing(RestoringCallback):
    """Progressive layer freezing: the first layers stop training one after another as training progresses.

    **What it does.** Lists the model's layers in forward order (`effilab.core.freezing.forward_layers`:
    its children, containers opened, parameter-free modules left out; or `layers=[names]`). From progress
    `start` (fastai's `pct_train`, the fraction of the fit done, so it follows any schedule or budget) the
    first layer freezes, then the next, evenly spaced, until `max_frozen` layers (default: all but the
    last) are frozen by progress `end`. A frozen layer's parameters get `requires_grad=False` and no
    gradient: they stay in the optimiser (its state kept, checkpoints unchanged) and the optimiser skips
    them; its BatchNorm layers switch to eval mode (running statistics, no updates). Because the frozen
    prefix's outputs need no gradient, autograd records nothing there and the backward pass stops at the
    first trainable layer by itself. After the fit (or an interrupted one) every parameter's requires_grad
    and every BatchNorm's mode come back.

    **Paper.** Brock et al., "FreezeOut", arXiv 1706.04983 (t0=0.5: ~20% less wall-clock on DenseNets for
    a small accuracy cost); MosaicML Composer `LayerFreezing` (freeze_start=0.5).

    **Defaults.** `start=0.5, end=1.0` (FreezeOut's t0 = 0.5): half the fit trains everything.

    **What it saves.** Backward compute of the frozen prefix (its weight gradients, and the input gradients
    that only it needed) and the optimiser's work on it; the forward still runs (caching the prefix's
    outputs is not implemented). Measured by `benchmarks/model_cards.py` (`torch.utils.flop_counter`), the
    3-conv CNN of `small_model` on 1x28x28, batch 64, 7 layers (conv, BN, conv, BN, conv, BN, linear):
    backward 541 MFLOP, forward 274; freezing the first conv alone saves 1.3% of the backward (its input
    needs no gradient anyway), conv+BN 23%, two conv+BN 44%, four layers 72%, six 99.9% (66% of the whole
    step). With the defaults (start 0.5, six layers freezing evenly over the second half) a fit's training
    FLOPs fall by about 19%, the step time by less (the forward and the data pipeline stay). It may cost
    accuracy: compare with the budget-matched baseline. Memory: frozen layers keep no activations for backward.

    **Interactions.** Order -6: before `Compile` (order -4), which resets its compile cache when the set of
    trainable parameters changes (pytorch#139476: a compiled frame reused across a requires_grad change can
    train the wrong parameters). With growth, pass `layers` explicitly. Under DDP it needs
    `find_unused_parameters=True` (it says so otherwise); not tested under DDP yet.

    **Telemetry** (source `"freezing"`): meta `layers` (names), `params` (per layer) and `freeze_at`
    (planned progress per layer); stream `"timeline"`: one record per layer frozen (`layer`, `name`,
    `step`, `epoch`, `progress`); per epoch the number of layers and parameters frozen at its end.
    """

    order = -6  # after TrainEvalCallback (-10), whose model.train() it corrects
    telemetry_name = "freezing"

    def __init__(self, start: float = 0.5, end: float = 1.0, max_frozen: int | None = None,
                 layers: list[str] | None = None):
        check_schedule(start, end)
        if max_frozen is not None and (isinstance(max_frozen, bool) or not isinstance(max_frozen, int)
                                       or max_frozen < 1):
            raise TypeError(f"max_frozen must be None (all layers but the last) or an int >= 1, got {max_frozen!r}")
        if layers is not None and (isinstance(layers, str) or not all(isinstance(n, str) for n in layers)):
            raise TypeError(f"layers must be a list of module names in forward order, got {layers!r}")
        self.start, self.end, self.max_frozen = float(start), float(end), max_frozen
        self.layer_names = None if layers is None else list(layers)
        self.freezer: PrefixFreezer | None = None
        self.n_freeze = 0

    def before_fit(self):
        self.restore()
        layers = forward_layers(self.learn.model, self.layer_names)
        n_layers = len(layers)
        n_freeze = n_layers - 1 if self.max_frozen is None else self.max_frozen
        if n_freeze > n_layers - 1:
            raise ValueError(f"LayerFreezing(max_frozen={self.max_frozen}): the model has {n_layers} layers "
                             f"({', '.join(n for n, _ in layers)}) and the last must train, so at most "
                             f"{max(n_layers - 1, 0)} can freeze: pass max_frozen <= {max(n_layers - 1, 0)}, "
                             "or list finer layers with layers=[...]")
        self.freezer, self.n_freeze = PrefixFreezer(layers), n_freeze
        self.telemetry.set_meta(self.telemetry_name, layers=[n for n, _ in layers],
                                params=[sum(p.numel() for p in m.parameters()) for _, m in layers],
                                freeze_at=freeze_points(n_freeze, self.start, self.end))

    @property
    def _active(self) -> bool:
        return self.freezer is not None and not hasattr(self.learn, "lr_finder")

    def before_train(self):
        if not self._active:
            return
        model = self.learn.model
        if isinstance(model, DistributedDataParallel) and not model.find_unused_parameters:
            raise ValueError("LayerFreezing under DistributedDataParallel: DDP waits for a gradient of every "
                             "parameter it was built with, and frozen ones get none. Build DDP with "
                             "find_unused_parameters=True, or train without LayerFreezing")
        self.freezer.norms_to_eval()  # TrainEvalCallback just put the whole model in train mode

    def before_batch(self):
        if not (self.training and self._active):
            return
        p = self.learn.pct_train
        n = frozen_count(p, self.n_freeze, self.start, self.end)
        if n != self.freezer.n_frozen:
            for i in self.freezer.freeze_to(n):
                self.telemetry.record(self.telemetry_name, "timeline", layer=i, name=self.freezer.layers[i][0],
                                      step=self.learn.train_iter, epoch=self.learn.epoch, progress=p)

    def after_train(self):
        if not self._active:
            return
        frozen = self.freezer.layers[:self.freezer.n_frozen]
        self.telemetry.record(self.telemetry_name, "epoch", epoch=self.learn.epoch, n_frozen=len(frozen),
                              params_frozen=sum(p.numel() for _, m in frozen for p in m.parameters()))

    def restore(self):
        if self.freezer is not None and self.learn is not None:
            self.freezer.restore(training=self.learn.model.training)

    @property
    def frozen_layers(self) -> list[str]:
        """Names of the layers frozen now."""
        return [] if self.freezer is None else [n for n, _ in self.freezer.layers[:self.freezer.n_frozen]]


def _freezing_for_tests():
    return LayerFreezing(start=0.25)


register("layer_freezing", _freezing_for_tests, "model")
