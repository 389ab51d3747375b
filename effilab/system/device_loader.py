"""A device-resident data loader as fastai `DataLoaders`: the whole data set as tensors on the training
device, shuffled, batched and augmented by batched tensor ops (`effilab.core.device_data`), no workers."""

from __future__ import annotations

import random

import torch
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader

from ..core.device_data import Augment, DeviceTensors, batch_plan, check_fits, epoch_generator, epoch_order

__all__ = ["DeviceDataLoader", "DeviceDataLoaders"]


def _check_bs(bs) -> int:
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise TypeError(f"bs must be a positive int (samples per batch), got {bs!r}")
    return bs


class DeviceDataLoader(DataLoader):
    """A fastai `DataLoader` over a `DeviceTensors` data set on its device.

    Each pass draws its order with `torch.randperm` on the device (`shuffle`) from a generator seeded by
    (`seed`, pass number), splits it into batches of `bs` (views), gathers each batch with `index_select`
    and augments it as a batch (`augment`, an `Augment`; flip and translate only if `train`). No
    per-sample Python, no worker processes, no host read per batch. `batch_idx` is the current batch's
    dataset indices (a device tensor).

    `follow_plan(indices)` is the loader of one epoch that trains on a device tensor of dataset indices
    in that order (a pruning or sampling plan): the data techniques hand their plans to it without a
    host copy. The pass number that seeds shuffling and augmentation counts completed training passes;
    `set_epoch(e)` sets it (to resume a run at epoch `e` with the same draws). Under DDP fastai's
    `DistributedDL` shards it through host indices (`get_idxs`, `create_batches`): one copy per epoch.
    """

    def __init__(self, dataset: DeviceTensors | None = None, bs: int = 64, shuffle: bool = False,
                 drop_last: bool = False, device=None, augment: Augment | None = None, seed: int | None = None,
                 train: bool | None = None, plan: torch.Tensor | None = None, **kwargs):
        if not isinstance(dataset, DeviceTensors):
            raise TypeError(f"DeviceDataLoader needs a DeviceTensors data set, got {type(dataset).__name__}: "
                            "build it with DeviceDataLoaders.from_tensors or .from_task")
        if augment is not None and not isinstance(augment, Augment):
            raise TypeError(f"augment must be an effilab Augment or None, got {type(augment).__name__}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        kwargs.pop("num_workers", None)  # what fastai's `new` passes along; there are no workers here
        if augment is not None and len(dataset):
            augment.check(dataset.x)
        # fastai seeds each new DataLoader from the global `random` module: give it its state back.
        state = random.getstate()
        try:
            super().__init__(dataset, bs=_check_bs(bs), shuffle=shuffle, drop_last=drop_last, indexed=True,
                             n=len(dataset) if plan is None else plan.numel(), device=device or dataset.device,
                             **kwargs)
        finally:
            random.setstate(state)
        if self.device != dataset.device:
            self.dataset = dataset = _moved(dataset, self.device)
        self.augment, self.train, self.plan = augment, shuffle if train is None else bool(train), plan
        # Seeded once, from the run's seed unless given (reading torch's initial seed draws nothing).
        self.seed = int(torch.initial_seed() % 2**63) if seed is None else seed
        self.epoch = 0
        self.batch_idx: torch.Tensor | None = None
        self._alternate: torch.Tensor | None = None
        self._parent: DeviceDataLoader | None = None

    # -- fastai DataLoader API
    def __iter__(self):
        self.before_iter()
        gen, order = self._generator(), self.plan
        if order is None:
            order = epoch_order(self.n, self.shuffle, gen, self.device)
        yield from (self.after_batch(b) for b in self._batches(order, gen))
        self.after_iter()

    def create_batches(self, samps):
        # fastai's own machinery (e.g. its DistributedDL) drives a loader through host indices: gather them
        # as device batches (one host-to-device copy of the indices per pass).
        yield from self._batches(torch.as_tensor(list(samps), dtype=torch.long, device=self.device), self._generator())

    def _generator(self) -> torch.Generator | None:
        root = self._parent or self
        if self.plan is None and self.shuffle or self.augment is not None and self.train:
            return epoch_generator(self.device, self.seed, root.epoch)
        return None

    def _batches(self, order: torch.Tensor, gen: torch.Generator | None):
        """The pass over `order`: gathered, augmented batches; `batch_idx` is each one's indices."""
        root = self._parent or self
        epoch = root.epoch
        alternate = root._flip_base() if self.train and self.augment is not None and \
            self.augment.flip == "alternate" else None
        for idx in batch_plan(order, self.bs, self.drop_last):
            x, y = self.dataset.gather(idx)
            if self.augment is not None:
                x = self.augment(x, idx, self.train, gen, alternate, epoch)
            self.batch_idx = idx
            yield x, y
        self.batch_idx = None
        if self.train:
            root.epoch += 1

    def get_idxs(self):
        if self.plan is not None:
            return self.plan.tolist()  # sync-ok: only for fastai code that asks for host indices
        return super().get_idxs()

    def new(self, dataset=None, cls=None, **kwargs):
        kw = dict(dataset=self.dataset if dataset is None else dataset, bs=self.bs, shuffle=self.shuffle,
                  drop_last=self.drop_last, device=self.device, augment=self.augment, seed=self.seed,
                  train=self.train)
        return (cls or type(self))(**(kw | kwargs))

    def to(self, device):
        self.device = device
        if self.dataset.device != self.device:
            self.dataset = _moved(self.dataset, self.device)
            self._alternate = None
        return self

    # -- plans and epochs
    def follow_plan(self, indices: torch.Tensor, **kwargs) -> DeviceDataLoader:
        """The loader of one epoch over dataset `indices` (a 1-d integer tensor, moved to the data's device
        once) in that order, with this loader's batch size, augmentation and pass counter (`kwargs`
        override them: `drop_last=False`, `train=False` for a pass that neither augments nor counts)."""
        if not isinstance(indices, torch.Tensor) or indices.dim() != 1 or indices.is_floating_point():
            raise TypeError("a plan is a 1-d integer tensor of dataset indices")
        kwargs = {"shuffle": False, "train": self.train} | kwargs
        dl = self.new(plan=indices.to(self.device, torch.long, non_blocking=True), **kwargs)
        dl._parent = self._parent or self
        return dl

    @property
    def dl(self) -> DeviceDataLoader | None:
        """The loader a plan view follows (as effilab's PlanDL and fastai's DistributedDL name it)."""
        return self._parent

    def set_epoch(self, epoch: int) -> None:
        """The next training pass is pass `epoch` (its shuffle and augmentation draws)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise TypeError(f"epoch must be an int >= 0, got {epoch!r}")
        (self._parent or self).epoch = epoch

    def _flip_base(self) -> torch.Tensor:
        # airbench's alternating flip: one fair coin per sample, drawn once from the loader's seed
        if self._alternate is None or self._alternate.device != self.device:
            gen = epoch_generator(self.device, self.seed, -1)
            self._alternate = torch.rand(len(self.dataset), generator=gen, device=self.device) < 0.5
        return self._alternate

    def __getstate__(self):
        # a plan view pickles without its parent; the per-sample flip coins are redrawn from the seed
        return self.__dict__ | {"_parent": None, "_alternate": None, "batch_idx": None}

    def __repr__(self) -> str:
        plan = "" if self.plan is None else f", plan of {self.n}"
        return (f"DeviceDataLoader({self.dataset!r}, bs={self.bs}, shuffle={self.shuffle}, "
                f"drop_last={self.drop_last}, augment={self.augment}{plan})")


def _moved(dataset: DeviceTensors, device) -> DeviceTensors:
    check_fits({"train": dataset}, device)
    return dataset.to(device)


def _as_tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
    """x and y of a map-style data set of (x, y) items: its tensors when it has them, else stacked."""
    if isinstance(getattr(ds, "x", None), torch.Tensor) and isinstance(getattr(ds, "y", None), torch.Tensor):
        return ds.x, ds.y
    items = [ds[i] for i in range(len(ds))]  # once, at construction
    return torch.stack([torch.as_tensor(x) for x, _ in items]), torch.stack([torch.as_tensor(y) for _, y in items])


class DeviceDataLoaders(DataLoaders):
    """fastai `DataLoaders` whose loaders hold their data on the training device (`DeviceDataLoader`).

    `DeviceDataLoaders.from_tensors(x_train, y_train, x_valid, y_valid, bs=256, device="cuda",
    augment=Augment(flip=True, translate=2))`, or `.from_task(effilab.datasets.fashion_mnist(), ...)`,
    then `Learner(dls, model, ...)` as usual: every fastai and effilab callback works on it, and the
    data techniques (InfoBatch, Random*, importance sampling, Selective Backprop, static pruning,
    easy-to-hard, the batch-size schedule, progressive resizing) hand it their plans as device tensors.

    The training loader shuffles (`shuffle`), drops its last partial batch (`drop_last`) and augments;
    the validation loader keeps its order, uses `2 * bs` and only scales and normalises. Before copying,
    the data sets are checked against `memory_budget` bytes (default: half the device's free memory): a
    set too large is refused with its size and the number of training samples that would fit.
    """

    @classmethod
    def from_tensors(cls, x_train: torch.Tensor, y_train: torch.Tensor, x_valid: torch.Tensor,
                     y_valid: torch.Tensor, bs: int = 64, device=None, augment: Augment | None = None,
                     seed: int | None = None, shuffle: bool = True, drop_last: bool = True, valid_bs: int | None = None,
                     memory_budget: int | None = None, path=".") -> DeviceDataLoaders:
        _check_bs(bs)
        if valid_bs is not None:
            _check_bs(valid_bs)
        if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, int)
                                          or memory_budget <= 0):
            raise TypeError(f"memory_budget must be a positive int (bytes), got {memory_budget!r}")
        device = torch.device("cpu" if device is None else device)
        train, valid = DeviceTensors(x_train, y_train), DeviceTensors(x_valid, y_valid)
        if train.x.shape[1:] != valid.x.shape[1:]:
            raise ValueError(f"training and validation samples differ in shape: {tuple(train.x.shape[1:])} vs "
                             f"{tuple(valid.x.shape[1:])}")
        if augment is not None and not isinstance(augment, Augment):
            raise TypeError(f"augment must be an effilab Augment or None, got {type(augment).__name__}")
        if augment is not None:
            augment.check(train.x)
        if drop_last and len(train) < bs:
            raise ValueError(f"the {len(train)} training samples make no batch of {bs} with drop_last=True")
        check_fits({"train": train, "valid": valid}, device, memory_budget)
        train, valid = train.to(device), valid.to(device)
        loaders = [DeviceDataLoader(train, bs=bs, shuffle=shuffle, drop_last=drop_last, device=device,
                                    augment=augment, seed=seed, train=True),
                   DeviceDataLoader(valid, bs=valid_bs or 2 * bs, shuffle=False, drop_last=False, device=device,
                                    augment=augment, seed=seed, train=False)]
        return cls(*loaders, path=path, device=device)

    @classmethod
    def from_task(cls, task, bs: int = 64, device=None, augment: Augment | None = None, seed: int | None = None,
                  **kwargs) -> DeviceDataLoaders:
        """From an `effilab.datasets` task (`TaskData`): its train and valid sets as device tensors."""
        if not (hasattr(task, "train") and hasattr(task, "valid")):
            raise TypeError(f"from_task needs an effilab.datasets TaskData, got {type(task).__name__}")
        return cls.from_tensors(*_as_tensors(task.train), *_as_tensors(task.valid), bs=bs, device=device,
                                augment=augment, seed=seed, **kwargs)
