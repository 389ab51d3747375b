"""Mixed precision on every device: `torch.autocast` for the model's own device, a loss scaler only where
it is needed, the loss scale and skipped steps in telemetry."""

from __future__ import annotations

import warnings

import torch
from fastai.callback.core import CancelStepException
from fastai.callback.fp16 import MixedPrecision
from fastai.torch_core import to_float

from ..core.precision import autocast_dtype, make_grad_scaler, precision_support
from ..registry import register
from ._restore import RestoringCallback

__all__ = ["Autocast"]


class Autocast(RestoringCallback):
    """Mixed precision (bf16 or fp16) on the device the model is on: CPU, CUDA, or any autocast device.

    **What it does.** Runs the forward pass and the loss under `torch.autocast(device, dtype)`: matmuls and
    convolutions compute in the low-precision dtype, reductions and the loss stay in fp32, the weights and
    the optimiser stay fp32. Predictions are handed to the loss and metrics as fp32. For fp16 on CUDA a
    `torch.amp.GradScaler` scales the loss (fp16 gradients underflow without it), unscales before the step
    and skips steps whose gradients overflowed; bf16 has fp32's range and needs none. fastai's
    `MixedPrecision` uses the CUDA-only autocast: on a CPU it trains in plain fp32 (with a warning); this one
    autocasts wherever the model is.

    **Paper.** Micikevicius et al., "Mixed Precision Training", ICLR 2018 (fp16 storage, fp32 master weights,
    loss scaling). bf16: Kalamkar et al., arXiv 1905.12322.

    **Defaults.** `dtype="bf16"`: no scaler, no skipped steps, and fast on CPUs with AVX512-BF16/AMX and
    GPUs from Ampere on. `grad_scaler=None` means "only for fp16 on CUDA"; `True` forces one (to watch loss
    scaling on a CPU with fp16). A CPU without fast bf16 gets a warning that says so (it still runs, emulated).

    **What it saves.** Wall-clock where the hardware has low-precision units, and activation memory (saved
    activations are half the size) everywhere; nothing in accuracy terms (expect the same accuracy).
    Measured by `benchmarks/model_cards.py` on this shared 2-core EPYC with AVX512-BF16, one thread, the
    3-conv CNN of `small_model` on 1x28x28, batch 128 (median of 15 interleaved training steps): bf16 took
    0.61x the fp32 step's CPU time (18.6 vs 30.6 ms; 0.63x wall-clock). On an AVX2-only CPU expect a
    slowdown. On a GPU, tiny models may not gain (kernel-launch bound).

    **Interactions.** Order 9: its autocast region opens before and closes after those of order-10
    callbacks (fastai's `MixedPrecision`), so they nest. Using it together with fastai's `MixedPrecision`
    on CUDA is an error (two loss scalers). FP8Training converts the Linear layers; Autocast covers the
    rest. Works with `Compile` (autocast is traced into the graph).

    **Telemetry** (source `"autocast"`): meta `device`, `dtype`, `grad_scaler`, `note` (what to expect on
    this hardware); per epoch the steps, the skipped steps and the loss scale at the end; with a scaler,
    stream `"scale"` holds every step's scale (read once per epoch, never per step).
    """

    order = 9
    telemetry_name = "autocast"

    def __init__(self, dtype="bf16", grad_scaler: bool | None = None, warn_slow: bool = True):
        self.dtype = autocast_dtype(dtype)
        if grad_scaler is not None and not isinstance(grad_scaler, bool):
            raise TypeError(f"grad_scaler must be None (automatic), True or False, got {grad_scaler!r}")
        if not isinstance(warn_slow, bool):
            raise TypeError(f"warn_slow must be True or False, got {warn_slow!r}")
        self.grad_scaler, self.warn_slow = grad_scaler, warn_slow
        self.loss_scaler = None
        self._pending_scaler_state = None
        self._ctx = None
        self._warned = False
        self.skipped_total = 0
        self._reset_epoch()

    def _reset_epoch(self):
        self._scales: list[torch.Tensor] = []
        self._skipped_steps: list[int] = []
        self._steps = 0

    # -- events
    def before_fit(self):
        self.restore()
        device = next(self.learn.model.parameters()).device
        usable, note = precision_support(device.type, self.dtype)
        if not usable:
            raise ValueError(f"Autocast({self.dtype}): {note}")
        if device.type == "cuda" and any(isinstance(cb, MixedPrecision) for cb in self.learn.cbs):
            raise ValueError("Autocast and fastai's MixedPrecision are both on this Learner: keep one "
                             "(two autocast regions and two loss scalers)")
        slow = "lacks fast" in note or "emulated" in note
        if slow and self.warn_slow and not self._warned:
            warnings.warn(f"Autocast({self.dtype}): {note}", stacklevel=2)
            self._warned = True
        self.device_type = device.type
        if self.loss_scaler is None:
            self.loss_scaler = make_grad_scaler(device.type, self.dtype, self.grad_scaler)
            if self.loss_scaler is not None and self._pending_scaler_state is not None:
                self.loss_scaler.load_state_dict(self._pending_scaler_state)
        self._pending_scaler_state = None
        self.telemetry.set_meta(self.telemetry_name, device=device.type, dtype=str(self.dtype).replace("torch.", ""),
                                grad_scaler=self.loss_scaler is not None, note=note)
        self._reset_epoch()

    def before_batch(self):
        self._ctx = torch.autocast(self.device_type, dtype=self.dtype)
        self._ctx.__enter__()

    def after_pred(self):
        self.learn.pred = to_float(self.pred)  # the loss and the metrics see fp32, as with fastai's

    def _close(self):
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            ctx.__exit__(None, None, None)

    # Closed after the order-10 callbacks' after_loss (they close their regions there) so regions nest.
    def before_backward(self):
        self._close()
        if self.loss_scaler is not None:
            self.learn.loss_grad = self.loss_scaler.scale(self.loss_grad)

    def before_step(self):
        if self.loss_scaler is None:
            return
        self.skipped = True
        self.loss_scaler.step(self)  # PyTorch reads the overflow flag on the host here (it must decide to step)
        if self.skipped:
            self._skipped_steps.append(self.learn.train_iter)
            self.skipped_total += 1
            raise CancelStepException()

    def after_step(self):
        if self.loss_scaler is None:
            return
        self.loss_scaler.update()
        self._scales.append(self.loss_scaler._scale.detach().clone())  # device copy; `get_scale()` would sync
        self._steps += 1

    def after_batch(self):
        self._close()
        if self.training and self.loss_scaler is None:
            self._steps += 1

    def after_cancel_batch(self):
        self._close()

    def after_train(self):
        rec = {"epoch": self.learn.epoch, "steps": self._steps, "skipped_steps": len(self._skipped_steps)}
        if self.loss_scaler is not None and self._scales:
            scales = torch.stack(self._scales).tolist()  # sync-ok: once per epoch
            rec["scale"] = scales[-1]
            self.telemetry.record(self.telemetry_name, "scale", epoch=self.learn.epoch, scales=scales,
                                  skipped_at=list(self._skipped_steps))
        self.telemetry.record(self.telemetry_name, "epoch", **rec)
        self._reset_epoch()

    # Pretend to be an optimiser for `GradScaler.step` (fastai's trick): it calls `step` unless it skips.
    @property
    def param_groups(self):
        return self.learn.opt.param_groups

    def step(self, *args, **kwargs):
        self.skipped = False

    def restore(self):
        self._close()

    def state_dict(self) -> dict:
        # one host read, at a checkpoint
        scaler = self.loss_scaler.state_dict() if self.loss_scaler is not None else None
        return {"scaler": scaler, "skipped_total": self.skipped_total}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_total = state["skipped_total"]
        if state["scaler"] is not None:
            if self.loss_scaler is not None:
                self.loss_scaler.load_state_dict(state["scaler"])
            else:
                self._pending_scaler_state = state["scaler"]


def _autocast_for_tests():
    return Autocast("bf16", warn_slow=False)


register("autocast", _autocast_for_tests, "model")
