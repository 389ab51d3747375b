"""Optimization-centric techniques (survey category 3): how the weights are updated and averaged.

Submodules load on first use (they import fastai).
"""

from .._lazy import lazy_attributes

# public name -> module that defines it
_LAZY = {
    "SAM": "effilab.optim.sam",
    "LookSAM": "effilab.optim.sam",
    "EMA": "effilab.optim.averaging",
    "SWA": "effilab.optim.averaging",
    "LAWA": "effilab.optim.averaging",
    "WeightAveraging": "effilab.optim.averaging",
    "BatchSizeSchedule": "effilab.optim.batch_size",
    "hold_lr_peak": "effilab.optim.batch_size",
    "LambOptimizer": "effilab.optim.large_batch",
    "LarsOptimizer": "effilab.optim.large_batch",
    "LinearScaling": "effilab.optim.large_batch",
    "UseOptimizer": "effilab.optim.large_batch",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_attributes(__name__, globals(), _LAZY)
