"""System-centric techniques (survey category 5): how training uses the machine.

Submodules load on first use: `effilab.system.distributed` imports fastai and accelerate.
"""

from .._lazy import lazy_attributes

# public name -> module that defines it
_LAZY = {
    "distrib_ctx": "effilab.system.distributed",
    "CPUSafeDistributedDL": "effilab.system.distributed",
    "CPUSafeDistributedTrainer": "effilab.system.distributed",
    "SystemMonitor": "effilab.system.monitor",
    "FitRecorder": "effilab.system.fit_recorder",
    "ActivationCheckpointing": "effilab.system.checkpointing",
    "Profiler": "effilab.system.profiler",
    "SyncFreeRecorder": "effilab.system.recorder",
    "launch": "effilab.system.launcher",
    "DeviceSmoothLoss": "effilab.system.recorder",
    "DeviceDataLoader": "effilab.system.device_loader",
    "DeviceDataLoaders": "effilab.system.device_loader",
    "Augment": "effilab.core.device_data",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_attributes(__name__, globals(), _LAZY)
