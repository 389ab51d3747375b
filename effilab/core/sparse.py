"""Dynamic sparse training in plain PyTorch: RigL and SET masks on the training device.

A `DynamicSparsity` holds one boolean mask per weight of the model's `nn.Linear` and `nn.Conv*d` layers,
with per-layer densities from the Erdos-Renyi-Kernel rule (`erk_densities`) or uniform. Between backward
and the optimizer step, `before_step` masks the gradients and, every `delta_t` steps until `end_frac` of
the run, drops the weakest active weights and regrows as many elsewhere (RigL: by dense-gradient
magnitude; SET: at random, from its own generator). After the step, `after_step` masks the weights again.
Everything is multiplication and `topk` on the device: no host read per step.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 4))
>>> opt = torch.optim.Adam(model.parameters(), 1e-3)
>>> sparsity = DynamicSparsity(model, density=0.3, method="rigl", delta_t=2, seed=0)
>>> for step in range(4):
...     model(torch.randn(8, 20)).square().mean().backward()
...     updated = sparsity.before_step(progress=step / 4, optimizer_state=opt.state)
...     opt.step(); opt.zero_grad()
...     sparsity.after_step()
>>> sparsity.n_active == [int(m.sum()) for m in sparsity.masks]
True
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from .infobatch import derive_seed

__all__ = ["METHODS", "DynamicSparsity", "check_density", "cosine_drop_fraction", "erk_densities",
           "mask_optimizer_state", "sparse_layers"]

METHODS = ("rigl", "set")
DISTRIBUTIONS = ("erk", "uniform")
_SPARSE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _check_real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    if math.isnan(value):
        raise ValueError(f"{name} must be a number, got NaN")
    return float(value)


def check_density(density) -> float:
    """`density` as a float in (0, 1], or a clear error."""
    d = _check_real("density", density)
    if not 0.0 < d <= 1.0:
        raise ValueError(f"density must be in (0, 1] (the fraction of weights kept: 0.1 keeps 10%, 1.0 trains "
                         f"dense), got {density!r}")
    return d


def sparse_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's layers whose `weight` is made sparse: `nn.Linear` and `nn.Conv1d/2d/3d`, by name."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, _SPARSE_TYPES) and isinstance(getattr(m, "weight", None), torch.Tensor)}


def erk_densities(shapes: list[tuple[int, ...]], density: float, erk: bool = True) -> list[float]:
    """Per-layer densities whose parameter-weighted mean is `density` (Evci et al. 2020, RigL's
    `get_sparsities_erdos_renyi`).

    Each layer's density is `eps * (sum of its dims) / (product of its dims)` (Erdos-Renyi-Kernel; with
    `erk=False`, Erdos-Renyi: only the two channel dims count), with one `eps` for all layers. A layer whose
    density would exceed 1 is made dense and `eps` is solved again for the others, until none exceeds 1.
    """
    density = check_density(density)
    numels = [math.prod(s) for s in shapes]
    if density == 1.0:
        return [1.0] * len(shapes)
    raw = [(sum(s) / math.prod(s)) if erk else ((s[0] + s[1]) / (s[0] * s[1])) for s in shapes]
    dense: set[int] = set()
    while True:
        rhs = divisor = 0.0
        for i, n in enumerate(numels):
            if i in dense:
                rhs -= n * (1.0 - density)  # its zeros must be found in the other layers
            else:
                rhs += n * density
                divisor += raw[i] * n
        if len(dense) == len(shapes) or rhs <= 0:
            raise ValueError(f"density {density} cannot be reached with these layer shapes: the small layers "
                             "made dense already hold more than that; choose a lower density or distribution="
                             "'uniform'")
        eps = rhs / divisor
        sparse = [i for i in range(len(shapes)) if i not in dense]
        top = max(raw[i] for i in sparse)
        if top * eps <= 1.0:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))]
        dense.update(i for i in sparse if raw[i] == top)


def cosine_drop_fraction(progress: float, alpha: float, end_frac: float) -> float:
    """RigL's update fraction: `alpha / 2 * (1 + cos(pi * progress / end_frac))`, 0 from `end_frac` on."""
    if progress >= end_frac:
        return 0.0
    return alpha / 2.0 * (1.0 + math.cos(math.pi * progress / end_frac))


