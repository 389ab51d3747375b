"""Selective Backprop (Jiang et al. 2019) as a fastai callback: backpropagate the biggest losers."""

from __future__ import annotations

import torch
from fastai.torch_core import find_bs
from torch import nn

from ..callback import per_sample_losses
from ..core.distributed import all_reduce_sum, rank
from ..core.infobatch import EpochPlan, ScoreTable, _generator, derive_seed, random_plan
from ..core.sampling import LossHistory, select_exact, select_fixed, stale_selection_plan
from ..registry import register
from .pruning import WeightedPlanCallback

__all__ = ["SelectiveBackprop"]


class SelectiveBackprop(WeightedPlanCallback):
    """Selective Backprop: forward every sample, backpropagate mostly the ones with high loss.

    **What it does.** For each training batch it first runs the model without gradients (the
    selection pass; batch-norm running statistics are left untouched by it) and gets each sample's
    loss; it picks samples with a probability that rises as percentile(loss_i)^`beta` (two laws below),
    the percentile taken over the last `history` losses seen (a device ring buffer); a batch is never
    left empty. Then the Learner forwards and backpropagates only the kept samples, gathered into
    a smaller batch with `index_select`: that is what saves backward compute (and the training
    forward's). With `beta=1` about 1/2 of the samples are backpropagated, with `beta=2` about 1/3
    (1/(1+beta) when the batch's losses are distributed like the history).

    `fixed_size=True` (default): exactly k = max(1, round(bs / (1 + beta))) samples are drawn without
    replacement with probability proportional to percentile^beta: the same expected count and the same
    preference for high losses as the paper's law, and no host read at all (the backward batch has a
    constant shape, friendly to CUDA graphs and `torch.compile`). `fixed_size=False`: the paper's exact
    law, each sample kept independently; the subset's size is then known only on the device, so it costs
    one host read per step (`nonzero`), which stalls a GPU's queue once per step.

    `stale=True` (the paper's StaleSB): no selection pass. Each epoch keeps sample i with probability
    percentile(score_i)^`beta` among the stored losses of the last time each sample was trained on
    (the first epoch of the first fit: everything), so both passes run on the kept samples only.

    **Paper.** Jiang et al., "Accelerating Deep Learning by Focusing on the Biggest Losers",
    arXiv 1910.00762 (2019): CIFAR-10/100, SVHN up to 3.5x faster to a target error; their code
    forwards all, then forwards and backpropagates the selected ones batched up to a full batch.

    **Defaults.** `beta=1` (a moderate selectivity; the paper uses 1-3 for speed-ups), `history=2048`
    losses. The selection pass costs about a forward pass: on this project's 2-core CPU a 50% selection
    was measured at ~0.86x a plain step (the extra forward eats most of the saving); the saving grows
    with `beta` and with the backward/forward cost ratio.

    **Use.** `Learner(..., cbs=SelectiveBackprop(beta=1))`. The reported training loss is the mean of
    the whole batch's selection-pass losses (the stale variant: of the trained subset).

    **Interactions.** Its `before_batch` (order -5) shrinks the batch before `MixUp`/`CutMix` mix it;
    under `MixedPrecision` the selection pass runs in its autocast. Under DDP each rank selects from its
    own shard (backward batches may differ in size; gradients are still averaged), and the loss
    histories are made equal at each epoch end. Counts of forwarded samples by other callbacks that read
    the batch after `before_batch` see the subset (the bench runner's sample counter, fastai's
    `GradientAccumulation`, which then steps after n_acc *backpropagated* samples): read this
    technique's telemetry.

    **Telemetry** (source `"selective_backprop"`): stream `"samples"` per epoch with `forwarded`,
    `forwarded_total`, `backpropagated`, `backpropagated_total` (selection pass + training pass count
    once as forwarded), `forward_only_samples` (the selection pass: the bench's work column counts it as
    forward-only work); stream `"epoch"` the plan (stale: kept / pruned and a score histogram).
    """

    telemetry_name = "selective_backprop"

    def __init__(self, beta: float = 1.0, history: int = 2048, stale: bool = False, fixed_size: bool = True,
                 seed: int | None = None):
        if not beta > 0:
            raise ValueError(f"beta must be > 0 (the selectivity: P(select) = percentile(loss)**beta), got {beta}")
        if int(history) != history or history < 1:
            raise ValueError(f"history must be an integer >= 1 (losses kept for the percentiles), got {history}")
        super().__init__(1.0, seed)
        self.beta, self.history_size, self.stale, self.fixed_size = float(beta), int(history), stale, fixed_size
        self.history: LossHistory | None = None
        self.table: ScoreTable | None = None
        self.scored = False
        self.backpropagated = 0

    def setup(self, n_samples: int) -> None:
        device = next(self.learn.model.parameters()).device
        if self.table is not None and self.table.n != n_samples:
            self.table, self.scored = None, False
        if self.table is None:
            self.table = ScoreTable(n_samples, device)
        if self.history is None:
            self.history = LossHistory(self.history_size, device)
        self.table.to(device)
        self.history.values = self.history.values.to(device)
        self.plan_seed = derive_seed(self.seed, self.fit_count)

    @property
    def weighs_loss(self) -> bool:
        return self.stale  # the stale variant scores the trained samples

    def make_plan(self, epoch: int) -> EpochPlan:
        if self.stale and self.scored:
            return stale_selection_plan(self.table.scores, self.beta, epoch, self.plan_seed)
        return random_plan(self.table.n, 0.0, epoch, self.plan_seed, device=self.table.device)

    def before_train(self):
        super().before_train()
        if not self.active:
            return
        self.epoch_forwarded = self.epoch_backpropagated = 0
        model = self.learn.model
        self._loss_func = self.learn.loss_func  # the Learner's own, before MixUp replaces it
        self._norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                       and m.track_running_stats]
        # Each rank its own stream (different shards), one per (fit, epoch): resumes replay it.
        self._gen = _generator(self.table.device, derive_seed(self.plan_seed, self.learn.epoch),
                               rank())
        self._autocast = next((cb.autocast for cb in self.learn.cbs if isinstance(
            getattr(cb, "autocast", None), torch.autocast)), None)

    def before_batch(self):
        if not (self.active and self.training) or self.stale:
            return
        xb, yb = self.learn.xb, self.learn.yb
        n = find_bs(yb)
        with torch.no_grad():
            losses = self._selection_losses(xb, yb, n)
        probs = self.history.percentiles(losses) ** self.beta
        self.history.push(losses)
        if self.fixed_size:
            sel = select_fixed(probs, max(1, round(n / (1.0 + self.beta))), self._gen)
        else:
            sel = select_exact(losses, probs, self._gen)
        self.learn.xb = tuple(_take(x, sel) for x in xb)
        self.learn.yb = tuple(_take(y, sel) for y in yb)
        self._full_loss = losses.mean()
        self.epoch_forwarded += n
        self.epoch_backpropagated += sel.numel()

    def _selection_losses(self, xb, yb, n):
        norms = [m for m in self._norms if m.training]  # frozen (eval-mode) norms track nothing
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.momentum = 0.0  # running stats unchanged; the training pass updates them once
        try:
            if self._autocast is not None:
                with self._autocast:
                    pred = self.learn.model(*xb)
            else:
                pred = self.learn.model(*xb)
        finally:
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum
                if m.num_batches_tracked is not None:
                    m.num_batches_tracked.sub_(1)
        return per_sample_losses(self._loss_func, pred, *yb, n=n).float()

    def after_loss(self):
        super().after_loss()
        if self.active and self.training and not self.stale:
            self.learn.loss = self._full_loss

    def weigh(self, losses: torch.Tensor, pred=None, *yb) -> torch.Tensor:
        return torch.ones_like(losses)

    def record(self, scores: torch.Tensor) -> None:
        self.table.update(self.plan_dl.batch_idx, scores)

    def after_batch(self):
        if self.active and self.training and self.stale:
            n = find_bs(self.learn.yb)
            self.epoch_forwarded += n
            self.epoch_backpropagated += n

    def after_train(self):
        if not self.active:
            return
        self.table.sync()
        self.history.sync()
        self.scored = True
        forwarded, backpropagated = all_reduce_sum([self.epoch_forwarded, self.epoch_backpropagated])
        self.forwarded += forwarded
        self.backpropagated += backpropagated
        self.telemetry.record(self.telemetry_name, "samples", fit=self.fit_count, epoch=self.learn.epoch,
                              forwarded=forwarded, forwarded_total=self.forwarded, backpropagated=backpropagated,
                              backpropagated_total=self.backpropagated, full_total=self.full_total,
                              forward_only_samples=0 if self.stale else forwarded,
                              expected_fraction=1.0 / (1.0 + self.beta))
        self._deactivate()

    def state_dict(self) -> dict:
        return super().state_dict() | {
            "backpropagated": self.backpropagated, "scored": self.scored,
            "table": None if self.table is None else self.table.state_dict(),
            "history": None if self.history is None else self.history.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.backpropagated, self.scored = state["backpropagated"], state["scored"]
        table, history = state["table"], state["history"]
        self.table = self.history = None
        if table is not None:
            self.table = ScoreTable(table["scores"].numel(), table["scores"].device)
            self.table.load_state_dict(table)
        if history is not None:
            self.history = LossHistory(history["values"].numel(), history["values"].device)
            self.history.load_state_dict(history)


def _take(x, idx):
    return x.index_select(0, idx) if isinstance(x, torch.Tensor) else x


def _for_tests():
    return SelectiveBackprop(beta=1.0, history=256, seed=0)


register("selective_backprop", _for_tests, "data", stateful=True)
