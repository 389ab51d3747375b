"""The host-read spy sees every kind of device-to-host read made by effilab code, and none made elsewhere."""

from __future__ import annotations

import pytest
import torch

from effilab.callback import EffilabCallback

from .conftest import make_learner
from .spies import HostReadSpy

# One deliberate per-step host read of each kind (the first eight used to go unseen).
READS = {
    "nonzero": lambda t: t.nonzero(),
    "bool_mask_index": lambda t: t[t > 0],
    "bool_mask_assign": lambda t: t.clone().__setitem__(t > 0, 0.0),
    "any_to_bool": lambda t: 1 if torch.any(t > 0) else 0,
    "masked_select": lambda t: t.masked_select(t > 0),
    "unique": lambda t: torch.unique(t.round()),
    "repeat_interleave": lambda t: torch.arange(3).repeat_interleave(torch.tensor([1, 2, 3])),
    "where_one_arg": lambda t: torch.where(t > 0),
    "item": lambda t: t.sum().item(),
    "float": lambda t: float(t.sum()),
}


class _Syncing(EffilabCallback):
    """Lives in tests but subclasses the effilab base: its handler is attributed by the file it calls from."""

    def __init__(self, read):
        self.read = read

    def after_loss(self):
        if self.training:
            _effilab_read(self.read, self.learn.loss_grad.detach().reshape(1).expand(4) - 0.5 + torch.arange(4.0))


def _effilab_read(read, t):
    # Executed as effilab code: the spy attributes a read by the file of the code that makes it.
    import effilab.core.telemetry as somewhere_in_effilab

    code = compile("read(t)", somewhere_in_effilab.__file__, "eval")
    return eval(code, {"read": read, "t": t})


@pytest.mark.parametrize("kind", sorted(READS))
def test_the_spy_sees_each_kind_of_host_read(kind, monkeypatch):
    spy = HostReadSpy(monkeypatch)
    learn = make_learner([_Syncing(READS[kind]), *spy.callbacks()], n=128)
    learn.fit(1, 1e-3)
    assert len(spy.per_batch) == 4
    assert all(len(reads) == 1 for reads in spy.per_batch), spy.per_batch


def test_reads_outside_effilab_code_are_not_counted(monkeypatch):
    """fastai's Recorder reads the loss every step; the spy does not blame effilab for it."""
    spy = HostReadSpy(monkeypatch)
    learn = make_learner([*spy.callbacks()], n=128)
    learn.fit(1, 1e-3)
    assert spy.per_batch == [[]] * 4
