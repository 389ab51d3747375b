"""`from effilab import <Name>` reaches the budgeted and system-centric public names, lazily."""

import importlib
import subprocess
import sys

import pytest

import effilab

BUDGET = ["Budget", "fit_budget", "budget_of", "progress_of", "epochs_for_budget", "cooldown_budget",
          "LinearDecay", "REX", "WSD", "ScheduleFree"]
SYSTEM = ["SystemMonitor", "FitRecorder", "distrib_ctx", "ActivationCheckpointing", "Profiler",
          "SyncFreeRecorder", "DeviceDataLoader", "DeviceDataLoaders", "launch"]


@pytest.mark.parametrize("package, names", [("budget", BUDGET), ("system", SYSTEM)])
def test_budget_and_system_names_at_the_top(package, names):
    sub = importlib.import_module(f"effilab.{package}")
    for name in names:
        assert name in effilab.__all__ and name in dir(effilab)
        assert getattr(effilab, name) is getattr(sub, name), name


def test_importing_effilab_loads_none_of_them():
    code = ("import sys, effilab; assert 'fastai' not in sys.modules; "
            "from effilab import WSD, ActivationCheckpointing; assert 'fastai' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
