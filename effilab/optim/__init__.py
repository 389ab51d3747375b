"""Optimization-centric techniques (survey category 3): how each step uses the gradient.

Submodules load on first use: they import fastai.
"""

from .._lazy import lazy_attributes

# public name -> module that defines it
_LAZY = {
    "SAM": "effilab.optim.sam",
    "LookSAM": "effilab.optim.sam",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_attributes(__name__, globals(), _LAZY)
