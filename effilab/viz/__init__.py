"""Pictures of training, drawn from telemetry only (`learn.telemetry`): the live `Dashboard`, its static
figure and HTML report, and the tutorials' single figures.

`Dashboard` loads on first use (it is a fastai callback); the figure functions need plotly only.
"""

from importlib import import_module

from ..registry import register
from .figures import build_figure, panels, report_html, summary_text
from .mode import choose_mode
from .static import kept_per_epoch, score_histogram

# public name -> module that defines it (loaded lazily: fastai takes seconds to import)
_LAZY = {"Dashboard": "effilab.viz.dashboard", "Throttle": "effilab.viz.dashboard"}

__all__ = ["Dashboard", "Throttle", "build_figure", "choose_mode", "kept_per_epoch", "panels", "report_html",
           "score_histogram", "summary_text"]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'effilab.viz' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


def _dashboard_for_tests():
    from .dashboard import Dashboard

    return Dashboard()


# The generic suite runs every technique "with Dashboard": registered here so that importing the
# category package registers it without importing fastai.
register("dashboard", _dashboard_for_tests, "viz")
