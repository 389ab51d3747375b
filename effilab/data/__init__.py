"""Data-centric techniques (survey category 1): which samples to train on, and when."""

from .importance_sampling import ImportanceSampling
from .infobatch import InfoBatch, RandomPrune
from .selective_backprop import SelectiveBackprop
from .static_prune import StaticPrune

__all__ = ["ImportanceSampling", "InfoBatch", "RandomPrune", "SelectiveBackprop", "StaticPrune"]
