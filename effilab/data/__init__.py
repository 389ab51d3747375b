"""Data-centric techniques (survey category 1): which samples to train on, and when."""

from .easy_to_hard import EasyToHard
from .infobatch import InfoBatch, RandomPrune
from .progressive_resize import ProgressiveResize
from .seq_len_warmup import SeqLenWarmup

__all__ = ["EasyToHard", "InfoBatch", "ProgressiveResize", "RandomPrune", "SeqLenWarmup"]
