"""InfoBatch and its Random* baseline as fastai callbacks."""

from __future__ import annotations

import torch

from ..core.batch_schedule import floor_times
from ..core.infobatch import EpochPlan, InfoBatchPruner, check_ratio_delta, derive_seed, random_plan
from ..registry import register
from .pruning import EpochPruningCallback, WeightedLoss, WeightedPlanCallback

__all__ = ["InfoBatch", "RandomPrune"]


def _budget_anneals(learn, delta: float) -> bool | None:
    """Under a `Budget`, whether the epoch starting now anneals: the budget's progress has reached `delta`
    (the epoch count is only the fit's upper bound there); None without one (epoch >= floor(delta * n_epoch))."""
    from ..budget.clock import budget_of

    budget = budget_of(learn)
    return None if budget is None else budget.progress >= delta


class InfoBatch(WeightedPlanCallback):
    """InfoBatch: prune well-learned samples each epoch, rescale the rest: fewer samples forwarded and backpropagated.

    **What it does.** Keeps each training sample's latest loss as its score. At the start of every
    epoch the samples scoring below the mean ("well learned") are dropped with probability `ratio`; the
    survivors among them get loss weight 1/(1-ratio), so the epoch's expected gradient equals the
    full-data gradient. From epoch floor(`delta` * n_epoch) on, training uses all the data with weight 1
    (annealing; under an `effilab.budget.Budget`, from the first epoch that starts with the budget's
    progress at `delta` or more). The first epoch trains on everything (all scores start equal). Validation is never
    pruned.

    **Paper.** Qin et al., "InfoBatch: Lossless Training Speed Up by Unbiased Dynamic Data Pruning", ICLR
    2024 (Oral), arXiv 2303.04947. The paper reports full-data accuracy for CIFAR-10/100 ResNet-18 at ratio
    0.3-0.5 and ImageNet ResNet-50 76.5 vs 76.4 with 40% of the samples saved. "Lossless" is the paper's claim,
    not a guarantee: on the main job's small MLP (README) InfoBatch cost 0.87 points for 32% fewer samples.

    **What it saves.** Compute: samples forwarded and backpropagated (and the steps they make), at some cost
    in accuracy that the paper finds negligible on long runs and that can be measured against
    `RandomPrune` at the same count. Its score bookkeeping costs a little per step.

    **Defaults.** `ratio=0.5`, `delta=0.875` (the paper's). `ratio` is a probability, not the fraction of
    the dataset saved: expect ~25-40% fewer samples forwarded depending on the loss distribution and the
    number of epochs (the first epoch and the annealing epochs use all the data).

    **Use.** `Learner(dls, model, loss_func=CrossEntropyLossFlat(), cbs=InfoBatch(0.5))`, then `fit` or
    `fit_one_cycle` as usual: per-sample losses come from the Learner's own loss (through
    `reduction='none'`), the reported training loss is the weight-normalised mean (comparable to a run
    without InfoBatch), and schedules still span the whole fit (each epoch is 1/n_epoch of it, however
    short). `momentum` switches the score to an EMA of the loss.

    **Interactions.** Runs before `MixUp`/`CutMix` (they wrap its loss) and before the distributed
    trainer of `effilab.system.distrib_ctx` (which shards its plan; every rank plans alike and the scores
    are merged across ranks at each epoch end). Works
    with `MixedPrecision`, `num_workers>0`, a second `fit`, `save_checkpoint`/`load_checkpoint` and
    `export`. Inactive during `lr_find`.

    **Telemetry** (`learn.telemetry`, source `"infobatch"`): per epoch the threshold, kept / pruned /
    rescaled counts, a score histogram split into kept and pruned, and samples forwarded vs full data.
    """

    telemetry_name = "infobatch"

    def __init__(self, ratio: float = 0.5, delta: float = 0.875, momentum: float | None = None,
                 seed: int | None = None):
        check_ratio_delta(ratio, delta)
        if momentum is not None and not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be None or in [0, 1), got {momentum}")
        super().__init__(delta, seed)
        self.ratio, self.momentum = ratio, momentum
        self.pruner: InfoBatchPruner | None = None
        self._warned_nonfinite = 0

    def setup(self, n_samples: int) -> None:
        device = next(self.learn.model.parameters()).device
        if self.pruner is not None and self.pruner.num_samples != n_samples:
            self._warn(f"the training set changed size ({self.pruner.num_samples} -> {n_samples} samples): "
                       "starting a fresh score table")
            self.pruner = None
        if self.pruner is None:
            self.pruner = InfoBatchPruner(n_samples, self.learn.n_epoch, self.ratio, self.delta, self.seed,
                                          device, self.momentum)
            self._warned_nonfinite = 0
        else:
            self.pruner.table.to(device)
        self.pruner.num_epochs = self.learn.n_epoch
        # A new stream per fit: a second fit does not replay the first one's random draws.
        self.pruner.seed = derive_seed(self.seed, self.fit_count)
        self.pruner.plan = None

    def make_plan(self, epoch: int) -> EpochPlan:
        return self.pruner.start_epoch(epoch, annealing=_budget_anneals(self.learn, self.delta))

    def after_train(self):
        if self.active:
            self.pruner.table.sync()  # every rank ends the epoch with the same scores
            nonfinite = int(self.pruner.table.nonfinite)  # sync-ok: once per epoch
            if nonfinite > self._warned_nonfinite:
                if not self._warned_nonfinite:
                    self._warn(f"{nonfinite} non-finite per-sample losses so far were not written into the "
                               "scores (those samples keep their previous score)")
                self._warned_nonfinite = nonfinite
            self.telemetry.record(self.telemetry_name, "nonfinite", epoch=self.learn.epoch, total=nonfinite)
        super().after_train()

    def weigh(self, losses: torch.Tensor, pred=None, *yb) -> torch.Tensor:
        """This batch's loss weights (device ops only)."""
        return self.pruner.weights_for(self.plan_dl.batch_idx).to(losses.dtype)

    def record(self, scores: torch.Tensor) -> None:
        self.pruner.table.update(self.plan_dl.batch_idx, scores)

    def state_dict(self) -> dict:
        return super().state_dict() | {"pruner": None if self.pruner is None else self.pruner.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if state["pruner"] is None:
            self.pruner = None
            return
        table = state["pruner"]["table"]
        self.pruner = InfoBatchPruner(table["scores"].numel(), state["pruner"]["num_epochs"], self.ratio,
                                      self.delta, self.seed, table["scores"].device, self.momentum)
        self.pruner.load_state_dict(state["pruner"])


_InfoBatchLoss = WeightedLoss  # the former name


class RandomPrune(EpochPruningCallback):
    """Random* baseline: each epoch trains on a uniformly random `(1 - fraction)` of the data.

    **What it does.** Drops `fraction` of the training set at random every epoch (a new draw each
    epoch, its own generator), with no rescaling; from epoch floor(`delta` * n_epoch) on it trains on
    everything, annealed like InfoBatch. Pick `fraction` so that it forwards as many samples as the
    InfoBatch run it is compared with ("random pruning at the same sample budget").

    **Paper.** The per-epoch random-pruning baseline of InfoBatch (Qin et al., ICLR 2024), Table 1.

    **Telemetry** (source `"random_prune"`): kept / pruned counts per epoch, samples forwarded.
    """

    telemetry_name = "random_prune"

    def __init__(self, fraction: float = 0.3, delta: float = 0.875, seed: int | None = None):
        check_ratio_delta(fraction, delta)
        super().__init__(delta, seed)
        self.fraction = fraction

    def setup(self, n_samples: int) -> None:
        self.n_samples = n_samples
        self.plan_seed = derive_seed(self.seed, self.fit_count)

    def make_plan(self, epoch: int) -> EpochPlan:
        annealing = _budget_anneals(self.learn, self.delta)
        if annealing is None:
            annealing = epoch >= floor_times(self.delta, self.learn.n_epoch)
        return random_plan(self.n_samples, self.fraction, epoch, self.plan_seed, annealing)


def _infobatch_for_tests():
    return InfoBatch(ratio=0.5, delta=0.75, seed=0)


def _random_prune_for_tests():
    return RandomPrune(fraction=0.3, delta=0.75, seed=0)


register("infobatch", _infobatch_for_tests, "data", stateful=True)
register("random_prune", _random_prune_for_tests, "data", stateful=True)
