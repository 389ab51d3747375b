"""Progressive resizing as a fastai callback: small images first, full resolution at the end."""

from __future__ import annotations

from ..core.curriculum import resize_batch, resized_shape
from ..registry import register
from .batch_schedule import BatchScheduleCallback

__all__ = ["ProgressiveResize"]

_MODES = ("bilinear", "bicubic", "area", "nearest", "nearest-exact")


class ProgressiveResize(BatchScheduleCallback):
    """Progressive resizing: train on down-scaled images first and on full-resolution ones at the end.

    **What it does.** Each training batch of images (N, C, H, W) is resized on its device
    (`F.interpolate`) to `scale * (H, W)`, each side rounded to a multiple of `multiple`. The scale grows
    linearly with `learn.pct_train` from `start` to 1 at `1 - finetune_frac` of the fit; the last
    `finetune_frac` trains at full resolution (so the model ends adapted to the size it is evaluated at).
    Labels are untouched (classification). Validation and prediction always see full-size images. A
    schedule of `pct_train`: a shorter fit rescales it, and a resumed run replays it exactly.

    **Paper.** fast.ai's DAWNBench ImageNet entry (Howard et al., 2018: 128 -> 224 -> 288 px); Composer's
    `ProgressiveResizing` (MosaicML, 2022: `initial_scale=0.5`, `finetune_fraction=0.2`), which this follows.
    Small images cost roughly `scale**2` of the compute per sample in convolutional layers.

    **Defaults.** `start=0.5`, `finetune_frac=0.2` (Composer's), `multiple=4`, `mode="bilinear"` (no
    antialias: cheap; `"area"` averages pixels for stronger down-scaling). At these defaults the fit
    forwards about 2/3 of the full-resolution pixels (0.8 * mean of scale**2 over the ramp + 0.2 = 0.667)
    and, by Composer's and fast.ai's reports, about the same accuracy: the full-size end recovers it.

    **Use.** `Learner(dls, model, cbs=ProgressiveResize())` with a model that accepts any input size
    (global pooling before the head, e.g. `effilab.datasets.small_model`, timm/torchvision CNNs).

    **Interactions.** Order -2: runs before fastai's `MixUp`/`CutMix` (order 0), which then mix the
    resized batch; before `MixedPrecision` (resizing in the input's dtype). Works with `num_workers>0`
    (resizing happens on the device, after the loader), a second `fit`, checkpoints and `export`
    (nothing of it stays in the model). Inactive during `lr_find`.

    **Telemetry.** Source `"schedule"`: meta `planned["resolution"]` (the height over `pct`) and stream
    `"step"` {`iter`, `pct`, `resolution`} at each change. Source `"progressive_resize"`: meta `full`
    ([H, W]); stream `"epoch"` {`epoch`, `resolution`, `pixels_forwarded`, `pixels_full`, `relative`, and
    the totals over all fits} -- pixels forwarded relative to full resolution, the compute-saving proxy.
    """

    telemetry_name = "progressive_resize"
    key, unit = "resolution", "pixels"

    def __init__(self, start: float = 0.5, finetune_frac: float = 0.2, multiple: int = 4, mode: str = "bilinear"):
        if not 0.0 < start <= 1.0:
            raise ValueError(f"start must be in (0, 1] (the initial scale of each image side), got {start}")
        if not 0.0 <= finetune_frac < 1.0:
            raise ValueError(f"finetune_frac must be in [0, 1) (the final part of the fit at full size), "
                             f"got {finetune_frac}")
        if not isinstance(multiple, int) or multiple < 1:
            raise ValueError(f"multiple must be a positive int (sizes are rounded to it), got {multiple!r}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        super().__init__()
        self.start, self.finetune_frac, self.multiple, self.mode = start, finetune_frac, multiple, mode

    def full_size(self, xb, yb):
        x = xb[0]
        if x.dim() != 4:
            raise TypeError(f"ProgressiveResize needs image batches (N, C, H, W); got shape {tuple(x.shape)}")
        return tuple(x.shape[-2:])

    def size_at(self, pct, full):
        return resized_shape(full, pct, self.start, self.finetune_frac, self.multiple)

    def value_of(self, size) -> int:
        return int(size[0])

    def units(self, size) -> int:
        return int(size[0]) * int(size[1])

    def reshape(self, xb, yb, size, full):
        return (resize_batch(xb[0], size, self.mode), *xb[1:]), yb


def _progressive_resize_for_tests():
    return ProgressiveResize(start=0.5, finetune_frac=0.25, multiple=4)


register("progressive_resize", _progressive_resize_for_tests, "data", stateful=False, task="image",
         inputs=("image",))
