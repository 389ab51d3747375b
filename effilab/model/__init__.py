"""Model-centric techniques (survey category 2): how the model computes, at which depth and width, how it
starts, and which of its parts train.

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
    "StochasticDepth": "effilab.model.depth",
    "ProgressiveLayerDrop": "effilab.model.depth",
    "ResidualGates": "effilab.model.init",
    "FixupInit": "effilab.model.init",
    "LSUVInit": "effilab.model.init",
    "WhitenFirstConv": "effilab.model.init",
    "ModelGrowth": "effilab.model.growth",
    "ModelWidening": "effilab.model.growth",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_attributes(__name__, globals(), _LAZY)
