"""Loss-based importance sampling (Katharopoulos & Fleuret 2018) as a fastai callback."""

from __future__ import annotations

import torch

from ..core.infobatch import EpochPlan, derive_seed
from ..core.sampling import importance_plan
from ..registry import register
from .pruning import ScoredPlanCallback

__all__ = ["ImportanceSampling"]


class ImportanceSampling(ScoredPlanCallback):
    """Importance sampling: draw each epoch's samples in proportion to their loss, weight them back.

    **What it does.** Keeps a (smoothed) loss per training sample on the device. Each epoch draws
    round(`draws` * N) samples *with replacement*, sample i with probability
    p_i = (1 - `uniform`) * s_i / sum(s) + `uniform` / N, and weights its loss by 1 / (N p_i), so that the
    expected weighted gradient of every batch is the full-data mean gradient (unbiased); the gradient
    variance falls when the loss tracks the gradient norm. Before any score exists (the first epoch
    of the first fit) the epoch is a uniform shuffle with weights 1. Validation is never sampled.

    **Paper.** Katharopoulos & Fleuret, "Not All Samples Are Created Equal: Deep Learning with
    Importance Sampling", ICML 2018 (arXiv 1803.00942). The paper scores a presampled large batch with
    the current model (an upper bound of the gradient norm); this version uses the stored training
    losses, as the paper's loss-based baseline does, which costs no extra forward pass.

    **Defaults.** `uniform=0.3` (no sample's probability falls below 0.3/N, so no weight exceeds
    1/0.3), `momentum=0.5` (the score is an EMA of the sample's losses: a single noisy loss does not
    decide its next draws), `draws=1.0` (an epoch forwards N samples: the same budget as full data;
    lower it to spend fewer samples). The gain is a lower-variance gradient, not fewer samples,
    unless `draws < 1`.

    **Use.** `Learner(dls, model, loss_func=CrossEntropyLossFlat(), cbs=ImportanceSampling())`. The
    reported training loss is the weight-normalised mean (it estimates the full-data loss).

    **Interactions.** Like InfoBatch: before `MixUp`/`CutMix` (they wrap its loss), before the
    distributed trainer (which shards its plan; the score tables are merged each epoch), works with
    `MixedPrecision`, loader workers, a second fit (the scores carry over), checkpoints, `export`.
    Inactive during `lr_find`. Not combinable with another data plan (InfoBatch, static pruning).

    **Telemetry** (source `"importance_sampling"`): per epoch the distinct samples drawn (kept) and never
    drawn (pruned), a score histogram split alike, the weight-1 score (threshold: the mean score), the
    effective sample size `ess` (fraction of the draws), `max_weight`, `min_weight`, `prob_spread`
    (max p / min p); samples forwarded.
    """

    telemetry_name = "importance_sampling"

    def __init__(self, uniform: float = 0.3, momentum: float | None = 0.5, draws: float = 1.0,
                 seed: int | None = None):
        if not 0.0 < uniform <= 1.0:
            raise ValueError(f"uniform must be in (0, 1] (the uniform share of the sampling probability; 0 "
                             f"would give never-drawn samples infinite weights), got {uniform}")
        if not 0.0 < draws <= 1.0:
            raise ValueError(f"draws must be in (0, 1] (samples drawn per epoch / training set size), got {draws}")
        super().__init__(1.0, seed, momentum)
        self.uniform, self.draws = uniform, draws

    def setup(self, n_samples: int) -> None:
        self.setup_table(n_samples)
        self.plan_seed = derive_seed(self.seed, self.fit_count)  # a new stream per fit

    def make_plan(self, epoch: int) -> EpochPlan:
        return importance_plan(self.table.scores, epoch, self.plan_seed, self.uniform, self.draws, self.scored)

    def weigh(self, losses: torch.Tensor, pred=None, *yb) -> torch.Tensor:
        idx = self.plan_dl.batch_idx.to(self.plan.weights.device, non_blocking=True)
        return self.plan.weights.index_select(0, idx).to(losses.dtype)


def _for_tests():
    return ImportanceSampling(uniform=0.3, seed=0)


register("importance_sampling", _for_tests, "data", stateful=True)
