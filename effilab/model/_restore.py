"""What the model-centric callbacks share: they change the model (or the autocast state) during a fit and
must give it back on every exit."""

from __future__ import annotations

from ..callback import EffilabCallback


class RestoringCallback(EffilabCallback):
    """`restore()` undoes what the callback changed; it runs after the fit, after a cancelled fit, at the
    next `before_fit` (a fit that raised left things changed) and when fastai detaches the callback.

    fastai fires no event when a fit raises (Ctrl-C, an error), but it removes the callbacks passed to
    `fit(cbs=...)` in a `finally`, setting their `learn` to None: restoring there is our `finally`.
    """

    @property
    def learn(self):
        return self.__dict__.get("_learn")

    @learn.setter
    def learn(self, value):
        old = self.__dict__.get("_learn")
        if old is not None and value is not old:
            self.restore()
        self.__dict__["_learn"] = value

    def restore(self) -> None:
        """Give back what this callback changed (idempotent)."""

    def after_fit(self):
        self.restore()

    def after_cancel_fit(self):
        self.restore()
