"""Model-centric techniques (survey category 2): what the model computes, at which depth and width, and how
it starts.

Submodules load on first use (they import fastai).
"""

from .._lazy import lazy_attributes

# public name -> module that defines it
_LAZY = {
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
