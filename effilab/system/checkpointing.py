"""Activation checkpointing as a fastai callback over `effilab.core.checkpointing` (`torch.utils.checkpoint`)."""

from __future__ import annotations

import math

from fastai.torch_core import get_model

from ..callback import EffilabCallback
from ..core.checkpointing import choose_blocks, find_blocks, restore_forward, saved_activation_bytes, wrap_forward
from ..registry import register

__all__ = ["ActivationCheckpointing"]

_MB = 2**20


class ActivationCheckpointing(EffilabCallback):
    """Activation checkpointing: chosen blocks keep only their inputs for backward and recompute the rest.

    **What it does.** Wraps the forward of chosen blocks in `torch.utils.checkpoint.checkpoint(...,
    use_reentrant=False)` during training (validation and inference run plain). In backward each wrapped
    block runs its forward again to rebuild what it dropped. With `selective=True` the block keeps the
    outputs of its matmuls, convolutions and attention and recomputes only the cheap ops (activations,
    norms, adds), through `torch.utils.checkpoint.create_selective_checkpoint_contexts`. Random ops
    (dropout) replay the same draws, so gradients are those of the unchecked model.

    **Which blocks.** `blocks=None` takes the model's blocks (`effilab.core.checkpointing.find_blocks`: the
    outermost modules with layers of their own inside an `nn.Sequential`/`nn.ModuleList`: transformer layers,
    CNN stages); or name them (`blocks=["blocks.0", "blocks.2"]`). At the first training batch of each fit
    the bytes each block keeps for backward are measured (`saved_tensors_hooks` over one extra forward of
    two samples, scaled to the batch; generators forked, BatchNorm statistics restored). With `budget_mb`
    (MiB of activations kept for backward per step) the fewest blocks, largest first, are then
    checkpointed so that the estimate fits (all of them, and `fits_budget=False`, if even that does not).

    **Paper.** Chen, Xu, Zhang & Guestrin, "Training Deep Nets with Sublinear Memory Cost", 2016;
    selective checkpointing as in PyTorch's SAC and torchtitan's op-level policy.

    **Defaults and why.** Every block, whole: the most memory saved. `selective=False`: on a CPU the
    matmuls are the step; keeping them saves less memory but little time.

    **What it SAVES: memory, at the price of compute.** Activation memory of the checkpointed blocks (about
    all but their inputs), for roughly one extra forward of those blocks per step (~+20-35% step time with
    whole blocks; less with `selective`). Spend the memory on a larger batch or model; alone it makes
    training slower. `benchmarks/checkpointing.py` measures peak memory against step time. The
recomputation is not in the bench's work column (whole-sample passes): its share of a forward depends on
which blocks are checkpointed and, with `selective`, on which ops; read its cost in the step time. Nor is
the measuring forward of two samples per fit, a negligible share of any fit.

    **Interactions.** Restores the original forwards at the end of the fit and when a fit is cancelled or
    interrupted. Works under DDP (non-reentrant checkpointing) and autocast (replayed in the same
    precision). Stochastic depth or freezing that skip a block skip its recomputation too. A model with no
    blocks (a flat MLP, a plain stack of layers) is refused: there is nothing whose activations could go.

    **Telemetry** (source `"checkpointing"`). Meta: `blocks` (found), `checkpointed`, `selective`,
    `budget_mb`, and after the measurement `per_block_mb`, `activation_mb` (the whole model, batch of
    the first step), `saved_mb` (estimated activation memory freed), `fits_budget`. Stream `"epoch"`:
    `fit`, `epoch`, `checkpointed`, `saved_mb`.
    """

    order = 20  # after MixedPrecision (10) enters autocast: the measurement sees the training precision

    def __init__(self, blocks: list[str] | None = None, budget_mb: float | None = None, selective: bool = False):
        if blocks is not None and (isinstance(blocks, str) or not all(isinstance(b, str) for b in blocks)):
            raise TypeError(f"blocks must be a list of module names (e.g. ['blocks.0']) or None, got {blocks!r}")
        if budget_mb is not None:
            if isinstance(budget_mb, bool) or not isinstance(budget_mb, (int, float)):
                raise TypeError(f"budget_mb must be a number of MiB or None, got {budget_mb!r}")
            if not (budget_mb >= 0 and math.isfinite(budget_mb)):
                raise ValueError(f"budget_mb must be a finite number >= 0, got {budget_mb!r}")
        if not isinstance(selective, bool):
            raise TypeError(f"selective must be True or False, got {selective!r}")
        self.blocks, self.budget_mb, self.selective = (None if blocks is None else list(blocks)), budget_mb, selective
        self.fit_count = 0
        self.checkpointed: list[str] = []
        self.saved_mb: float | None = None
        self._wrapped: list = []
        self._pending = self._in_fit = False

    def check_model(self, model) -> None:
        """A clear error for a model without blocks to checkpoint (or without the named ones), before any work."""
        self._find(model)

    def _find(self, model=None) -> dict:
        model = get_model(self.learn.model) if model is None else model
        found = find_blocks(model)
        if self.blocks is None:
            if not found:
                raise ValueError(
                    f"ActivationCheckpointing: {type(model).__name__} has no blocks to checkpoint (modules with "
                    "layers of their own inside an nn.Sequential or nn.ModuleList). Checkpointing a single layer "
                    "saves nothing; group layers into blocks, or name submodules with blocks=[...]")
            return found
        named = dict(model.named_modules())
        missing = [b for b in self.blocks if b not in named or b == ""]
        if missing:
            raise ValueError(f"ActivationCheckpointing: no submodule named {missing}; blocks found: {list(found)}")
        return {b: named[b] for b in self.blocks}

    def before_fit(self):
        self._restore()  # forwards left wrapped by a fit that an exception ended without any event

    def before_train(self):
        if self._pending or self._wrapped or hasattr(self.learn, "lr_finder"):
            return
        self._blocks = self._find()  # bad input: refused before the first batch
        self._in_fit = True
        self.telemetry.set_meta("checkpointing", blocks=list(self._blocks), selective=self.selective,
                                budget_mb=self.budget_mb)
        self._pending = True

    def before_batch(self):
        if not (self._pending and self.training):
            return
        self._pending = False
        xb = self.learn.xb
        bs = len(xb[0])
        sample = tuple(x[:2] for x in xb)
        per_block, total = saved_activation_bytes(get_model(self.learn.model), self._blocks, sample,
                                                   selective=self.selective)
        scale = bs / len(sample[0]) / _MB
        per_block_mb = {n: b * scale for n, b in per_block.items()}
        activation_mb = total * scale
        chosen = (list(self._blocks) if self.budget_mb is None
                  else choose_blocks(per_block, total, self.budget_mb / scale))
        self.checkpointed = chosen
        self.saved_mb = sum(per_block_mb[n] for n in chosen)
        for n in chosen:
            wrap_forward(self._blocks[n], self.selective)
            self._wrapped.append(self._blocks[n])
        self.telemetry.set_meta("checkpointing", checkpointed=chosen, per_block_mb=per_block_mb,
                                activation_mb=activation_mb, saved_mb=self.saved_mb,
                                fits_budget=None if self.budget_mb is None
                                else activation_mb - self.saved_mb <= self.budget_mb)

    def after_epoch(self):
        if self._wrapped:
            self.telemetry.record("checkpointing", "epoch", fit=self.fit_count, epoch=self.epoch,
                                  checkpointed=list(self.checkpointed), saved_mb=self.saved_mb)

    def after_fit(self):
        if self._in_fit:
            self.fit_count += 1
        self._in_fit = False
        self._restore()

    def after_cancel_fit(self):
        self._restore()

    def _restore(self):
        # and every copy of a wrapped block in the model (model growth deepens by copying blocks)
        model = get_model(self.learn.model) if getattr(self, "learn", None) is not None else None
        for m in [*self._wrapped, *(model.modules() if model is not None else ())]:
            restore_forward(m)
        self._wrapped, self._pending = [], False

    def __getstate__(self):  # an export taken mid-fit pickles the model: its forwards must be the originals
        return {k: v for k, v in self.__dict__.items() if k not in ("_wrapped", "_blocks")} | {"_wrapped": []}


register("activation_checkpointing", lambda: ActivationCheckpointing(), "system", task="sequence")
