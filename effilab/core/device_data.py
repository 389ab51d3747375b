"""A data set held as tensors on the training device: index plans, batches gathered on the device, and
batched augmentations (flip, translate, normalise), the way airbench feeds CIFAR-10 to a GPU.

Plain PyTorch. Every per-batch operation is a device op with no host read: a batch is
`x.index_select(0, idx)` for a device tensor of dataset indices `idx`, and the augmentations draw from an
explicit `torch.Generator` seeded per (seed, epoch). A plan (the order of an epoch, possibly a subset or
with repeats) is a device tensor of indices, so pruning and sampling plans never visit the host.

Reference: K. Jordan, airbench (github.com/KellerJordan/cifar10-airbench), `CifarLoader`: uint8 images on
the GPU, random translation by masked copies of a padded batch, alternating flips, `randperm` shuffling.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .infobatch import derive_seed

__all__ = ["Augment", "DatasetTooLarge", "DeviceTensors", "batch_plan", "epoch_generator", "epoch_order",
           "free_memory", "translate", "flip_mask"]

GiB = 2**30


class DatasetTooLarge(MemoryError):
    """The data set does not fit the memory allowed for it on the device."""


def free_memory(device: torch.device | str) -> int:
    """Bytes free on `device`: CUDA's free memory, else the host's available memory (`MemAvailable`)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _fmt(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB / 10 else f"{nbytes / 2**20:.1f} MiB"


class DeviceTensors(torch.utils.data.Dataset):
    """Samples as rows of tensors (`x` and `y`, same first dimension) on one device.

    `gather(idx)` takes the rows at a device tensor of indices (no host read); `ds[i]` gives one item like
    any map-style data set (for code that asks for one).
    """

    n_inp = 1  # fastai's DataLoader forwards unknown attributes to its data set (`dls.n_inp`)

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
            raise TypeError(f"x and y must be tensors, got {type(x).__name__} and {type(y).__name__}")
        if x.dim() == 0 or y.dim() == 0 or len(x) != len(y):
            raise ValueError(f"x and y need the same first dimension (one row per sample), got shapes "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
        if x.device != y.device:
            raise ValueError(f"x and y are on different devices ({x.device}, {y.device})")
        self.x, self.y = x, y

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def nbytes(self) -> int:
        return self.x.nbytes + self.y.nbytes

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x.index_select(0, idx), self.y.index_select(0, idx)

    def to(self, device) -> DeviceTensors:
        return DeviceTensors(self.x.to(device), self.y.to(device))

    def new_empty(self) -> DeviceTensors:
        # what `learn.export` keeps of the data: nothing but the shapes and types
        return DeviceTensors(self.x[:0], self.y[:0])

    def __repr__(self) -> str:
        return (f"DeviceTensors(n={len(self)}, x={tuple(self.x.shape[1:])} {self.x.dtype}, y={self.y.dtype}, "
                f"device={self.device})")


def check_fits(parts: dict[str, DeviceTensors], device, budget: int | None = None,
               fraction: float = 0.5) -> None:
    """Raise `DatasetTooLarge` (before anything is copied) if the data sets need more than `budget` bytes
    on `device` (default: `fraction` of its free memory, leaving the rest to the model and activations).
    The message says how large they are, what is free, and how many training samples would fit."""
    device = torch.device(device)
    need = sum(p.nbytes for p in parts.values() if p.device != device)  # what is already there costs nothing
    if not need:
        return
    free = free_memory(device)
    allowed = int(free * fraction) if budget is None else int(budget)
    if need <= allowed:
        return
    train = parts["train"]
    per_sample = max(1, train.nbytes // max(1, len(train)))
    others = need - (train.nbytes if train.device != device else 0)
    fit = max(0, (allowed - others) // per_sample)
    sizes = ", ".join(f"{k} {len(p)} samples {_fmt(p.nbytes)}" for k, p in parts.items())
    limit = f"a budget of {_fmt(allowed)}" if budget is not None else \
        f"{fraction:.0%} of the {_fmt(free)} free there"
    raise DatasetTooLarge(
        f"the data set needs {_fmt(need)} on {device} ({sizes}; {_fmt(per_sample)} per training sample, x "
        f"{train.x.dtype}) but the loader may use {limit}: about {fit} training samples fit. Train on a subset "
        f"(e.g. `subset={fit}`), store the images as uint8 and let `Augment` scale and normalise them on the "
        "device, raise `memory_budget`, or use fastai's DataLoader, which streams from host memory.")


def epoch_generator(device, seed: int, epoch: int) -> torch.Generator:
    """A fresh generator on `device` for (seed, epoch): an epoch's draws are a pure function of both, so
    a resumed run replays them and the global RNGs are never touched."""
    return torch.Generator(device=torch.device(device)).manual_seed(derive_seed(seed, epoch))


def epoch_order(n: int, shuffle: bool, generator: torch.Generator | None, device) -> torch.Tensor:
    """The indices of an epoch over all `n` samples: a device `randperm`, or `arange` in order."""
    if shuffle:
        return torch.randperm(n, generator=generator, device=device)
    return torch.arange(n, device=device)


def batch_plan(indices: torch.Tensor, bs: int, drop_last: bool) -> tuple[torch.Tensor, ...]:
    """The plan split into batches of `bs` (views; the last one shorter unless dropped). Shapes only: no
    host read."""
    n = indices.numel()
    if drop_last:
        indices = indices[:n // bs * bs]
    return torch.split(indices, bs) if indices.numel() else ()


def flip_mask(idx: torch.Tensor, generator: torch.Generator, alternate: torch.Tensor | None,
              epoch: int) -> torch.Tensor:
    """Which samples of a batch to flip: a fair coin each (`alternate=None`), or airbench's alternating
    flip: sample i is flipped in even epochs iff `alternate[i]`, and the other way round in odd epochs,
    so every image is seen both ways every two epochs."""
    if alternate is None:
        return torch.rand(idx.numel(), generator=generator, device=idx.device) < 0.5
    return alternate.index_select(0, idx) ^ bool(epoch % 2)


def translate(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random translation of a batch of images (N, C, H, W) by up to `pad` pixels each way: a crop of the
    reflect-padded batch at a random offset per image, done as two batched gathers (rows, then columns)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    offset = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=x.device)
    rows = (offset[0, :, None] + torch.arange(h, device=x.device)).view(n, 1, h, 1).expand(n, c, h, w + 2 * pad)
    cols = (offset[1, :, None] + torch.arange(w, device=x.device)).view(n, 1, 1, w).expand(n, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


def _check_number(name: str, value, lo: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if lo is not None and value <= lo:
        raise ValueError(f"{name} must be > {lo}, got {value!r}")


@dataclass
class Augment:
    """Batched augmentation of image batches (N, C, H, W) on their device.

    `flip`: False, True (a fair coin per image per epoch) or "alternate" (airbench's alternating flip).
    `translate`: up to this many pixels each way (reflect padding, 0 = off). `mean`/`std`: per-channel
    normalisation (None = off), after uint8 images are scaled to [0, 1] (`scale`; floats are kept as they
    are). `dtype`: the batch's floating type (e.g. torch.bfloat16). Flip and translate apply to training
    batches only; scaling, normalisation and the dtype to every batch.
    """

    flip: bool | str = False
    translate: int = 0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    dtype: torch.dtype = torch.float32

    def __post_init__(self):
        if self.flip not in (False, True, "alternate"):
            raise ValueError(f"flip must be False, True or 'alternate', got {self.flip!r}")
        if isinstance(self.translate, bool) or not isinstance(self.translate, int) or self.translate < 0:
            raise TypeError(f"translate must be an int >= 0 (pixels each way), got {self.translate!r}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std (per-channel normalisation), or neither")
        if self.mean is not None:
            self.mean, self.std = tuple(self.mean), tuple(self.std)
            if len(self.mean) != len(self.std):
                raise ValueError(f"mean and std need one value per channel, got {len(self.mean)} and {len(self.std)}")
            for m in self.mean:
                _check_number("mean", m)
            for s in self.std:
                _check_number("std", s, lo=0.0)
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {self.dtype!r}")
        self._stats: dict = {}  # (device, dtype) -> mean and std as tensors: made once, not per batch

    @property
    def spatial(self) -> bool:
        return bool(self.flip) or self.translate > 0

    def check(self, x: torch.Tensor) -> None:
        """Raise if these augmentations cannot apply to samples like `x` (the whole data set)."""
        if (self.spatial or self.mean is not None) and x.dim() != 4:
            raise ValueError(f"Augment works on images (N, C, H, W); the samples have shape {tuple(x.shape[1:])}")
        if self.translate and min(x.shape[-2:]) <= self.translate:
            raise ValueError(f"translate={self.translate} needs images larger than that ({tuple(x.shape[-2:])})")
        if self.mean is not None and len(self.mean) not in (1, x.shape[1]):
            raise ValueError(f"mean/std have {len(self.mean)} values for {x.shape[1]} channels")

    def __call__(self, x: torch.Tensor, idx: torch.Tensor, train: bool, generator: torch.Generator | None,
                 alternate: torch.Tensor | None = None, epoch: int = 0) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.to(self.dtype).div_(255.0)
        elif x.dtype != self.dtype and x.is_floating_point():
            x = x.to(self.dtype)
        if self.mean is not None:
            key = (x.device, x.dtype)
            if key not in self._stats:
                self._stats[key] = tuple(torch.tensor(v, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
                                         for v in (self.mean, self.std))
            mean, std = self._stats[key]
            x = (x - mean) / std
        if not train:
            return x
        if self.flip:
            x = torch.where(flip_mask(idx, generator, alternate, epoch).view(-1, 1, 1, 1), x.flip(-1), x)
        if self.translate:
            x = translate(x, self.translate, generator)
        return x
