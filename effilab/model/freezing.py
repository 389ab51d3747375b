"""Progressive layer freezing (FreezeOut, Composer's LayerFreezing) as a fastai callback."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.flop_counter import FlopCounterMode

from ..core.freezing import PrefixCache, PrefixFreezer, check_schedule, forward_layers, freeze_points, frozen_count
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

    **Caching the prefix (`cache=True`).** The forward of the frozen prefix is skipped too: its output for
    each training sample is stored on the device (by sample index, read from fastai's `DataLoader` order)
    the first time the sample passes through it (computed under `no_grad`, for the missing samples only),
    and each training step runs `model[k:]` on the stored outputs. Only valid when a sample's input is the
    same every epoch: no random augmentation, no MixUp/CutMix (refused with an error), no dropout in the
    prefix (the prefix stops before one). Needs an `nn.Sequential` model with one input; costs memory
    (N samples x the prefix's output size); the cache is rebuilt when the prefix grows and at each fit.
    The cached steps run eagerly under `Compile` (the suffix is a new module), and the prefix runs before
    `Autocast` opens its region (stored in fp32).

    **What it saves.** Backward compute of the frozen prefix (its weight gradients, and the input gradients
    that only it needed) and the optimiser's work on it; with `cache=True` also the prefix's forward for
    every sample already stored. Measured by `benchmarks/model_cards.py` (`torch.utils.flop_counter`), the
    3-conv CNN of `small_model` on 1x28x28, batch 64, 7 layers (conv, BN, conv, BN, conv, BN, linear):
    backward 541 MFLOP, forward 274; freezing the first conv alone saves 1.3% of the backward (its input
    needs no gradient anyway), conv+BN 23%, two conv+BN 44%, four layers 72%, six 99.9% (66% of the whole
    step). With the defaults (start 0.5, six layers freezing evenly over the second half) a fit's training
    FLOPs fall by about 19%, the step time by less (the forward and the data pipeline stay). It may cost
    accuracy: compare with the budget-matched baseline. Memory: frozen layers keep no activations for backward.
    Measured (`benchmarks/model_centric.py`, 10k Fashion-MNIST images, 3 epochs, 3 seeds): 81% of the training
    FLOPs, 85% of the CPU time, -0.31 points at equal epochs and +0.20 (p = 0.055, within run-to-run noise)
    against the plain recipe given the same FLOPs. With the defaults the cache saves little: the prefix grows
    until the end and each new depth empties it, so it served 637 sample-forwards in that fit (FLOPs 81.2% vs
    81.3%) for +115 MiB of memory; it pays when the prefix stops growing early (`end` < 1, `max_frozen`).

    **Interactions.** Order -6: before `Compile` (order -4), which resets its compile cache when the set of
    trainable parameters changes (pytorch#139476: a compiled frame reused across a requires_grad change can
    train the wrong parameters). With growth, pass `layers` explicitly. Under `distrib_ctx` (and
    `effilab bench --nproc`) DDP is told to find unused parameters, so the frozen ones get no gradient without
    stalling the all-reduce; a `DistributedDataParallel` built without `find_unused_parameters=True` is refused
    before the first batch.

    **Telemetry** (source `"freezing"`): meta `layers` (names), `params` (per layer) and `freeze_at`
    (planned progress per layer); stream `"timeline"`: one record per layer frozen (`layer`, `name`,
    `step`, `epoch`, `progress`); per epoch the number of layers and parameters frozen at its end and, with
    `cache=True`, `cache_depth` (children of the model cached), `cached_steps`, `prefix_samples_skipped`,
    `cache_filled`, `flops_added` (the prefix's forward FLOPs while filling the cache, which a FLOP count of
    the training step, the bench's, does not see: the step runs the suffix only).
    """

    order = -6  # after TrainEvalCallback (-10), whose model.train() it corrects
    leaves_parameters_unused = True  # frozen layers get no gradient: `distrib_ctx` tells DDP so
    telemetry_name = "freezing"

    def __init__(self, start: float = 0.5, end: float = 1.0, max_frozen: int | None = None,
                 layers: list[str] | None = None, cache: bool = False):
        check_schedule(start, end)
        if not isinstance(cache, bool):
            raise TypeError(f"cache must be True or False, got {cache!r}")
        self.cache = cache
        self.prefix_cache: PrefixCache | None = None
        self._swapped = None
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
        if self.cache:
            self._check_cacheable()
            self.prefix_cache = PrefixCache(len(self.learn.dls.train.dataset))
        self.freezer, self.n_freeze = PrefixFreezer(layers), n_freeze
        self._cached_steps = self._prefix_skipped = self._prefix_flops = 0
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
        if self.cache:  # record the epoch's sample order: batch i holds samples idxs[i*bs:(i+1)*bs]
            dl = self.learn.dl
            get_idxs = dl.get_idxs

            def recording_get_idxs():
                self._idxs = list(get_idxs())
                return self._idxs

            dl.get_idxs, self._recording_dl = recording_get_idxs, dl

    def before_batch(self):
        if not (self.training and self._active):
            return
        p = self.learn.pct_train
        n = frozen_count(p, self.n_freeze, self.start, self.end)
        if n != self.freezer.n_frozen:
            for i in self.freezer.freeze_to(n):
                self.telemetry.record(self.telemetry_name, "timeline", layer=i, name=self.freezer.layers[i][0],
                                      step=self.learn.train_iter, epoch=self.learn.epoch, progress=p)
        if self.cache:
            self._use_cache()

    # -- caching the frozen prefix's outputs
    def _check_cacheable(self):
        from fastai.callback.mixup import MixHandler
        from fastai.data.load import DataLoader
        from fastai.vision.augment import RandTransform

        model, dl = self.learn.model, self.learn.dls.train
        if not isinstance(model, nn.Sequential):
            raise ValueError("LayerFreezing(cache=True) needs an nn.Sequential model (a cached step runs model[k:] "
                             f"on the stored outputs of model[:k]), got {type(model).__name__}: use cache=False")
        if getattr(self.learn.dls, "n_inp", 1) != 1:
            raise ValueError("LayerFreezing(cache=True) needs a model with one input: use cache=False")
        if not isinstance(dl, DataLoader):
            raise ValueError(f"LayerFreezing(cache=True) needs fastai's DataLoader (it reads the sample order), got "
                             f"{type(dl).__name__}: use cache=False")
        tfms = [*getattr(dl.after_item, "fs", ()), *getattr(dl.after_batch, "fs", ())]  # TfmdDL's pipelines
        random_tfms = [t for t in tfms if isinstance(t, RandTransform)]
        mixing = [type(cb).__name__ for cb in self.learn.cbs if isinstance(cb, MixHandler)]
        if random_tfms or mixing:
            raise ValueError(f"LayerFreezing(cache=True) needs the same input for a sample every epoch, but "
                             f"{random_tfms or mixing} change it: remove them or use cache=False")

    def _cache_depth(self) -> int:
        # Leading children whose parameters are all frozen (and parameter-free ones between), no dropout.
        depth, has_params = 0, False
        for child in self.learn.model.children():
            params = list(child.parameters())
            if any(p.requires_grad for p in params) or any(
                    isinstance(m, nn.modules.dropout._DropoutNd) for m in child.modules()):
                break
            depth, has_params = depth + 1, has_params or bool(params)
        return depth if has_params else 0

    def _use_cache(self):
        model, cache = self.learn.model, self.prefix_cache
        depth = self._cache_depth()
        if depth != cache.depth:
            cache.reset(depth)
        if depth == 0 or getattr(self, "_idxs", None) is None:
            return
        x = self.learn.xb[0]
        start = self.learn.iter * self.learn.dl.bs
        idx = self._idxs[start:start + len(x)]
        missing = cache.missing(idx)  # host bookkeeping: no device read
        if missing:  # the prefix runs for samples it has not stored yet, without building a graph
            # counted here: the bench's FLOP counter sees only the suffix's step (`flops_added` per epoch)
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                rows = x.index_select(0, torch.tensor(missing, device=x.device))
                cache.write([idx[pos] for pos in missing], model[:depth](rows))
            self._prefix_flops += counter.get_total_flops()
        self.learn.xb = (cache.read(idx),)  # the suffix runs on the stored outputs
        self._swapped, self.learn.model = model, model[depth:]
        self._cached_steps += 1
        self._prefix_skipped += len(idx) - len(missing)

    def _end_cached_batch(self):
        if self._swapped is not None:
            self.learn.model, self._swapped = self._swapped, None

    def after_pred(self):
        self._end_cached_batch()

    def after_cancel_batch(self):
        self._end_cached_batch()

    def after_train(self):
        if not self._active:
            return
        self._stop_recording()
        frozen = self.freezer.layers[:self.freezer.n_frozen]
        cache = {} if self.prefix_cache is None else {"cached_steps": self._cached_steps,
                                                       "prefix_samples_skipped": self._prefix_skipped,
                                                       "cache_depth": self.prefix_cache.depth,
                                                       "cache_filled": self.prefix_cache.filled,
                                                       "flops_added": self._prefix_flops}
        self.telemetry.record(self.telemetry_name, "epoch", epoch=self.learn.epoch, n_frozen=len(frozen),
                              params_frozen=sum(p.numel() for _, m in frozen for p in m.parameters()), **cache)
        self._cached_steps = self._prefix_skipped = self._prefix_flops = 0

    def _stop_recording(self):
        dl = getattr(self, "_recording_dl", None)
        if dl is not None:
            del dl.get_idxs  # the instance attribute: the class's method shows again
            self._recording_dl = self._idxs = None

    def restore(self):
        if self.learn is None:
            return
        self._end_cached_batch()
        self._stop_recording()
        if self.freezer is not None:
            self.freezer.restore(training=self.learn.model.training)
        self.prefix_cache = None

    @property
    def frozen_layers(self) -> list[str]:
        """Names of the layers frozen now."""
        return [] if self.freezer is None else [n for n, _ in self.freezer.layers[:self.freezer.n_frozen]]


def _freezing_for_tests():
    return LayerFreezing(start=0.25)


register("layer_freezing", _freezing_for_tests, "model")
