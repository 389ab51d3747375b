"""Pictures of training, drawn from telemetry only (`learn.telemetry`): the live `Dashboard`, its static
figure and HTML report, and the tutorials' single figures.

`Dashboard` loads on first use (it is a fastai callback); the figure functions need plotly only.
"""

from .._lazy import lazy_attributes
from ..registry import register
from .figures import build_figure, lr_find_figure, panels, report_html, summary_text
from .mode import choose_mode
from .static import kept_per_epoch, score_histogram

# public name -> module that defines it (loaded lazily: fastai takes seconds to import)
_LAZY = {"Dashboard": "effilab.viz.dashboard", "Throttle": "effilab.viz.dashboard"}

__all__ = ["Dashboard", "Throttle", "build_figure", "choose_mode", "kept_per_epoch", "lr_find_figure", "panels",
           "report_html", "score_histogram", "summary_text"]


__getattr__, __dir__ = lazy_attributes(__name__, globals(), _LAZY)


def _dashboard_for_tests():
    from .dashboard import Dashboard

    return Dashboard()


# The generic suite runs every technique "with Dashboard": registered here so that importing the
# category package registers it without importing fastai.
register("dashboard", _dashboard_for_tests, "viz")
