"""One rank of the two-process (gloo, CPU) Budget scenarios; run by tests/budget/test_budget_ddp.py under torchrun.

Saves, per scenario, the steps this rank took and what its Budget spent, to `<out>/rank<r>.pt`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from fastai.callback.core import Callback, CancelValidException

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from effilab.budget import Budget  # noqa: E402
from effilab.core.distributed import end_worker_process  # noqa: E402
from effilab.system import distrib_ctx  # noqa: E402
from tests.conftest import make_learner  # noqa: E402


class Steps(Callback):
    order = 99

    def before_fit(self):
        self.n = 0

    def after_step(self):
        self.n += 1


class NoValidation(Callback):
    """fastai gathers validation losses across ranks whenever WORLD_SIZE > 1: ranks whose epochs differ in length
    must not validate, or that gather would pair with the other rank's per-step budget reduction."""

    def before_validate(self):
        raise CancelValidException


class Tick(Callback):
    order = 50

    def __init__(self, clock, dt):
        self.clock, self.dt = clock, dt

    def after_loss(self):
        if self.training:
            self.clock[0] += self.dt


def main(out: Path):
    torch.set_num_threads(1)
    with_ctx = make_learner([Budget(1000, "samples"), Steps()])
    with distrib_ctx(with_ctx, cpu=True):  # DDP: every rank forwards its shard, 32 per step
        with_ctx.fit_one_cycle(10, 1e-2)
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {"ddp": (with_ctx.steps.n, with_ctx.budget.spent, world)}

    # Ranks with different batch sizes (16 and 32): the budget is global, the stop is the same step.
    uneven = make_learner([Budget(960, "samples"), Steps(), NoValidation()], bs=16 * (rank + 1))
    uneven.fit(10, 1e-2)
    results["uneven"] = (uneven.steps.n, uneven.budget.spent)

    # Ranks with different clocks (0.1 s and 0.3 s per step): the slowest rank's time decides.
    clock = [0.0]
    timed = make_learner([Budget(6.0, "seconds", clock=lambda: clock[0]), Tick(clock, 0.1 + 0.2 * rank), Steps(),
                          NoValidation()])
    timed.fit(10, 1e-2)
    results["seconds"] = (timed.steps.n, timed.budget.spent)
    torch.save(results, out / f"rank{rank}.pt")
    end_worker_process()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
