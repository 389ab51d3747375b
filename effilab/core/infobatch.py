"""InfoBatch on tensors: a device-resident score table, an epoch plan, a sampler and a weighted loss.

Plain PyTorch only. The per-step path (`InfoBatchPruner.weighted_loss`) is a handful of device ops with
no host synchronisation; planning (`plan_epoch`) is one vectorised O(N) pass per epoch.

Reference: Qin et al., "InfoBatch: Lossless Training Speed Up by Unbiased Dynamic Data Pruning",
ICLR 2024 (arXiv 2303.04947).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from .batch_schedule import floor_times, round_times
from .distributed import is_distributed

__all__ = [
    "EpochPlan",
    "IndexedDataset",
    "InfoBatchPruner",
    "InfoBatchSampler",
    "ScoreTable",
    "check_ratio_delta",
    "derive_seed",
    "plan_epoch",
    "random_plan",
]

HIST_BINS = 40


def check_ratio_delta(ratio: float, delta: float) -> None:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1) (the probability of dropping a well-learned sample), got {ratio}")
    if not 0.0 < delta <= 1.0:
        raise ValueError(f"delta must be in (0, 1] (the fraction of epochs that may prune), got {delta}")


def derive_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for (run seed, epoch): distinct epochs get unrelated streams."""
    h = (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % 2**64
    h ^= h >> 31
    return h % 2**63


def _generator(device: torch.device, seed: int, epoch: int) -> torch.Generator:
    # A fresh generator per epoch: the plan is a pure function of (scores, seed, epoch), so a resumed run
    # replays it exactly, nothing unpicklable is stored, and the global RNGs are never touched.
    return torch.Generator(device=device).manual_seed(derive_seed(seed, epoch))


class ScoreTable:
    """Per-sample scores on the training device; one vectorised write per batch.

    `momentum=None` keeps the latest loss (as the paper's official code does); `momentum=m` keeps an EMA
    `m * old + (1 - m) * loss` (a sample's first loss is taken as is). Non-finite losses are not written
    and are counted on the device. Under `torch.distributed`, each rank writes the samples it saw and
    `sync()` merges the tables (one all-reduce per epoch): positions are implicit, so no index travels
    as a float and the merge is exact for any dataset size.
    """

    def __init__(self, n: int, device: torch.device | str = "cpu", momentum: float | None = None,
                 initial: float = 1.0):
        if n <= 0:
            raise ValueError(f"the score table needs at least one sample, got n={n}")
        if momentum is not None and not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be None or in [0, 1), got {momentum}")
        self.n, self.momentum = int(n), momentum
        device = torch.device(device)
        # All scores start equal, so the first epoch keeps everything (nothing is below the mean).
        self.scores = torch.full((self.n,), float(initial), device=device)
        self.seen = torch.zeros(self.n, dtype=torch.bool, device=device)  # has a finite loss (EMA mode)
        self.touched = torch.zeros(self.n, dtype=torch.bool, device=device)  # written this epoch (DDP)
        self.nonfinite = torch.zeros((), dtype=torch.int64, device=device)  # merged over ranks at sync()
        self.pending_nonfinite = torch.zeros((), dtype=torch.int64, device=device)
        self.dirty = False  # written since the last sync (a host flag: checking it costs nothing)

    @property
    def device(self) -> torch.device:
        return self.scores.device

    def update(self, idx: torch.Tensor, losses: torch.Tensor) -> None:
        """Write per-sample losses at dataset indices `idx`. No host sync."""
        idx = idx.to(self.device, non_blocking=True).long().reshape(-1)
        losses = losses.detach().to(self.device, torch.float32).reshape(-1)
        old = self.scores.index_select(0, idx)
        finite = torch.isfinite(losses)
        new = losses
        if self.momentum is not None:
            seen = self.seen.index_select(0, idx)
            new = torch.where(seen, self.momentum * old + (1.0 - self.momentum) * losses, losses)
            # no boolean-mask indexing (`idx[finite]`): its output size would need a host sync
            self.seen.index_copy_(0, idx, seen | finite)
        self.scores.index_copy_(0, idx, torch.where(finite, new, old))
        if is_distributed():
            self.touched.index_fill_(0, idx, True)
        self.pending_nonfinite += finite.numel() - finite.sum()
        self.dirty = True

    def to(self, device: torch.device | str) -> ScoreTable:
        for name in ("scores", "seen", "touched", "nonfinite", "pending_nonfinite"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def sync(self) -> None:
        """Make every rank's table identical (average where several ranks saw a sample) and fold in the
        non-finite count. Collective (every rank calls it after the same batches); a no-op when nothing
        was written since the last call."""
        if not self.dirty:
            return
        if is_distributed():
            count = self.touched.to(torch.float32)
            total = self.scores * count
            seen = self.seen.to(torch.int32)
            dist.all_reduce(total)
            dist.all_reduce(count)
            dist.all_reduce(seen, op=dist.ReduceOp.MAX)
            dist.all_reduce(self.pending_nonfinite)
            self.scores = torch.where(count > 0, total / count.clamp_min(1.0), self.scores)
            self.seen = seen.bool()
        self.nonfinite += self.pending_nonfinite
        self.pending_nonfinite.zero_()
        self.touched.zero_()
        self.dirty = False

    def state_dict(self) -> dict:
        self.sync()
        return {"scores": self.scores.clone(), "seen": self.seen.clone(), "nonfinite": self.nonfinite.clone(),
                "momentum": self.momentum}

    def load_state_dict(self, state: dict) -> None:
        if state["scores"].numel() != self.n:
            raise ValueError(f"saved score table has {state['scores'].numel()} samples, this one {self.n}")
        self.scores = state["scores"].to(self.device).clone()
        self.seen = state["seen"].to(self.device).clone()
        self.nonfinite = state["nonfinite"].to(self.device).clone()
        self.momentum = state["momentum"]
        self.touched.zero_()
        self.pending_nonfinite.zero_()
        self.dirty = False


@dataclass
class EpochPlan:
    """What one epoch trains on. Tensors live on the score table's device.

    `indices` are the kept dataset indices in training order; `weights[i]` is the loss weight of sample
    `i` this epoch (1/(1-r) for rescaled survivors, else 1); `counts` = (kept, pruned, rescaled);
    `hist` = score histogram, row 0 kept and row 1 pruned, over `edges`.
    """

    epoch: int
    indices: torch.Tensor
    weights: torch.Tensor
    threshold: torch.Tensor
    counts: torch.Tensor
    hist: torch.Tensor
    edges: torch.Tensor
    annealing: bool

    def __len__(self) -> int:
        return self.indices.numel()

    def summary(self) -> dict:
        """Host-side copy for telemetry (one sync; call it once per epoch, not per step)."""
        kept, pruned, rescaled = self.counts.tolist()  # sync-ok: once per epoch
        return {
            "epoch": self.epoch,
            "threshold": float(self.threshold),  # sync-ok: once per epoch
            "kept": kept, "pruned": pruned, "rescaled": rescaled,
            "annealing": self.annealing,
            "hist_kept": self.hist[0].tolist(), "hist_pruned": self.hist[1].tolist(),  # sync-ok
            "hist_edges": self.edges.tolist(),  # sync-ok: once per epoch
        }


def _histogram(scores: torch.Tensor, keep: torch.Tensor, bins: int = HIST_BINS):
    # Range [min, mean + 3 std] keeps the threshold (the mean) in view under a long-tailed loss; the tail
    # lands in the last bin. One float histogram over "bin + bins * pruned" (float ops and histc are
    # several times faster than integer keys and bincount on CPU). All on device: no sync.
    lo = scores.min()
    hi = torch.maximum(torch.minimum(scores.max(), scores.mean() + 3 * scores.std(correction=0)), lo + 1e-6)
    # float32 counts are exact below 2**24 per bin
    dtype = torch.float32 if scores.numel() < 2**24 else torch.float64
    key = (scores.to(dtype) - lo).mul_(bins / (hi - lo)).clamp_(0, bins - 0.5)
    key.add_(torch.where(keep, 0.0, float(bins)))
    hist = torch.histc(key, bins=2 * bins, min=0, max=2 * bins).long().view(2, bins)
    edges = lo + (hi - lo) * torch.linspace(0, 1, bins + 1, device=scores.device)
    return hist, edges


def plan_epoch(scores: torch.Tensor, ratio: float, epoch: int, seed: int, annealing: bool = False) -> EpochPlan:
    """InfoBatch's plan for one epoch: soft-prune below-mean samples with probability `ratio`,
    rescale the survivors by 1/(1-ratio), shuffle; in annealing epochs keep all with weight 1."""
    gen = _generator(scores.device, seed, epoch)
    n = scores.numel()
    threshold = scores.mean()
    if annealing or ratio == 0.0:
        well = torch.zeros(n, dtype=torch.bool, device=scores.device)
        keep = torch.ones(n, dtype=torch.bool, device=scores.device)
    else:
        well = scores < threshold
        drop = well & (torch.rand(n, generator=gen, device=scores.device) < ratio)
        keep = ~drop
    rescaled = well & keep
    weights = torch.where(rescaled, 1.0 / (1.0 - ratio), 1.0).to(torch.float32)
    kept_idx = keep.nonzero().squeeze(1)
    n_kept = kept_idx.numel()
    indices = kept_idx[torch.randperm(n_kept, generator=gen, device=scores.device)]
    counts = torch.stack([torch.tensor(n_kept, device=scores.device), torch.tensor(n - n_kept, device=scores.device),
                          rescaled.sum()])
    hist, edges = _histogram(scores, keep)
    return EpochPlan(epoch, indices, weights, threshold, counts, hist, edges, annealing)


def random_plan(n: int, fraction: float, epoch: int, seed: int, annealing: bool = False,
                device: torch.device | str = "cpu") -> EpochPlan:
    """The Random* baseline: drop a uniformly random `fraction` of the data this epoch, weights 1."""
    device = torch.device(device)
    gen = _generator(device, seed, epoch)
    n_keep = n if annealing else n - round_times(fraction, n)
    indices = torch.randperm(n, generator=gen, device=device)[:n_keep]
    zero = torch.zeros((), dtype=torch.int64, device=device)
    counts = torch.stack([zero + n_keep, zero + (n - n_keep), zero])
    return EpochPlan(epoch, indices, torch.ones(n, device=device), torch.zeros((), device=device), counts,
                     torch.zeros(2, HIST_BINS, dtype=torch.int64, device=device),
                     torch.zeros(HIST_BINS + 1, device=device), annealing)


class InfoBatchPruner:
    """InfoBatch state for one run: scores, the current epoch's plan, and the weighted loss.

    Use it from any loop (see `InfoBatchSampler` for a `DataLoader`)::

        pruner = InfoBatchPruner(len(train_ds), num_epochs=E, ratio=0.5, delta=0.875, seed=0, device=dev)
        loader = DataLoader(IndexedDataset(train_ds), batch_size=128, sampler=InfoBatchSampler(pruner))
        for epoch in range(E):
            for idx, (x, y) in loader:
                losses = F.cross_entropy(model(x.to(dev)), y.to(dev), reduction="none")
                pruner.weighted_loss(losses, idx).backward()
                ...

    `ratio` is the probability of dropping a sample whose score is below the mean (not the fraction
    of the dataset dropped); from epoch floor(delta * num_epochs) on, every sample is used with weight 1.
    """

    def __init__(self, num_samples: int, num_epochs: int, ratio: float = 0.5, delta: float = 0.875,
                 seed: int = 0, device: torch.device | str = "cpu", momentum: float | None = None):
        check_ratio_delta(ratio, delta)
        if num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
        self.ratio, self.delta, self.seed = float(ratio), float(delta), int(seed)
        self.num_epochs = int(num_epochs)
        self.table = ScoreTable(num_samples, device, momentum)
        self.plan: EpochPlan | None = None

    @property
    def num_samples(self) -> int:
        return self.table.n

    @property
    def anneal_epoch(self) -> int:
        """First epoch trained on the full data with unit weights: floor(delta * num_epochs), exactly
        (delta=0.7 of 90 epochs: 63)."""
        return floor_times(self.delta, self.num_epochs)

    def start_epoch(self, epoch: int | None = None, annealing: bool | None = None) -> EpochPlan:
        """Plan `epoch` (default: the one after the current plan). Idempotent for the current epoch.
        `annealing`: whether this epoch anneals (None: `epoch >= anneal_epoch`; a budgeted fit decides it
        from its progress instead)."""
        if epoch is None:
            epoch = 0 if self.plan is None else self.plan.epoch + 1
        if self.plan is not None and self.plan.epoch == epoch:
            return self.plan
        self.table.sync()
        self.plan = plan_epoch(self.table.scores, self.ratio, epoch, self.seed,
                               annealing=epoch >= self.anneal_epoch if annealing is None else annealing)
        return self.plan

    def weighted_loss(self, losses: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Record per-sample `losses` of samples `idx` and return the weighted mean to backpropagate."""
        return (losses * self.weights_of(losses, idx)).mean()

    def weights_of(self, losses: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Record per-sample `losses` and return this epoch's loss weights for `idx` (no host sync)."""
        if self.plan is None:
            raise RuntimeError("no epoch is planned yet: iterate the sampler or call start_epoch() first")
        idx = idx.to(self.table.device, non_blocking=True).long().reshape(-1)
        if losses.dim() != 1 or losses.shape[0] != idx.numel():
            raise ValueError(f"got losses of shape {tuple(losses.shape)} for {idx.numel()} indices: "
                             "pass one loss per sample (reduction='none')")
        self.table.update(idx, losses)
        return self.weights_for(idx).to(losses.dtype)

    def weights_for(self, idx: torch.Tensor) -> torch.Tensor:
        """This epoch's loss weights of samples `idx`, recording nothing (no host sync)."""
        if self.plan is None:
            raise RuntimeError("no epoch is planned yet: iterate the sampler or call start_epoch() first")
        return self.plan.weights.index_select(0, idx.to(self.table.device, non_blocking=True).long().reshape(-1))

    def state_dict(self) -> dict:
        plan = None
        if self.plan is not None:
            plan = {k: getattr(self.plan, k) for k in
                    ("epoch", "indices", "weights", "threshold", "counts", "hist", "edges", "annealing")}
        return {"ratio": self.ratio, "delta": self.delta, "seed": self.seed, "num_epochs": self.num_epochs,
                "table": self.table.state_dict(), "plan": plan}

    def load_state_dict(self, state: dict) -> None:
        self.ratio, self.delta, self.seed = state["ratio"], state["delta"], state["seed"]
        self.num_epochs = state["num_epochs"]
        self.table.load_state_dict(state["table"])
        plan = state["plan"]
        self.plan = None if plan is None else EpochPlan(**{
            k: v.to(self.table.device) if torch.is_tensor(v) else v for k, v in plan.items()})


class InfoBatchSampler(Sampler[int]):
    """A `DataLoader` sampler that yields the pruner's plan, sharded by rank.

    Its length is the true length of the epoch about to run: asked before an epoch's iteration (by a
    progress bar, `len(loader)` or a scheduler), it plans that epoch first. Iterating it again starts
    the next epoch; `set_epoch(e)` plans epoch `e` explicitly. Under `torch.distributed` every rank
    plans the same epoch (same scores, same seed) and takes a disjoint shard, padded like
    `DistributedSampler` so all ranks step equally often.
    """

    def __init__(self, pruner: InfoBatchPruner, rank: int | None = None, world_size: int | None = None):
        self.pruner = pruner
        if world_size is None:
            world_size = dist.get_world_size() if is_distributed() else 1
        if rank is None:
            rank = dist.get_rank() if is_distributed() else 0
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.rank, self.world_size = rank, world_size
        self._started = False  # the current plan's iteration has begun
        self._finished = False  # ... and has run to the end

    def set_epoch(self, epoch: int) -> None:
        """The next iteration is epoch `epoch` (planned now unless it already is)."""
        self.pruner.start_epoch(epoch)
        self._started = self._finished = False

    def _current(self) -> EpochPlan:
        if self.pruner.plan is None or self._finished:
            self.pruner.start_epoch()
            self._started = self._finished = False
        return self.pruner.plan

    def shard(self, indices: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return indices
        total = math.ceil(indices.numel() / self.world_size) * self.world_size
        reps = math.ceil(total / max(indices.numel(), 1))
        padded = indices.repeat(reps)[:total]
        return padded[self.rank::self.world_size]

    def __len__(self) -> int:
        return math.ceil(len(self._current()) / self.world_size)

    def __iter__(self) -> Iterator[int]:
        if self._started:  # a second pass without set_epoch: the next epoch
            self._finished = True
        plan = self._current()
        self._started = True
        yield from self.shard(plan.indices).tolist()  # sync-ok: once per epoch, the loader needs host ints
        self._finished = True


class IndexedDataset(torch.utils.data.Dataset):
    """Wraps a dataset so items come as `(index, item)`: the loop learns which samples it trained on.

    Plain attributes only (no `__getattr__`): it pickles for spawn-based workers.
    """

    def __init__(self, dataset):
        try:
            len(dataset)
        except TypeError:
            raise TypeError("InfoBatch needs an indexable dataset with a length (map-style), not "
                            f"{type(dataset).__name__}: it must know every sample's index") from None
        if isinstance(dataset, torch.utils.data.IterableDataset):
            raise TypeError("InfoBatch needs an indexable dataset with a length (map-style), not an IterableDataset")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        return i, self.dataset[i]
