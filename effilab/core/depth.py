"""Stochastic depth (Huang et al. 2016) and progressive layer dropping (Zhang & He 2020) on residual blocks,
with the skipped work really skipped.

Two modes:
- "block": a dropped block is not computed for the whole batch (its output is its shortcut); a kept one is
  `shortcut(x) + branch(x) / keep`. The drop decision is drawn on a CPU generator: no device read.
- "sample": the branch runs only on the kept samples (`index_select`), its output added back at their rows
  (`index_add`) scaled by `1 / keep`; the dropped samples pass through the shortcut. The kept rows are drawn
  on the CPU too (the batch size is a shape, not a device value), so the subset's size needs no sync.

The `1 / keep` train-time scaling ("inverted" stochastic depth, as in timm and torchvision) makes the model at
evaluation the plain one: nothing of the technique stays in the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .residual import ResidualBlock, require_residual_blocks

__all__ = ["DepthDropper", "MODES", "linear_decay_keep", "pld_keep", "pld_theta"]

MODES = ("block", "sample")


def _check_prob(value, name: str, low_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise TypeError(f"{name} must be a number in (0, 1], got {value!r}")
    if not (0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return float(value)


def linear_decay_keep(n_blocks: int, final_keep: float) -> list[float]:
    """Huang et al.'s linear decay rule: block l of L (1-based) is kept with `1 - l / L * (1 - final_keep)`,
    so the first block is almost always kept and the last with `final_keep` (the paper uses 0.5)."""
    final_keep = _check_prob(final_keep, "final_keep")
    return [1.0 - (i + 1) / n_blocks * (1.0 - final_keep) for i in range(n_blocks)]


def pld_theta(progress: float, theta_bar: float = 0.5, gamma: float = 10.0) -> float:
    """PLD's global keep probability `theta(t) = (1 - theta_bar) * exp(-gamma * t) + theta_bar`: 1 at the start,
    decaying to `theta_bar`. Here `t` is the fit's progress in [0, 1] (fastai's `pct_train`), so `gamma` is in
    units of the whole run (DeepSpeed's 0.001 per step over a 10k-step run is gamma=10) and the schedule
    scales with the run's budget."""
    return (1.0 - theta_bar) * math.exp(-gamma * progress) + theta_bar


def pld_keep(n_blocks: int, progress: float, theta_bar: float = 0.5, gamma: float = 10.0) -> list[float]:
    """PLD's keep probability of each block at `progress`: the linear depth scaling of stochastic depth with
    `theta(t)` as the last block's keep probability (deeper blocks are dropped more)."""
    return linear_decay_keep(n_blocks, pld_theta(progress, theta_bar, gamma))


def _host(t: torch.Tensor) -> torch.Tensor:
    """Mark a CPU draw as host memory (the `_effilab_host` flag of `effilab.system.recorder.host_buffer`): reading
    it waits for no device, which a check that emulates CUDA's synchronisation on the CPU must know."""
    t._effilab_host = True
    return t


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (one generator stream per (seed, fit, step, block)): exact resume needs
    nothing but the step counter."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class DepthDropper:
    """Drops residual blocks of `model` during training, per step, with given keep probabilities.

    Call `begin_step(step, keep)` before each training forward (`keep[i]` for the i-th block of
    `residual_blocks(model)`); the blocks' forwards then ask this dropper. `end_step()` returns what ran.
    `remove()` puts the model back as it was. Host-side counters only (the decisions come from a CPU
    generator): `ran_blocks`, `samples_run`/`samples_seen` per block, `flops_skipped` (training FLOPs, forward
    and backward counted as three forwards, from each block's forward FLOPs per sample measured once).
    """

    def __init__(self, model: nn.Module, mode: str = "block", seed: int = 0, technique: str = "stochastic depth"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.model, self.mode, self.seed, self.technique = model, mode, seed, technique
        self.stream = 0  # another stream per fit
        self.blocks: list[ResidualBlock] = []
        self._index: dict[int, int] = {}
        self.keep: list[float] = []
        self.step = -1
        self._gen = torch.Generator()
        self.flops_per_sample: dict[int, float] = {}  # id(block) -> forward FLOPs of its branch for one sample
        self.reset_counts()
        self.refresh()

    def refresh(self) -> list[ResidualBlock]:
        """(Re)attach to the model's current blocks (growth may have added some)."""
        blocks = require_residual_blocks(self.model, self.technique)
        if [id(b) for b in blocks] != [id(b) for b in self.blocks]:
            old = {id(b): i for i, b in enumerate(self.blocks)}
            for b in self.blocks:
                b.depth_hook = None
            self.blocks = blocks
            self._index = {id(b): i for i, b in enumerate(blocks)}
            for b in blocks:
                b.depth_hook = self._forward
            # a grown model keeps the counts of its old blocks; new blocks start at zero
            for name in ("ran_blocks", "samples_run", "samples_seen"):
                counts = getattr(self, name)
                setattr(self, name, [counts[old[id(b)]] if id(b) in old else 0 for b in blocks])
            self._step_ran = [0.0] * len(blocks)
        return self.blocks

    def remove(self) -> None:
        for b in self.blocks:
            b.depth_hook = None
        self.blocks, self._index = [], {}

    def reset_counts(self) -> None:
        n = len(getattr(self, "blocks", []))
        self.ran_blocks = [0] * n  # steps in which block i ran (on at least one sample)
        self.samples_run = [0] * n
        self.samples_seen = [0] * n
        self.flops_skipped = 0.0
        self.flops_blocks = 0.0  # training FLOPs all blocks would have cost
        self.steps = 0
        self.dropped: list[ResidualBlock] = []  # since the last optimizer step
        self.ran_since_step: list[ResidualBlock] = []
        self._step_ran: list[float] = []

    def begin_step(self, step: int, keep: Sequence[float]) -> None:
        if len(keep) != len(self.blocks):
            raise ValueError(f"{len(keep)} keep probabilities for {len(self.blocks)} residual blocks")
        self.step, self.keep = int(step), [float(k) for k in keep]
        self._step_ran = [0.0] * len(self.blocks)
        self.steps += 1

    def clear_dropped_grads(self) -> None:
        """Before an optimizer step: no gradient (None, not zeros) for the parameters of the blocks that ran on
        no sample since the last step (gradient accumulation keeps what earlier micro-batches gave). The
        optimizer skips them, as if the block did not exist for this step (no momentum step, no weight decay; a
        layer-wise trust ratio never divides by a zero gradient). fastai zeroes gradients instead of freeing
        them, so without this a dropped block would get a zero-gradient step in an uninterrupted run but none in
        a resumed one."""
        ran = {id(b) for b in self.ran_since_step}
        for block in self.dropped:
            if id(block) not in ran:
                for p in block.parameters():
                    p.grad = None

    def after_optimizer_step(self) -> None:
        self.dropped, self.ran_since_step = [], []

    def end_step(self) -> list[float]:
        """Per block, the fraction of this step's samples its branch ran on (block mode: 0 or 1)."""
        return list(self._step_ran)

    # -- the blocks' forward during training
    def _forward(self, block: ResidualBlock, x: torch.Tensor) -> torch.Tensor:
        i = self._index.get(id(block))
        # a block this step does not know (a forward outside the fit), or a FLOP count on the meta device (the
        # bench's counter counts the whole model and subtracts the `flops_skipped` reported per epoch)
        if i is None or self.step < 0 or x.is_meta:
            return block.shortcut(x) + block.scaled_branch(block.branch(x))
        keep, n = self.keep[i], x.shape[0]
        per_sample = self._flops(block, x)
        self.samples_seen[i] += n
        self.flops_blocks += 3 * per_sample * n
        self._gen.manual_seed(_mix(self.seed, self.stream, self.step, i))
        if self.mode == "block":
            if keep < 1.0 and _host(torch.rand((), generator=self._gen)).item() >= keep:  # sync-ok: a CPU draw
                self.flops_skipped += 3 * per_sample * n
                self.dropped.append(block)
                return block.shortcut(x)
            self._ran(i, n, n)
            self.ran_since_step.append(block)
            return block.shortcut(x) + block.scaled_branch(block.branch(x)) / keep
        kept = _host(torch.rand(n, generator=self._gen) < keep).nonzero().flatten()  # sync-ok: a CPU draw
        m = kept.numel()
        self.flops_skipped += 3 * per_sample * (n - m)
        out = block.shortcut(x)
        if m == 0:
            self.dropped.append(block)
            return out
        self._ran(i, m, n)
        self.ran_since_step.append(block)
        if m == n:
            return out + block.scaled_branch(block.branch(x)) / keep
        kept = kept.to(x.device, non_blocking=True)
        f = block.scaled_branch(block.branch(x.index_select(0, kept))) / keep
        return out.index_add(0, kept, f.to(out.dtype))

    def _ran(self, i: int, m: int, n: int) -> None:
        self.ran_blocks[i] += 1
        self.samples_run[i] += m
        self._step_ran[i] = m / n

    def _flops(self, block: ResidualBlock, x: torch.Tensor) -> float:
        """Forward FLOPs of the block's branch per sample, measured once on one sample in eval mode (BatchNorm
        statistics and random streams untouched)."""
        key = id(block)
        if key not in self.flops_per_sample:
            flags = [(m, m.training) for m in block.modules()]
            try:
                block.eval()
                with torch.no_grad(), FlopCounterMode(display=False) as counter:
                    block.branch(x[:1].detach())
                self.flops_per_sample[key] = float(counter.get_total_flops())
            finally:
                for m, flag in flags:
                    m.training = flag
        return self.flops_per_sample[key]

    def epoch_summary(self) -> dict:
        """Host-side counters since the last `reset_counts` (read per epoch)."""
        seen = self.samples_seen
        return {"steps": self.steps, "ran_blocks": list(self.ran_blocks), "samples_run": list(self.samples_run),
                "samples_seen": list(seen),
                "kept_fraction": [r / s if s else 1.0 for r, s in zip(self.samples_run, seen)],
                "flops_skipped": self.flops_skipped, "flops_blocks": self.flops_blocks}