def mask_optimizer_state(optimizer_state: Mapping, params: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
    """Multiply every tensor of each parameter's optimizer state that has the parameter's shape by its mask.

    Works for `torch.optim` (`exp_avg`, `exp_avg_sq`, `momentum_buffer`, ...) and fastai's `Optimizer`
    (`grad_avg`, `sqr_avg`, ...), both of which keep a dict per parameter in `.state`; scalars such as the
    step count are left alone. `.get` so that a defaultdict gains no entries.
    """
    state_tensors, state_masks = [], []
    for p, m in zip(params, masks):
        for v in (optimizer_state.get(p) or {}).values():
            if isinstance(v, torch.Tensor) and v.shape == p.shape:
                state_tensors.append(v)
                state_masks.append(m)
    if state_tensors:
        torch._foreach_mul_(state_tensors, state_masks)


class DynamicSparsity:
    """Masks for the sparse layers of `model`, and their drop/regrow schedule.

    `density`: the fraction of the sparse layers' weights kept, overall; `distribution`: "erk" (per-layer
    densities by `erk_densities`) or "uniform"; `method`: "rigl" (regrow by |dense gradient|) or "set" (at
    random); `delta_t`: optimizer steps between mask updates; `alpha`: the fraction of each layer's active
    weights updated at the start, decaying by `cosine_drop_fraction` to 0 at `end_frac` of the run;
    `seed`: the initial masks and SET's regrowth (a fresh generator per update, derived from the seed and
    the step: the same on every rank and after a resume); `apply`: mask the weights now (not when a
    `load_state_dict` follows).
    """

    def __init__(self, model: nn.Module, density: float = 0.1, method: str = "rigl", distribution: str = "erk",
                 delta_t: int = 100, alpha: float = 0.3, end_frac: float = 0.75, seed: int = 0, apply: bool = True):
        density = check_density(density)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
        if isinstance(delta_t, bool) or not isinstance(delta_t, int) or delta_t < 1:
            raise ValueError(f"delta_t must be an integer >= 1 (optimizer steps between mask updates), got {delta_t!r}")
        if not 0.0 < _check_real("alpha", alpha) < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        if not 0.0 < _check_real("end_frac", end_frac) <= 1.0:
            raise ValueError(f"end_frac must be in (0, 1], got {end_frac!r}")
        layers = sparse_layers(model)
        if not layers:
            raise ValueError("the model has no nn.Linear or nn.Conv layer to make sparse")
        self.density, self.method, self.distribution = density, method, distribution
        self.delta_t, self.alpha, self.end_frac, self.seed = delta_t, float(alpha), float(end_frac), int(seed)
        self.names = list(layers)
        shapes = [tuple(m.weight.shape) for m in layers.values()]
        self.numels = [math.prod(s) for s in shapes]
        fractions = (erk_densities(shapes, density) if distribution == "erk" else [density] * len(shapes))
        self.n_active = [min(n, max(1, round(f * n))) for f, n in zip(fractions, self.numels)]
        self.step = 0  # optimizer steps taken (the schedule's position)
        self.n_updates = 0
        self.skipped: list[str] = []  # the layers the last update left alone (RigL: no gradient)
        self.bind(model)
        g = torch.Generator(device="cpu").manual_seed(derive_seed(self.seed, -1))
        self.masks = [self._top(torch.rand(n, generator=g).to(p.device), k).view_as(p)
                      for p, n, k in zip(self.params, self.numels, self.n_active)]
        if apply:
            self.after_step()

    # -- binding and masking
    def bind(self, model: nn.Module) -> None:
        """Point at `model`'s weights (the same layer names): after a load, or a model moved or wrapped."""
        layers = sparse_layers(model)
        missing = [n for n in self.names if n not in layers]
        if missing:
            raise ValueError(f"the model lacks the sparse layers {missing}")
        self.params = [layers[n].weight for n in self.names]
        if hasattr(self, "masks"):
            self.masks = [m.to(p.device) for m, p in zip(self.masks, self.params)]

    @property
    def densities(self) -> list[float]:
        """Each layer's density (host values, from the active counts: no device read)."""
        return [k / n for k, n in zip(self.n_active, self.numels)]

    @property
    def overall_density(self) -> float:
        return sum(self.n_active) / sum(self.numels)

    @property
    def _sparse_idx(self) -> list[int]:
        return [i for i, (k, n) in enumerate(zip(self.n_active, self.numels)) if k < n]

    @staticmethod
    def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
        """A flat boolean mask of the `k` largest `scores`."""
        mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
        return mask.index_fill_(0, torch.topk(scores.flatten(), k, sorted=False).indices, True)

    @torch.no_grad()
    def after_step(self, optimizer_state: Mapping | None = None) -> None:
        """Weights (and, if given, optimizer state) multiplied by the masks: after every optimizer step."""
        torch._foreach_mul_([p.detach() for p in self.params], self.masks)
        if optimizer_state is not None:
            mask_optimizer_state(optimizer_state, self.params, self.masks)

    def due(self, progress: float) -> bool:
        """Whether the step about to be taken (`self.step + 1`) updates the masks."""
        return (self.step + 1) % self.delta_t == 0 and cosine_drop_fraction(progress, self.alpha, self.end_frac) > 0

    @torch.no_grad()
    def before_step(self, progress: float, optimizer_state: Mapping | None = None) -> list[torch.Tensor] | None:
        """Between backward and the optimizer step: update the masks if due (RigL reads the gradients now,
        before they are masked), then mask the gradients. `progress` in [0, 1] is how far the run is.

        Returns, after an update, each layer's churn (fraction of its active weights that are new) as
        device scalars; otherwise None."""
        churn = None
        if self.due(progress):
            # The weights are masked by `after_step`: an interruption before the step leaves them as they were.
            churn = self.update(cosine_drop_fraction(progress, self.alpha, self.end_frac), optimizer_state,
                                mask_weights=False)
        self.step += 1
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, [m for p, m in zip(self.params, self.masks) if p.grad is not None])
        return churn

    @torch.no_grad()
    def update(self, fraction: float, optimizer_state: Mapping | None = None,
               mask_weights: bool = True) -> list[torch.Tensor]:
        """Drop `fraction` of each sparse layer's active weights (the smallest |w|) and regrow as many among
        the others (RigL: largest |grad|; SET: at random). Regrown weights and their optimizer state start at
        zero (they were masked); dropped ones are zeroed (the weights only with `mask_weights`, else by the
        next `after_step`). Returns each sparse layer's churn (a device scalar).

        RigL keeps the mask of a layer that has no gradient at this step (a layer frozen, or a block that
        stochastic depth dropped, has none to regrow by): its churn is 0 and its name is in `self.skipped`."""
        g = None
        churn = []
        self.skipped = []
        for i in self._sparse_idx:
            p, old, k_active = self.params[i], self.masks[i], self.n_active[i]
            k = int(fraction * k_active)
            if k == 0 or (self.method == "rigl" and p.grad is None):
                if k and p.grad is None:
                    self.skipped.append(self.names[i])
                churn.append(torch.zeros((), device=p.device))
                continue
            neg_inf = torch.tensor(float("-inf"), device=p.device)
            kept = self._top(torch.where(old, p.detach().abs().float(), neg_inf), k_active - k).view_as(old)
            if self.method == "rigl":
                score = p.grad.detach().abs().float()
            else:
                if g is None or g.device != p.device:
                    g = torch.Generator(device=p.device).manual_seed(derive_seed(self.seed, self.step))
                score = torch.rand(p.shape, generator=g, device=p.device)
            grown = self._top(torch.where(kept, neg_inf, score), k).view_as(old)
            new = kept | grown
            churn.append((new & ~old).sum() / k_active)
            self.masks[i] = new
        self.n_updates += 1
        if optimizer_state is not None:
            mask_optimizer_state(optimizer_state, self.params, self.masks)
        if mask_weights:
            self.after_step()
        return churn

    # -- accounting
    def theoretical_flops(self, dense_flops: list[float]) -> float:
        """FLOPs of the sparse layers if zeros were skipped: dense FLOPs x density, summed over layers."""
        return sum(f * d for f, d in zip(dense_flops, self.densities))

    # -- state
    def state_dict(self) -> dict:
        return {"names": list(self.names), "n_active": list(self.n_active), "step": self.step,
                "n_updates": self.n_updates, "seed": self.seed,
                "masks": [m.detach().cpu().clone() for m in self.masks]}  # sync-ok: checkpoints only

    def load_state_dict(self, state: dict) -> None:
        if state["names"] != self.names:
            raise ValueError(f"sparse layers differ: saved {state['names']}, model {self.names}")
        self.n_active, self.step, self.n_updates, self.seed = (list(state["n_active"]), state["step"],
                                                                state["n_updates"], state["seed"])
        self.masks = [m.to(p.device) for m, p in zip(state["masks"], self.params)]
