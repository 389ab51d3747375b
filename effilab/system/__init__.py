"""System-centric techniques (survey category 5): how training uses the machine.

Submodules load on first use: `effilab.system.distributed` imports fastai and accelerate.
"""

from importlib import import_module

# public name -> module that defines it
_LAZY = {
    "distrib_ctx": "effilab.system.distributed",
    "CPUSafeDistributedDL": "effilab.system.distributed",
    "CPUSafeDistributedTrainer": "effilab.system.distributed",
    "SystemMonitor": "effilab.system.monitor",
    "FitRecorder": "effilab.system.fit_recorder",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'effilab.system' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
