"""Data-centric techniques (survey category 1): which samples to train on, and when."""

from .infobatch import InfoBatch, RandomPrune

__all__ = ["InfoBatch", "RandomPrune"]
