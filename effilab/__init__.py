"""effilab: efficient training of deep learning models, taught and measured in the notebook.

`effilab.core` is plain PyTorch and imports no fastai; the fastai callbacks load on first use, so
`import effilab.core` stays light.
"""

from ._lazy import lazy_attributes

__version__ = "0.1.0"

# public name -> module that defines it (loaded lazily: fastai takes seconds to import)
_LAZY = {
    "InfoBatch": "effilab.data.infobatch",
    "RandomPrune": "effilab.data.infobatch",
    "ProgressiveResize": "effilab.data.progressive_resize",
    "SeqLenWarmup": "effilab.data.seq_len_warmup",
    "EasyToHard": "effilab.data.easy_to_hard",
    "SAM": "effilab.optim.sam",
    "LookSAM": "effilab.optim.sam",
    "SharpnessAwareGradient": "effilab.core.sam",
    "ImportanceSampling": "effilab.data.importance_sampling",
    "SelectiveBackprop": "effilab.data.selective_backprop",
    "StaticPrune": "effilab.data.static_prune",
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
    "EMA": "effilab.optim.averaging",
    "SWA": "effilab.optim.averaging",
    "LAWA": "effilab.optim.averaging",
    "BatchSizeSchedule": "effilab.optim.batch_size",
    "LambOptimizer": "effilab.optim.large_batch",
    "LarsOptimizer": "effilab.optim.large_batch",
    "LinearScaling": "effilab.optim.large_batch",
    # budgeted training
    "Budget": "effilab.budget.clock",
    "fit_budget": "effilab.budget.clock",
    "budget_of": "effilab.budget.clock",
    "progress_of": "effilab.budget.clock",
    "epochs_for_budget": "effilab.core.budget",
    "cooldown_budget": "effilab.core.budget",
    "LinearDecay": "effilab.budget.schedules",
    "REX": "effilab.budget.schedules",
    "WSD": "effilab.budget.schedules",
    "ScheduleFree": "effilab.budget.schedule_free",
    # system-centric
    "ActivationCheckpointing": "effilab.system.checkpointing",
    "Profiler": "effilab.system.profiler",
    "SyncFreeRecorder": "effilab.system.recorder",
    "DeviceDataLoader": "effilab.system.device_loader",
    "DeviceDataLoaders": "effilab.system.device_loader",
    "launch": "effilab.system.launcher",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_attributes(__name__, globals(), _LAZY)
