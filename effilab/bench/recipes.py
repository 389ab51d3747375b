"""Recipes: named ways to train, each a list of callback factories.

A factory receives the run's `RunContext` (task, seed, epochs, the same seed's finished runs, options)
and returns the callbacks to add to the Learner. Recipes are looked up by name in `RECIPES`; add your
own with `register`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastai.callback.core import Callback

    from ..datasets import TaskData
    from .runner import RunResult

__all__ = [
    "DEFAULT_FRACTION",
    "DEFAULT_RECIPES",
    "RECIPES",
    "Recipe",
    "RunContext",
    "baseline",
    "get_recipe",
    "infobatch",
    "random_prune",
    "random_prune_fraction",
    "register",
    "run_order",
]

# Random pruning's fraction when no InfoBatch run of the same seed is there to match.
DEFAULT_FRACTION = 0.3


@dataclass
class RunContext:
    """What a callback factory may read about the run it builds callbacks for.

    `peers` holds the runs of the same seed that already finished, by recipe name; `notes` is where a
    factory writes what it chose (kept in `RunResult.params`).
    """

    task: TaskData
    seed: int
    epochs: int
    bs: int
    lr: float
    n_train: int
    drop_last: bool = True
    peers: Mapping[str, RunResult] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)


CallbackFactory = Callable[[RunContext], "Callback | Sequence[Callback] | None"]


@dataclass(frozen=True)
class Recipe:
    """A name, the callback factories that make the recipe, and the recipes it reads (`after`): when
    those are requested too, their run of the same seed comes first and is in `RunContext.peers`."""

    name: str
    callbacks: tuple[CallbackFactory, ...] = ()
    description: str = ""
    after: tuple[str, ...] = ()

    def make_callbacks(self, ctx: RunContext) -> list[Callback]:
        cbs: list[Callback] = []
        for factory in self.callbacks:
            made = factory(ctx)
            if made is None:
                continue
            cbs.extend(made if isinstance(made, (list, tuple)) else [made])
        return cbs


RECIPES: dict[str, Recipe] = {}


def register(recipe: Recipe, overwrite: bool = False) -> Recipe:
    if recipe.name in RECIPES and not overwrite:
        raise ValueError(f"a recipe named {recipe.name!r} is already registered (pass overwrite=True)")
    RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(recipe: str | Recipe) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if recipe not in RECIPES:
        raise KeyError(f"unknown recipe {recipe!r}; valid recipes: {', '.join(RECIPES)}")
    return RECIPES[recipe]


def run_order(recipes: Iterable[Recipe]) -> list[Recipe]:
    """`recipes` reordered so that each comes after the requested recipes it reads; otherwise stable."""
    todo = list(recipes)
    names = {r.name for r in todo}
    done: list[Recipe] = []
    while todo:
        ready = next((r for r in todo if all(a not in names or a in {d.name for d in done} for a in r.after)),
                     None)
        if ready is None:
            raise ValueError(f"recipes depend on each other in a cycle: {[r.name for r in todo]}")
        done.append(ready)
        todo.remove(ready)
    return done


def random_prune_fraction(forwarded_total: int, n_samples: int, epochs: int, delta: float,
                          bs: int | None = None, drop_last: bool = True) -> float:
    """The `RandomPrune(fraction, delta)` fraction that forwards (about) `forwarded_total` samples in
    `epochs` epochs over `n_samples` training samples.

    RandomPrune drops `round(fraction * n)` samples in each of the epochs 0 .. P-1, P = floor(delta *
    epochs) (epoch 0 included, unlike InfoBatch, whose first epoch is full because all scores start
    equal), and none after. An epoch over k samples forwards k, or floor(k / bs) * bs with `drop_last`.
    So the P pruning epochs must forward `forwarded_total - (epochs - P) * full`, and each keeps the
    number of whole batches nearest to that share: the result is off by at most P * bs / 2 samples.
    """
    if epochs < 1 or n_samples < 1:
        raise ValueError(f"need epochs >= 1 and n_samples >= 1, got {epochs} and {n_samples}")
    n_prune = math.floor(delta * epochs)
    if n_prune == 0:
        return 0.0  # RandomPrune never prunes: any fraction forwards the same
    batched = bs is not None and drop_last
    full = (n_samples // bs) * bs if batched else n_samples
    per_epoch = (forwarded_total - (epochs - n_prune) * full) / n_prune
    if batched:
        # k kept samples forward floor(k / bs) whole batches: keep exactly the nearest whole number of
        # batches (at least one), so the fraction lands k on it without rounding trouble.
        keep = min(max(round(per_epoch / bs), 1), n_samples // bs) * bs
        if keep >= full:
            return 0.0
    else:
        keep = min(max(round(per_epoch), 1), n_samples)
    return (n_samples - keep) / n_samples


# ------------------------------------------------------------------------------------------ recipes


def _infobatch(ratio: float, delta: float) -> CallbackFactory:
    def make(ctx: RunContext):
        from ..data.infobatch import InfoBatch

        ctx.notes.update(ratio=ratio, delta=delta)
        return InfoBatch(ratio=ratio, delta=delta, seed=ctx.seed)

    return make


def _random_prune(reference: str, delta: float) -> CallbackFactory:
    def make(ctx: RunContext):
        from ..data.infobatch import RandomPrune

        ref = ctx.peers.get(reference)
        if ref is None:
            fraction, run_delta = float(ctx.options.get("fraction", DEFAULT_FRACTION)), delta
            ctx.notes.update(fraction=fraction, delta=run_delta, matched_to=None)
        else:
            # Same annealing point as the run it matches, so only the choice of samples differs.
            run_delta = ref.params.get("delta", delta)
            fraction = random_prune_fraction(ref.samples, ctx.n_train, ctx.epochs, run_delta, ctx.bs,
                                             ctx.drop_last)
            ctx.notes.update(fraction=fraction, delta=run_delta, matched_to=reference,
                             target_samples=ref.samples)
        return RandomPrune(fraction=fraction, delta=run_delta, seed=ctx.seed)

    return make


def baseline() -> Recipe:
    return Recipe("baseline", (), "full data every epoch")


def infobatch(ratio: float = 0.5, delta: float = 0.875) -> Recipe:
    return Recipe("infobatch", (_infobatch(ratio, delta),), f"InfoBatch(ratio={ratio}, delta={delta})")


def random_prune(reference: str = "infobatch", delta: float = 0.875) -> Recipe:
    return Recipe("random-prune", (_random_prune(reference, delta),),
                  f"RandomPrune forwarding as many samples as the same seed's {reference} run "
                  f"(fraction {DEFAULT_FRACTION} without one)", after=(reference,))


for _recipe in (baseline(), infobatch(), random_prune()):
    register(_recipe)

DEFAULT_RECIPES = ("baseline", "infobatch", "random-prune")
