"""Static data pruning (score once, train on the hardest subset) as a fastai callback."""

from __future__ import annotations

import torch
from torch import nn

from ..callback import per_sample_losses
from ..core.distributed import all_reduce_sum
from ..core.infobatch import EpochPlan, ScoreTable, derive_seed, random_plan
from ..core.sampling import el2n, hardest, static_plan
from ..registry import register
from .pruning import PlanDL, WeightedLoss, WeightedPlanCallback

__all__ = ["StaticPrune"]


class StaticPrune(WeightedPlanCallback):
    """Static pruning baseline: score every sample once early in training, then keep the hardest.

    **What it does.** Trains the first `score_epoch` epochs on all the data, then scores every training
    sample with the model as it stands at that point: one extra forward pass over the training set, in
    order, without gradients, computed as the training forward computes it (BatchNorm normalises with
    each batch's statistics) but with dropout off; the pass changes nothing in the model (BatchNorm's
    running statistics are put back). Not in eval mode: this early, BatchNorm's running averages lag
    behind the weights, and eval-mode scores chose subsets that cost 4-5 points of accuracy in our
    measurement (tutorial 01's quick setting, 3 seeds: 76.2% vs 80.5%, full data 81.5%). The score
    is the sample's loss or its EL2N score ||softmax(p) - onehot(y)||_2. Then it keeps the
    N - round(`fraction` * N) highest-scoring samples for the rest of training, reshuffled each epoch,
    with weight 1 (nothing is rescaled: the pruned samples are gone, not down-sampled). The subset is
    chosen once and kept for later fits.

    **Paper.** Paul, Ganguli & Dziugaite, "Deep Learning on a Data Diet: Finding Important Examples
    Early in Training", NeurIPS 2021 (EL2N; they score at ~10% of training, averaged over several
    runs). The static baseline that dynamic pruning (InfoBatch, Qin et al. 2024, Table 1) is compared
    against.

    **What it saves.** Compute: after the scoring epochs, `fraction` of the samples forwarded and
    backpropagated. It spends one forward over the training set (no backward) once, for scoring: about a
    third of a full-data epoch's work, which the bench's work column counts. Nothing in memory.

    **Defaults.** `fraction=0.3` (the pruned share), `score="el2n"`, `score_epoch=1`. Expect a loss of
    accuracy that grows with `fraction` (the paper: none up to ~30-50% on CIFAR-10 with a well-trained scorer).

    **Use.** `Learner(dls, model, loss_func=CrossEntropyLossFlat(), cbs=StaticPrune(0.3))`;
    `score="loss"` for any per-sample loss, `"el2n"` for classification logits and integer labels.

    **Interactions.** Like InfoBatch: before `MixUp`/`CutMix`, before the distributed trainer (scores
    merged across ranks before the subset is chosen), works with `MixedPrecision`, workers, checkpoints.
    Inactive during `lr_find`.

    **Telemetry** (source `"static_prune"`): per epoch kept / pruned counts, the score histogram split
    into kept and pruned (after scoring) with the cut-off score (threshold); samples forwarded; stream
    `"scoring"` {fit, epoch, forward_only_samples}: the samples the scoring pass forwarded.
    """

    telemetry_name = "static_prune"

    def __init__(self, fraction: float = 0.3, score: str = "el2n", score_epoch: int = 1, seed: int | None = None):
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"fraction must be in [0, 1) (the share of the training set pruned), got {fraction}")
        if score not in ("loss", "el2n"):
            raise ValueError(f"score must be 'loss' or 'el2n', got {score!r}")
        if int(score_epoch) != score_epoch or score_epoch < 1:
            raise ValueError(f"score_epoch must be an integer >= 1 (full-data epochs before pruning), "
                             f"got {score_epoch}")
        super().__init__(1.0, seed)
        self.fraction, self.score, self.score_epoch = fraction, score, int(score_epoch)
        self.table: ScoreTable | None = None
        self.subset: torch.Tensor | None = None

    def setup(self, n_samples: int) -> None:
        device = next(self.learn.model.parameters()).device
        if self.table is not None and self.table.n != n_samples:
            self._warn(f"the training set changed size ({self.table.n} -> {n_samples} samples): scoring again")
            self.table = self.subset = None
        if self.table is None:
            self.table = ScoreTable(n_samples, device, initial=-1.0)  # below any loss or EL2N: "unscored"
        self.table.to(device)
        if self.subset is not None:
            self.subset = self.subset.to(device)
        self.plan_seed = derive_seed(self.seed, self.fit_count)

    @property
    def scoring(self) -> bool:
        """This epoch trains on all the data and writes scores."""
        return self.subset is None and self.learn.epoch == self.score_epoch - 1

    def make_plan(self, epoch: int) -> EpochPlan:
        if self.subset is None:
            return random_plan(self.table.n, 0.0, epoch, self.plan_seed, device=self.table.device)
        return static_plan(self.subset, self.table.scores, epoch, self.plan_seed)

    def weigh(self, losses: torch.Tensor, pred=None, *yb) -> torch.Tensor:
        return torch.ones_like(losses)

    def after_train(self):
        if self.active and self.scoring:
            (scored,) = all_reduce_sum([self._score_all()])  # every rank scores the whole set
            self.subset = hardest(self.table.scores, self.fraction)
            self.telemetry.record(self.telemetry_name, "scoring", fit=self.fit_count, epoch=self.learn.epoch,
                                  forward_only_samples=scored)
        super().after_train()

    @torch.no_grad()
    def _score_all(self) -> int:
        """Score every training sample with the model as it is now (training-mode forward, dropout off, no
        gradients, buffers put back); returns the samples forwarded. Every rank scores the whole set, so every
        rank chooses the same subset."""
        learn, model = self.learn, self.learn.model
        base = self.plan_dl.dl
        follow_plan = getattr(base, "follow_plan", None)  # a device loader: gathered on the device, not augmented
        if follow_plan is not None:
            dl = follow_plan(torch.arange(self.table.n), drop_last=False, train=False)
        else:
            dl = PlanDL(base, list(range(self.table.n)))
            dl.drop_last = False
        lf = learn.loss_func
        lf = getattr(lf, "loss_func", lf) if isinstance(lf, WeightedLoss) else lf
        n_inp = getattr(learn.dls, "n_inp", 1)
        was_training = model.training
        buffers = [b.clone() for b in model.buffers()]  # BatchNorm's running statistics
        forwarded = 0
        model.train()
        for m in model.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.eval()
        try:
            for b in dl:
                xb, yb = b[:n_inp], b[n_inp:]
                pred = model(*xb)
                n = dl.batch_idx.numel()
                score = per_sample_losses(lf, pred, *yb, n=n) if self.score == "loss" else el2n(pred, yb[0])
                self.table.update(dl.batch_idx, score)
                forwarded += n
        finally:
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)
            model.train(was_training)
        self.table.sync()
        return forwarded

    def state_dict(self) -> dict:
        return super().state_dict() | {"table": None if self.table is None else self.table.state_dict(),
                                       "subset": None if self.subset is None else self.subset.clone()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        table, self.subset = state["table"], state["subset"]
        self.table = None
        if table is not None:
            self.table = ScoreTable(table["scores"].numel(), table["scores"].device)
            self.table.load_state_dict(table)


def _for_tests():
    return StaticPrune(fraction=0.3, score="el2n", score_epoch=1, seed=0)


register("static_prune", _for_tests, "data", stateful=True)
