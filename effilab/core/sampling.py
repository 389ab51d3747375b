"""Data sampling on tensors: importance sampling plans, Selective Backprop's selection, static pruning.

Plain PyTorch only. Plans (`importance_plan`, `stale_selection_plan`, `static_plan`) are one vectorised
O(N) pass per epoch, drawn from a generator seeded by (seed, epoch); the per-step pieces
(`LossHistory`, `select_exact`, `select_fixed`, `el2n`) are device ops without host reads, except the
one `select_exact` documents.

References: Katharopoulos & Fleuret, "Not All Samples Are Created Equal: Deep Learning with Importance
Sampling", ICML 2018; Jiang et al., "Accelerating Deep Learning by Focusing on the Biggest Losers",
arXiv 1910.00762 (2019); Paul et al., "Deep Learning on a Data Diet", NeurIPS 2021 (EL2N).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .batch_schedule import round_times
from .distributed import is_distributed
from .infobatch import EpochPlan, _generator, _histogram, random_plan

__all__ = [
    "LossHistory",
    "SamplingPlan",
    "el2n",
    "hardest",
    "importance_plan",
    "importance_probabilities",
    "percentile_ranks",
    "select_exact",
    "select_fixed",
    "stale_selection_plan",
    "static_plan",
]


@dataclass
class SamplingPlan(EpochPlan):
    """An `EpochPlan` with extra per-epoch statistics (device scalars, read once in `summary`)."""

    stats: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return super().summary() | {k: float(v) for k, v in self.stats.items()}  # sync-ok: once per epoch


def _counts(n: int, drawn: torch.Tensor, rescaled: torch.Tensor) -> torch.Tensor:
    kept = drawn.sum()
    return torch.stack([kept, n - kept, rescaled.sum()])


# ------------------------------------------------------------------------------ importance sampling


def importance_probabilities(scores: torch.Tensor, uniform: float) -> torch.Tensor:
    """p_i = (1 - uniform) * s_i / sum(s) + uniform / N: proportional to the (non-negative) score, mixed
    with the uniform distribution so that no sample starves (p_i >= uniform / N)."""
    s = scores.float().clamp_min(0.0)
    n = s.numel()
    total = s.sum()
    share = torch.where(total > 0, s / total.clamp_min(torch.finfo(s.dtype).tiny), torch.full_like(s, 1.0 / n))
    return (1.0 - uniform) * share + uniform / n


def importance_plan(scores: torch.Tensor, epoch: int, seed: int, uniform: float, draws: float = 1.0,
                    scored: bool = True) -> SamplingPlan:
    """Draw round(draws * N) dataset indices with replacement, P(i) = `importance_probabilities`, each
    sample weighted 1 / (N p_i): the expected weighted mean gradient of the epoch's batches is the
    full-data mean gradient. Before any score exists (`scored=False`) the epoch is a uniform shuffle of
    the same size, with weights 1."""
    n = scores.numel()
    m = max(1, round_times(draws, n))
    if not scored:
        plan = random_plan(n, 1.0 - m / n, epoch, seed, device=scores.device)
        one = torch.ones((), device=scores.device)
        return SamplingPlan(**vars(plan), stats={"ess": one, "max_weight": one, "min_weight": one,
                                                 "prob_spread": one})
    if n >= 2**24:
        raise ValueError(f"torch.multinomial draws from at most 2**24 categories; this training set has {n}")
    gen = _generator(scores.device, seed, epoch)
    p = importance_probabilities(scores, uniform)
    indices = torch.multinomial(p, m, replacement=True, generator=gen)
    weights = 1.0 / (n * p)
    drawn = torch.zeros(n, dtype=torch.bool, device=scores.device).index_fill_(0, indices, True)
    w = weights.index_select(0, indices)
    stats = {"ess": w.sum() ** 2 / (w * w).sum() / m,  # effective sample size, as a fraction of the draws
             "max_weight": w.max(), "min_weight": w.min(), "prob_spread": p.max() / p.min()}
    hist, edges = _histogram(scores, drawn)
    # At the mean score p_i = 1/N and the weight is exactly 1: below it samples are upweighted.
    return SamplingPlan(epoch, indices, weights, scores.mean(), _counts(n, drawn, drawn & (weights > 1)), hist,
                        edges, False, stats)


# ------------------------------------------------------------------------------ Selective Backprop


def percentile_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Each score's percentile among `scores`: the fraction of scores <= it, in (0, 1]."""
    ranked = scores.sort().values
    return torch.searchsorted(ranked, scores.contiguous(), right=True).float() / scores.numel()


