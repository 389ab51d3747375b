"""effilab: efficient training of deep learning models, taught and measured in the notebook.

`effilab.core` is plain PyTorch and imports no fastai; the fastai callbacks load on first use, so
`import effilab.core` stays light.
"""

from importlib import import_module

__version__ = "0.1.0"

# public name -> module that defines it (loaded lazily: fastai takes seconds to import)
_LAZY = {
    "InfoBatch": "effilab.data.infobatch",
    "RandomPrune": "effilab.data.infobatch",
    "Telemetry": "effilab.core.telemetry",
    "InfoBatchPruner": "effilab.core.infobatch",
    "InfoBatchSampler": "effilab.core.infobatch",
    "IndexedDataset": "effilab.core.infobatch",
    "telemetry_of": "effilab.callback",
    "save_checkpoint": "effilab.callback",
    "load_checkpoint": "effilab.callback",
    "distrib_ctx": "effilab.system.distributed",
    "datasets": "effilab.datasets",
    "SystemMonitor": "effilab.system.monitor",
    "FitRecorder": "effilab.system.fit_recorder",
    "MemoryProbe": "effilab.core.probe",
    "ThroughputMeter": "effilab.core.probe",
    "Dashboard": "effilab.viz.dashboard",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        module = import_module(_LAZY[name])
        value = module if name == "datasets" else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'effilab' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
