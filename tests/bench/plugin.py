"""Components for the bench tests, loaded with `effilab bench --import tests.bench.plugin`: a run that
crashes, a run that is interrupted (Ctrl-C) at a chosen epoch, a technique that backpropagates less
than it forwards."""

import os

from fastai.callback.core import Callback
from fastai.torch_core import find_bs

from effilab.bench import register_component
from effilab.callback import EffilabCallback


class Explode(Callback):
    """Raises `RuntimeError(message)` at the end of epoch `at_epoch` (for seeds in `seeds`, all if None),
    unless the environment variable `unless_env` is set (a run that works when retried)."""

    def __init__(self, at_epoch: int = 0, message: str = "boom", seeds=None, unless_env=None, seed: int = 0):
        self.at_epoch, self.message, self.seeds, self.run_seed = at_epoch, message, seeds, seed
        self.unless_env = unless_env

    def after_epoch(self):
        if self.unless_env and os.environ.get(self.unless_env):
            return
        if self.epoch >= self.at_epoch and (self.seeds is None or self.run_seed in self.seeds):
            raise RuntimeError(self.message)


class Interrupt(Callback):
    """Raises KeyboardInterrupt at the end of epoch `at_epoch` while EFFILAB_TEST_INTERRUPT is set."""

    def __init__(self, at_epoch: int = 0):
        self.at_epoch = at_epoch

    def after_epoch(self):
        if os.environ.get("EFFILAB_TEST_INTERRUPT") and self.epoch >= self.at_epoch:
            raise KeyboardInterrupt


register_component("explode", Explode, "raises RuntimeError (tests)", "tests", overwrite=True)
register_component("interrupt", Interrupt, "raises KeyboardInterrupt (tests)", "tests", overwrite=True)


class HalfBackprop(EffilabCallback):
    """Reports half of each epoch's training samples as backpropagated (telemetry source "halfbp"), as
    a technique that skips the backward pass of some samples would."""

    def before_train(self):
        self.n = 0

    def after_batch(self):
        if self.training:
            self.n += find_bs(self.learn.yb)

    def after_train(self):
        self.telemetry.record("halfbp", "samples", backpropagated=self.n // 2)


register_component("halfbp", HalfBackprop, "reports half the samples as backpropagated (tests)", "tests",
                   overwrite=True)
