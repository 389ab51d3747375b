"""Budgeted training (survey category 4): one progress clock p = spent / budget that every schedule
follows, and schedules that end exactly on the budget.

Submodules load on first use (they import fastai).
"""

from .._lazy import lazy_attributes

# public name -> module that defines it
_LAZY = {
    "Budget": "effilab.budget.clock",
    "budget_of": "effilab.budget.clock",
    "fit_budget": "effilab.budget.clock",
    "progress_of": "effilab.budget.clock",
    "epochs_for_budget": "effilab.core.budget",
    "cooldown_budget": "effilab.core.budget",
    "LrSchedule": "effilab.core.budget",
    "BudgetSchedule": "effilab.budget.schedules",
    "LinearDecay": "effilab.budget.schedules",
    "REX": "effilab.budget.schedules",
    "WSD": "effilab.budget.schedules",
    "SCHEDULES": "effilab.budget.schedules",
    "ScheduleFree": "effilab.budget.schedule_free",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_attributes(__name__, globals(), _LAZY)
