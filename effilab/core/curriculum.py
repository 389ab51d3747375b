"""Curriculum schedules on tensors: progressive resizing, sequence-length warmup, easy-to-hard pacing.

Plain PyTorch only. Every schedule is a host-side function of the fraction of training done (`pct`, fastai's
`pct_train`) that returns a Python number, so a shorter fit rescales it and the per-step path needs no host
read: the size a batch is cut or resized to is known before the batch is touched.

References: progressive resizing (fast.ai DAWNBench 2018; Composer's ProgressiveResizing); sequence-length
warmup (Li, Zhang & He, "The Stability-Efficiency Dilemma", NeurIPS 2022, arXiv 2108.06084); self-paced,
easy-to-hard curricula (Bengio et al., ICML 2009; Kumar, Packer & Koller, NeurIPS 2010).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .batch_schedule import exact
from .infobatch import EpochPlan, _generator, _histogram

__all__ = [
    "N_PCT",
    "easy_plan",
    "pacing_fraction",
    "planned_curve",
    "resize_batch",
    "resize_scale",
    "resized_shape",
    "seq_len_at",
    "truncate_batch",
]

N_PCT = 201  # points of a planned curve: pct = k/200, as effilab.system.fit_recorder samples its schedules


def _ramp(pct: float, ramp_end: float) -> float:
    """0 -> 1 linearly over [0, ramp_end], then 1."""
    if ramp_end <= 0:
        return 1
    return min(1, max(0, pct) / ramp_end)  # exact for Fractions


def _round_to(value: float, multiple: int, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, multiple * round(value / multiple))))


# ---- progressive resizing


def resize_scale(pct: float, start: float, finetune_frac: float) -> float:
    """Scale of the input side at `pct`: `start` -> 1 linearly until `1 - finetune_frac`, then 1."""
    return start + (1.0 - start) * _ramp(pct, 1.0 - finetune_frac)


def resized_shape(full: tuple[int, int], pct: float, start: float, finetune_frac: float,
                  multiple: int) -> tuple[int, int]:
    """(height, width) at `pct` for images of `full` size: each side scaled, rounded to `multiple`
    (at least `multiple`), and exactly `full` once the scale reaches 1."""
    scale = resize_scale(pct, start, finetune_frac)
    if scale >= 1.0:
        return tuple(full)
    return tuple(_round_to(side * scale, multiple, min(multiple, side), side) for side in full)


def resize_batch(x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Images `x` (N, C, H, W) resized to `size` on their device; `x` itself when already that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode in ("bilinear", "bicubic"):
        return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=False)
    return F.interpolate(x, size=size, mode=mode)


# ---- sequence-length warmup


def seq_len_at(pct: float, full: int, start: int, warmup_frac: float, multiple: int = 8) -> int:
    """Training sequence length at `pct`: `start` -> `full` linearly until `warmup_frac`, rounded down to
    `multiple` (never below `start`), then `full`."""
    if pct >= warmup_frac:
        return int(full)
    start = min(int(start), int(full))
    length = start + (full - start) * _ramp(pct, warmup_frac)
    return int(min(full, max(start, multiple * math.floor(length / multiple))))


def truncate_batch(t: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` positions of a (N, T, ...) batch (a view: no copy)."""
    return t if t.shape[1] <= length else t[:, :length]


# ---- easy to hard


def pacing_fraction(pct: float, start_frac: float, full_at: float) -> float:
    """Fraction of the training set an epoch starting at `pct` uses: `start_frac` -> 1 by `full_at`
    (exact when given `fractions.Fraction`s)."""
    return start_frac + (1 - start_frac) * _ramp(pct, full_at)


def easy_plan(scores: torch.Tensor, frac: float, epoch: int, seed: int) -> EpochPlan:
    """The easiest `ceil(frac * n)` samples (lowest score; ties by index), shuffled by the epoch's generator.

    `threshold` is the highest kept score. All on the scores' device; one sort, no host read.
    """
    n = scores.numel()
    k = max(1, min(n, math.ceil(exact(frac) * n)))
    device = scores.device
    order = torch.sort(scores, stable=True).indices
    chosen = order[:k]
    gen = _generator(device, seed, epoch)
    indices = chosen[torch.randperm(k, generator=gen, device=device)]
    keep = torch.zeros(n, dtype=torch.bool, device=device).index_fill_(0, chosen, True)
    zero = torch.zeros((), dtype=torch.int64, device=device)
    counts = torch.stack([zero + k, zero + (n - k), zero])
    hist, edges = _histogram(scores, keep)
    return EpochPlan(epoch, indices, torch.ones(n, device=device), scores[order[k - 1]], counts, hist, edges,
                     annealing=k == n)


# ---- telemetry


def planned_curve(f: Callable[[float], float], n_points: int = N_PCT) -> dict:
    """`{"pct": [...], "value": [...]}` of a schedule `f(pct)`, the format of the "schedule" telemetry."""
    pcts = [i / (n_points - 1) for i in range(n_points)]
    return {"pct": pcts, "value": [f(p) for p in pcts]}
