"""Model-centric techniques (survey category 2): what the model is and how it computes.

Submodules load on first use (they import fastai).
"""

from .._lazy import lazy_attributes

# public name -> module that defines it
_LAZY = {
    "DynamicSparse": "effilab.model.sparse",
    "RigL": "effilab.model.sparse",
    "SET": "effilab.model.sparse",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_attributes(__name__, globals(), _LAZY)