class LossHistory:
    """A ring buffer of the most recent per-sample losses on the device; percentiles against it.

    `size` and the fill level are host integers advanced by batch shapes, so nothing reads the device.
    """

    def __init__(self, size: int = 2048, device: torch.device | str = "cpu"):
        if size < 1:
            raise ValueError(f"the loss history needs at least one entry, got size={size}")
        self.size = int(size)
        self.values = torch.zeros(self.size, device=device)
        self.pos = self.filled = 0

    def push(self, losses: torch.Tensor) -> None:
        losses = losses.detach().float().reshape(-1)[-self.size:]
        # A non-finite loss would poison every percentile: it counts as a very large finite one.
        losses = torch.nan_to_num(losses, nan=0.0, posinf=torch.finfo(torch.float32).max)
        b = losses.numel()
        idx = torch.arange(self.pos, self.pos + b, device=self.values.device) % self.size
        self.values.index_copy_(0, idx, losses.to(self.values.device))
        self.pos = (self.pos + b) % self.size
        self.filled = min(self.size, self.filled + b)

    def percentiles(self, losses: torch.Tensor) -> torch.Tensor:
        """Fraction of the history at or below each loss (1.0 for a loss above all of it)."""
        if self.filled == 0:
            return torch.ones_like(losses, dtype=torch.float32)
        ranked = self.values[:self.filled].sort().values
        pct = torch.searchsorted(ranked, losses.detach().float().contiguous(), right=True)
        return pct.float() / self.filled

    def sync(self) -> None:
        """Rank 0's history on every rank (one broadcast; call it once per epoch)."""
        if is_distributed():
            dist.broadcast(self.values, 0)

    def state_dict(self) -> dict:
        return {"values": self.values.clone(), "pos": self.pos, "filled": self.filled}

    def load_state_dict(self, state: dict) -> None:
        self.values = state["values"].to(self.values.device).clone()
        self.size, self.pos, self.filled = self.values.numel(), state["pos"], state["filled"]


def select_exact(losses: torch.Tensor, probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Indices of the samples kept for backward: each independently with probability `probs`, and the
    largest loss always (never an empty batch). The subset's size is data-dependent: `nonzero` reads it
    back to the host (the one host read per step of exact Selective Backprop)."""
    keep = torch.rand(probs.shape, generator=gen, device=probs.device) < probs
    keep |= torch.arange(losses.numel(), device=losses.device) == losses.argmax()
    return keep.nonzero().squeeze(1)  # sync-ok: the subset size, once per step (documented trade-off)


def select_fixed(probs: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """`k` indices drawn without replacement with probability proportional to `probs`: a fixed-size
    backward batch, so no host read at all."""
    return torch.multinomial(probs.float() + 1e-12, k, replacement=False, generator=gen)


def stale_selection_plan(scores: torch.Tensor, beta: float, epoch: int, seed: int) -> EpochPlan:
    """Stale Selective Backprop: keep sample i this epoch with probability percentile(score_i)^beta
    (percentile among all stored scores), the highest score always; shuffled; weights 1."""
    gen = _generator(scores.device, seed, epoch)
    n = scores.numel()
    probs = percentile_ranks(scores) ** beta
    keep = torch.rand(n, generator=gen, device=scores.device) < probs
    keep |= torch.arange(n, device=scores.device) == scores.argmax()
    kept_idx = keep.nonzero().squeeze(1)  # sync-ok: once per epoch
    indices = kept_idx[torch.randperm(kept_idx.numel(), generator=gen, device=scores.device)]
    hist, edges = _histogram(scores, keep)
    return SamplingPlan(epoch, indices, torch.ones(n, device=scores.device), scores.median(),
                        _counts(n, keep, torch.zeros_like(keep)), hist, edges, False,
                        {"mean_select_prob": probs.mean()})


# ------------------------------------------------------------------------------ static pruning


def el2n(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """EL2N score per sample: || softmax(pred) - onehot(target) ||_2 (Paul et al. 2021)."""
    if pred.dim() != 2 or pred.shape[1] < 2 or target.dim() != 1 or target.dtype.is_floating_point:
        raise ValueError(f"EL2N needs class logits (n, classes) and integer labels (n,), got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)} {target.dtype}: use score='loss'")
    probs = pred.detach().float().softmax(-1)
    return (probs - F.one_hot(target.long(), probs.shape[-1])).norm(dim=-1)


def hardest(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """The indices of the N - round(fraction * N) highest scores (ties: the lower index first)."""
    n_keep = scores.numel() - round_times(fraction, scores.numel())
    return scores.sort(descending=True, stable=True).indices[:n_keep]


def static_plan(subset: torch.Tensor, scores: torch.Tensor, epoch: int, seed: int) -> EpochPlan:
    """An epoch over the fixed `subset`, reshuffled by the epoch's generator; weights 1."""
    gen = _generator(scores.device, seed, epoch)
    n = scores.numel()
    keep = torch.zeros(n, dtype=torch.bool, device=scores.device).index_fill_(0, subset, True)
    indices = subset[torch.randperm(subset.numel(), generator=gen, device=subset.device)]
    hist, edges = _histogram(scores, keep)
    return EpochPlan(epoch, indices, torch.ones(n, device=scores.device), scores.index_select(0, subset).min(),
                     _counts(n, keep, torch.zeros_like(keep)), hist, edges, False)
