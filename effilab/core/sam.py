"""Sharpness-Aware Minimization (SAM) and LookSAM in plain PyTorch: the gradient in `p.grad` becomes
the gradient at the worst-case nearby weights, with device ops only (no host sync per step).

Use after a first backward (the plain gradient g is in `p.grad`)::

    sam = SharpnessAwareGradient(rho=0.05)            # every=5, alpha=0.7: LookSAM
    loss_fn(model(x), y).backward()
    sam.step(params, lambda: loss_fn(model(x), y).backward(), buffers=batchnorm_buffers(model))
    opt.step(); opt.zero_grad()

With a `GradScaler`, scale both losses (`scaler.scale(loss).backward()`, in the closure too) and call
`scaler.step(opt)`: the ascent direction g/||g|| is the same for scaled and unscaled gradients, and on
overflow the returned gradient is NaN, so the scaler skips the step as it would have anyway.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn.utils import get_total_norm

__all__ = ["SharpnessAwareGradient", "batchnorm_buffers", "check_sam_args"]


def check_sam_args(rho: float, every: int, alpha: float) -> None:
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho > 0):
        raise ValueError(f"rho (the radius of the weight perturbation) must be a finite number > 0, got {rho!r}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every (a full SAM step every k steps) must be an integer >= 1, got {every!r}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha (LookSAM's weight of the reused sharpness gradient) must be >= 0, got {alpha!r}")


def batchnorm_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The running statistics of every batch-norm layer of `model`: the second (perturbed) forward
    must not update them, or each SAM step would count its batch twice."""
    out = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            out += [b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    return out


class SharpnessAwareGradient:
    """Turns the plain gradient in `p.grad` into SAM's, in place.

    Full step (Foret et al. 2021): e = rho * g / ||g|| (global L2 norm over all parameters), weights
    w -> w + e, `closure()` recomputes the gradient there, weights and `buffers` are restored from a
    saved copy (bit-exact). With `every=k > 1` (LookSAM, Liu et al. 2022) only every k-th step is a
    full one; it also stores g_v, the part of the SAM gradient g_s orthogonal to g; the steps in
    between use g + alpha * ||g|| / ||g_v|| * g_v without any extra forward or backward.

    Host-side counts: `steps`, `full_steps`. Device-side, read with `take_stats()` (a host sync):
    the summed norm of the perturbations actually applied and the number of non-finite gradients.
    """

    def __init__(self, rho: float = 0.05, every: int = 1, alpha: float = 0.7, eps: float = 1e-12):
        check_sam_args(rho, every, alpha)
        self.rho, self.every, self.alpha, self.eps = float(rho), every, float(alpha), eps
        self.steps = 0
        self.full_steps = 0
        self.sharpness_grad: list[torch.Tensor] | None = None  # LookSAM's g_v, one tensor per parameter
        self._saved: list[torch.Tensor] | None = None
        self._plain: list[torch.Tensor] | None = None
        self._ascent_norm_sum: torch.Tensor | None = None
        self._nonfinite: torch.Tensor | None = None

    @property
    def looksam(self) -> bool:
        return self.every > 1

    def is_full_step(self) -> bool:
        """Whether the next `step` perturbs and calls its closure (decided on the host, from the count)."""
        return self.steps % self.every == 0

    def step(self, params: Sequence[torch.Tensor], closure: Callable[[], object],
             buffers: Sequence[torch.Tensor] = ()) -> None:
        """Replace `p.grad` of `params` by the SAM (or LookSAM) gradient. `closure()` must run the
        forward and backward of the same batch again (the grads are zeroed before it runs)."""
        params = list(params)
        full = self.is_full_step()
        self.steps += 1
        with_grad = [i for i, p in enumerate(params) if p.grad is not None]
        if not with_grad:
            return
        grads = [params[i].grad for i in with_grad]
        device = grads[0].device
        if self._ascent_norm_sum is None or self._ascent_norm_sum.device != device:
            self._ascent_norm_sum = torch.zeros((), device=device)
            self._nonfinite = torch.zeros((), dtype=torch.long, device=device)
        norm = get_total_norm(grads)
        finite = torch.isfinite(norm)
        self._nonfinite += ~finite
        if full:
            self.full_steps += 1
            self._full_step(params, with_grad, grads, norm, finite, closure, list(buffers))
        else:
            self._reuse(params, with_grad, grads, norm)

    def _full_step(self, params, with_grad, grads, norm, finite, closure, buffers):
        weights = [p.detach() for p in params]
        saved_from = weights + [b.detach() for b in buffers]
        self._saved = _buffers_like(self._saved, saved_from)
        torch._foreach_copy_(self._saved, saved_from)
        if self.looksam:
            self._plain = _buffers_like(self._plain, grads)
            torch._foreach_copy_(self._plain, grads)
        # rho * G/||G|| is the same whatever loss scale multiplies G. NaN on overflow: the second gradient
        # is then NaN too and a GradScaler skips the step, as it would have skipped the plain one.
        factor = torch.where(finite, self.rho / (norm + self.eps), torch.full_like(norm, math.nan))
        ascent = torch._foreach_mul(grads, factor)
        self._ascent_norm_sum += torch.where(finite, get_total_norm(ascent), 0.0)
        torch._foreach_add_([weights[i] for i in with_grad], ascent)
        del ascent
        torch._foreach_zero_(grads)
        try:
            closure()
        finally:
            torch._foreach_copy_(saved_from, self._saved)  # weights and BN statistics, bit-exact
        sam_grads = [params[i].grad for i in with_grad]
        if self.looksam:
            self._store_sharpness_grad(params, with_grad, sam_grads, norm, finite)
        # Non-finite first gradient: make sure the returned one is non-finite as well (skip the step).
        torch._foreach_mul_(sam_grads, torch.where(finite, 1.0, math.nan).to(sam_grads[0].dtype))

    def _store_sharpness_grad(self, params, with_grad, sam_grads, norm, finite):
        """g_v = g_s - (g_s . g / ||g||^2) g, kept from the previous full step when this one overflowed."""
        plain = self._plain
        dot = torch.stack([torch.vdot(s.flatten().float(), g.flatten().float())
                           for s, g in zip(sam_grads, plain)]).sum()
        coef = dot / (norm.float() ** 2 + self.eps)
        new = torch._foreach_sub(sam_grads, torch._foreach_mul(plain, coef.to(plain[0].dtype)))
        stored = self._sharpness_grad_for(params)
        for i, v in zip(with_grad, new):
            stored[i].copy_(torch.where(finite, v, stored[i]))

    def _reuse(self, params, with_grad, grads, norm):
        if not self.looksam or self.sharpness_grad is None:
            return
        stored = self._sharpness_grad_for(params)
        direction = [stored[i] for i in with_grad]
        total = get_total_norm(direction)
        # A zero direction (none stored yet for these parameters, e.g. after model growth) adds nothing; the
        # clamp alone would give 0 * inf = nan.
        scale = torch.where(total > 0, self.alpha * norm / total.clamp_min(torch.finfo(norm.dtype).tiny), 0.0)
        torch._foreach_add_(grads, torch._foreach_mul(direction, scale))

    def _sharpness_grad_for(self, params) -> list[torch.Tensor]:
        stored = self.sharpness_grad
        if stored is None or len(stored) != len(params) or any(
                s.shape != p.shape for s, p in zip(stored, params)):
            stored = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
        elif stored[0].device != params[0].device or stored[0].dtype != params[0].dtype:
            stored = [s.to(device=p.device, dtype=p.dtype) for s, p in zip(stored, params)]
        self.sharpness_grad = stored
        return stored

    def take_stats(self) -> dict:
        """Mean norm of the applied perturbations and non-finite gradients since the last call (a host
        read: call it once per epoch)."""
        if self._ascent_norm_sum is None:
            return {"ascent_norm_sum": 0.0, "nonfinite_grads": 0}
        stats = {"ascent_norm_sum": float(self._ascent_norm_sum),  # sync-ok: once per epoch
                 "nonfinite_grads": int(self._nonfinite)}  # sync-ok: once per epoch
        self._ascent_norm_sum.zero_()
        self._nonfinite.zero_()
        return stats

    def release(self) -> None:
        """Drop the scratch buffers (a copy of the weights): between fits, before pickling."""
        self._saved = self._plain = None

    def state_dict(self) -> dict:
        # g_v as {"0": tensor, ...}: one entry per parameter, in the order of the parameters passed to `step`
        gv = self.sharpness_grad
        return {"steps": self.steps, "full_steps": self.full_steps,
                "sharpness_grad": None if gv is None else {str(i): t.detach().clone() for i, t in enumerate(gv)}}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.full_steps = state["steps"], state["full_steps"]
        gv = state["sharpness_grad"]
        self.sharpness_grad = None if gv is None else [gv[str(i)] for i in range(len(gv))]


def _buffers_like(buffers: list[torch.Tensor] | None, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """`buffers` if they match `like` one for one, else fresh ones."""
    if buffers is not None and len(buffers) == len(like) and all(
            b.shape == t.shape and b.dtype == t.dtype and b.device == t.device for b, t in zip(buffers, like)):
        return buffers
    return [torch.empty_like(t) for t in like]
