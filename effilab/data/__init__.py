"""Data-centric techniques (survey category 1): which samples to train on, and when."""

from .easy_to_hard import EasyToHard
from .importance_sampling import ImportanceSampling
from .infobatch import InfoBatch, RandomPrune
from .progressive_resize import ProgressiveResize
from .selective_backprop import SelectiveBackprop
from .seq_len_warmup import SeqLenWarmup
from .static_prune import StaticPrune

__all__ = ["EasyToHard", "ImportanceSampling", "InfoBatch", "ProgressiveResize", "RandomPrune", "SelectiveBackprop",
           "SeqLenWarmup", "StaticPrune"]
