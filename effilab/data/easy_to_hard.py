"""Easy-to-hard (self-paced) curriculum as a fastai callback: each epoch trains on the easiest samples."""

from __future__ import annotations

from fractions import Fraction

import torch

from ..core.batch_schedule import exact, floor_times
from ..core.curriculum import easy_plan, pacing_fraction, planned_curve
from ..core.infobatch import EpochPlan, derive_seed, random_plan
from ..registry import register
from .pruning import ScoredPlanCallback

__all__ = ["EasyToHard"]


class EasyToHard(ScoredPlanCallback):
    """Self-paced easy-to-hard curriculum: train on the lowest-loss samples first, widen to all.

    **What it does.** Keeps each training sample's latest loss (a device-resident score table, written
    from the Learner's own loss with `reduction='none'`). Each epoch trains on the easiest fraction
    `f` of the training set -- the `ceil(f * n)` lowest scores, shuffled by the epoch's own generator --
    where `f` grows linearly with the epoch's starting `pct_train` from `start_frac` to 1 at `full_at`
    of the fit. Samples left out keep their last score and come back as the pace widens. The first
    epoch of a run trains on all the data: before it no sample has a loss, and a random subset would
    leave the unseen samples with no score to rank them by. A second `fit` keeps the scores and paces
    from its first epoch on. Validation is never filtered.

    **Paper.** Bengio et al., "Curriculum Learning", ICML 2009 (easy examples first); Kumar, Packer &
    Koller, "Self-Paced Learning for Latent Variable Models", NeurIPS 2010 (the model's own loss decides
    what is easy; the admitted set grows with a pace parameter). Curricula help most with noisy labels
    and little compute; on clean data expect about the same accuracy for fewer samples forwarded.

    **Defaults.** `start_frac=0.3`, `full_at=0.5`: the second half of the fit uses all the data. With
    E epochs, roughly `1 - full_at * (1 - start_frac) / 2` of the samples are forwarded (0.825 at the
    defaults for many epochs; 0.86 for 10 epochs, as the first epoch uses everything).

    **Use.** `Learner(dls, model, loss_func=CrossEntropyLossFlat(), cbs=EasyToHard())` with fastai
    DataLoaders over an indexable training set; `momentum` switches the score to an EMA of the loss.

    **Interactions.** Like `InfoBatch`, runs before `MixUp`/`CutMix` (their loss wraps the scoring one;
    the score is then the mixed loss) and before the distributed trainer (every rank plans alike; the
    scores are merged at each epoch end). Not meant to be combined with another pruning callback (each
    replaces the training loader). Inactive during `lr_find`.

    **Telemetry.** Source `"easy_to_hard"`: stream `"epoch"` {`kept`, `pruned`, `threshold` (highest
    kept score), score histogram kept/left out, `full_epoch`}, stream `"samples"` (forwarded per epoch
    and in total). Source `"schedule"`: meta `planned["data_frac"]` (the pacing, per epoch) and stream
    `"step"` {`iter`, `pct`, `data_frac`} (the fraction each epoch actually used).
    """

    telemetry_name = "easy_to_hard"

    def __init__(self, start_frac: float = 0.3, full_at: float = 0.5, momentum: float | None = None,
                 seed: int | None = None):
        if not 0.0 < start_frac <= 1.0:
            raise ValueError(f"start_frac must be in (0, 1] (the fraction of the data used first), got {start_frac}")
        if not 0.0 <= full_at <= 1.0:
            raise ValueError(f"full_at must be in [0, 1] (the part of the fit by which all data is used), "
                             f"got {full_at}")
        super().__init__(1.0, seed, momentum)
        self.start_frac, self.full_at = start_frac, full_at
        self._first_epoch = 0

    def fraction_at(self, epoch: int, n_epoch: int) -> float:
        """The fraction of the training set epoch `epoch` of `n_epoch` uses (1 until scores exist)."""
        if not self.scored and epoch == self._first_epoch:
            return 1.0
        return pacing_fraction(Fraction(epoch, n_epoch), exact(self.start_frac), exact(self.full_at))

    def setup(self, n_samples: int) -> None:
        self.setup_table(n_samples)
        self.n_samples = n_samples
        self.plan_seed = derive_seed(self.seed, self.fit_count)
        self._first_epoch = self.learn.epoch
        n_epoch = self.learn.n_epoch
        tel = self.telemetry
        curve = planned_curve(lambda p: float(self.fraction_at(min(floor_times(p, n_epoch), n_epoch - 1), n_epoch)))
        tel.set_meta("schedule", planned=tel.meta("schedule").get("planned", {}) | {"data_frac": curve})

    def make_plan(self, epoch: int) -> EpochPlan:
        frac = self.fraction_at(epoch, self.learn.n_epoch)
        if frac >= 1.0 and not self.scored:
            plan = random_plan(self.n_samples, 0.0, epoch, self.plan_seed, device=self.table.device)
        else:
            plan = easy_plan(self.table.scores, frac, epoch, self.plan_seed)
        self.telemetry.record("schedule", "step", iter=self.learn.train_iter, pct=self.learn.pct_train,
                              data_frac=len(plan) / self.n_samples)
        return plan

    def weigh(self, losses: torch.Tensor, pred, *yb) -> torch.Tensor:
        """Every sample counts once (the scores are written in `record`)."""
        return torch.ones_like(losses)


def _easy_to_hard_for_tests():
    return EasyToHard(start_frac=0.5, full_at=0.5, seed=0)


register("easy_to_hard", _easy_to_hard_for_tests, "data", stateful=True)
