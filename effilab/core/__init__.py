"""Plain-PyTorch cores of effilab's techniques: no fastai, no widgets, device-resident state."""

from .infobatch import (
    EpochPlan,
    IndexedDataset,
    InfoBatchPruner,
    InfoBatchSampler,
    ScoreTable,
    plan_epoch,
    random_plan,
)
from .telemetry import Telemetry

__all__ = ["EpochPlan", "IndexedDataset", "InfoBatchPruner", "InfoBatchSampler", "ScoreTable", "Telemetry",
           "plan_epoch", "random_plan"]
