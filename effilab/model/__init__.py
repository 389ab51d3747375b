"""Model-centric techniques (survey category 2): how the model computes, and which of its parts train.

Submodules load on first use (they import fastai).
"""

from .._lazy import lazy_attributes

# public name -> module that defines it
_LAZY = {
    "Autocast": "effilab.model.precision",
    "FP8Training": "effilab.model.fp8",
    "fp8_layer_filter": "effilab.model.fp8",
    "Compile": "effilab.model.compile",
    "LayerFreezing": "effilab.model.freezing",
    "DynamicSparse": "effilab.model.sparse",
    "RigL": "effilab.model.sparse",
    "SET": "effilab.model.sparse",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_attributes(__name__, globals(), _LAZY)
