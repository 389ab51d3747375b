"""Recipes: named ways to train, each a set of callbacks with their arguments.

A recipe is written as components joined by `+`, each a component name with optional keyword arguments
(Python literals only): `baseline`, `infobatch(ratio=0.3)+dashboard`, `random-prune(fraction=0.2)`.
Components are the built-ins `baseline` (no callback), `infobatch`, `random_prune` (matched to the
campaign's InfoBatch recipe unless given a `fraction`), fastai's dataset regularisation `mixup(alpha=0.4)`,
`cutmix(alpha=1.0)`, `label_smoothing(eps=0.1)`, and every technique of `effilab.registry`, by its
registry name, built from the technique's class with the arguments given (`-` and `_` are the same in
names). Add your own with `register_component`; whole recipes in Python with `register`.

>>> r = parse_recipe("infobatch(ratio=0.3)+dashboard")  # doctest: +SKIP
>>> r.name, [str(c) for c in r.components]  # doctest: +SKIP
('infobatch(ratio=0.3)+dashboard', ['infobatch(ratio=0.3)', 'dashboard'])
"""

from __future__ import annotations

import ast
import inspect
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastai.callback.core import Callback

    from ..datasets import TaskData

__all__ = [
    "BUDGET_UNITS",
    "CAMPAIGN_KEYS",
    "MATCHED",
    "REFERENCE",
    "BudgetPlan",
    "NothingToMatch",
    "add_matched_baselines",
    "budget_plan",
    "check_budget_unit",
    "check_budgets",
    "reinvest",
    "saved_unit",
    "spent_in",
    "COMPONENTS",
    "DEFAULT_FRACTION",
    "DEFAULT_RECIPES",
    "RECIPES",
    "Component",
    "ComponentSpec",
    "Recipe",
    "RecipeError",
    "RunContext",
    "components",
    "get_recipe",
    "load_recipes_file",
    "parse_components",
    "parse_recipe",
    "random_prune_fraction",
    "register",
    "register_component",
    "check_campaign_value",
    "check_fits_model",
    "check_fits_task",
    "input_kind",
    "resolve_campaign",
    "run_order",
]

# Random pruning's fraction when no InfoBatch run of the same seed is there to match.
DEFAULT_FRACTION = 0.3


class RecipeError(ValueError):
    """A recipe that cannot be parsed or built: unknown component or argument, bad value or syntax."""


@dataclass
class RunContext:
    """What a callback factory may read about the run it builds callbacks for.

    `peers` holds the stored records of the runs of the same seed that already finished, by recipe name
    (their `samples`, `epochs`, `history` and `params`); `notes` is where a factory writes what it chose
    (kept in the run's `params`).
    """

    task: TaskData
    seed: int
    epochs: int
    bs: int
    lr: float
    n_train: int
    drop_last: bool = True
    peers: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)


CallbackFactory = Callable[[RunContext], "Callback | Sequence[Callback] | None"]


# ------------------------------------------------------------------------------------------ components


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def _load(target):
    """A class or factory, given as itself or as "module:attribute" (imported on first use)."""
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        return getattr(import_module(module), attr)
    return target


def _json_safe(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str)) or (
        isinstance(value, (list, tuple)) and all(_json_safe(v) for v in value))


@dataclass(frozen=True)
class Component:
    """A recipe ingredient: a name, what builds its callbacks, and the keyword arguments it accepts.

    `target` is a callback class or a factory returning callbacks (or "module:attribute" of one); its
    signature says which arguments a recipe may pass. A `seed` argument the recipe leaves out gets the
    run's seed. `build(ctx, kwargs) -> (callbacks, notes)` replaces the plain call where the component
    needs the run (random pruning reads the run it matches); `extra` names the arguments only it takes;
    `resolve(kwargs, recipe, campaign) -> (kwargs, after)` fills in arguments that depend on the other
    recipes of the campaign and names the recipes whose run of the same seed must come first.
    `inputs` names the kinds of task input it works on ("flat", "image", "sequence"; empty: any).
    """

    name: str
    target: Any = None
    description: str = ""
    category: str = ""
    build: Callable | None = None
    extra: tuple[str, ...] = ()
    resolve: Callable | None = None
    inputs: tuple[str, ...] = ()

    def signature(self) -> inspect.Signature | None:
        if self.target is None:
            return None
        return inspect.signature(_load(self.target))

    def accepted(self) -> tuple[str, ...]:
        """The arguments a recipe may give (a leading underscore marks an internal one: not accepted)."""
        sig = self.signature()
        names = [] if sig is None else [
            p.name for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"
            and not p.name.startswith("_")]
        return tuple(names) + tuple(n for n in self.extra if n not in names)

    def card(self) -> str:
        """The first line of the method card (the class's or factory's docstring), else the description."""
        doc = None
        if self.target is not None:
            try:
                doc = inspect.getdoc(_load(self.target))
            except Exception:  # a module that fails to import: the description still says what it is
                doc = None
        first = doc.strip().split("\n\n")[0].replace("\n", " ") if doc else ""
        return first or self.description

    def required(self) -> tuple[str, ...]:
        sig = self.signature()
        return () if sig is None else tuple(
            p.name for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty)

    def usage(self) -> str:
        """`name(arg=default, ...)`, without the internal arguments: `seed` (the run's seed fills it),
        those with a leading underscore, and hooks whose default is no literal (a clock)."""
        sig = self.signature()
        args = []
        if sig is not None:
            for p in sig.parameters.values():
                # A default that is no literal (a clock, a function) is a hook for Python, not for recipes.
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "seed" \
                        and not p.name.startswith("_") and (p.default is p.empty or _json_safe(p.default)):
                    args.append(p.name if p.default is p.empty else f"{p.name}={p.default!r}")
        args += [f"{n}=None" for n in self.extra if n not in (sig.parameters if sig else {})]
        return f"{self.name}({', '.join(args)})" if args else self.name

    def instantiate(self, ctx: RunContext | None, kwargs: Mapping[str, Any]) -> tuple[list, dict]:
        """The callbacks for one run and the arguments they got (for the results). `ctx=None`: a
        check of the arguments before any run (seed 0, nothing to match)."""
        kwargs = dict(kwargs)
        if self.build is not None:
            made, notes = self.build(ctx, kwargs)
        elif self.target is None:
            made, notes = None, {}
        else:
            target = _load(self.target)
            sig = inspect.signature(target)
            if "seed" in sig.parameters and "seed" not in kwargs:
                kwargs["seed"] = 0 if ctx is None else ctx.seed
            made = target(**kwargs)
            bound = sig.bind_partial(**kwargs)
            bound.apply_defaults()
            notes = {k: v for k, v in bound.arguments.items() if _json_safe(v)}
        cbs = [] if made is None else list(made) if isinstance(made, (list, tuple)) else [made]
        return cbs, notes


# name -> Component; the built-ins here, the registry's techniques added by `components()`.
COMPONENTS: dict[str, Component] = {}

# Registered techniques whose `make()` is a test-friendly factory: the class a recipe builds instead.
TECHNIQUE_CLASSES = {
    "infobatch": "effilab.data.infobatch:InfoBatch",
    "random_prune": "effilab.data.infobatch:RandomPrune",
    "dashboard": "effilab.viz.dashboard:Dashboard",
    "system_monitor": "effilab.system.monitor:SystemMonitor",
    "fit_recorder": "effilab.system.fit_recorder:FitRecorder",
}


def register_component(name: str, target=None, description: str = "", category: str = "", *,
                       build: Callable | None = None, extra: Sequence[str] = (),
                       resolve: Callable | None = None, inputs: Sequence[str] = (),
                       overwrite: bool = False) -> Component:
    """Make `name` usable in recipes: `target` is a callback class or a factory (see `Component`)."""
    key = _key(name)
    if key in COMPONENTS and not overwrite:
        raise ValueError(f"a component named {key!r} is already registered (pass overwrite=True)")
    comp = Component(key, target, description, category, build, tuple(extra), resolve, tuple(inputs))
    COMPONENTS[key] = comp
    return comp


def _technique_target(tech):
    """The class behind a registered technique, so that recipes pass their own arguments to it."""
    if tech.name in TECHNIQUE_CLASSES:
        return TECHNIQUE_CLASSES[tech.name]
    if isinstance(tech.make, type):
        return tech.make
    try:
        made = tech.make()
    except Exception:  # a factory that needs arguments: recipes call it as it is
        return tech.make
    return type(made) if not isinstance(made, (list, tuple)) else tech.make


def components() -> dict[str, Component]:
    """Every component a recipe may use: the built-ins, the techniques of `effilab.registry` (imported
    now) and those added with `register_component`, by name."""
    from ..registry import all_techniques

    for name, tech in all_techniques().items():
        key = _key(name)
        if key not in COMPONENTS:
            COMPONENTS[key] = Component(key, _technique_target(tech), f"registered technique ({tech.category})",
                                        tech.category, inputs=tech.inputs)
    return dict(COMPONENTS)


_INPUT_NAMES = {"flat": "flat feature vectors", "image": "images", "sequence": "token sequences"}


def input_kind(task) -> str:
    """What a task's inputs are: "sequence" (a language model's tokens), "image" (C, H, W) or "flat"."""
    if getattr(task, "kind", "classification") == "language_model":
        return "sequence"
    return "image" if len(tuple(task.input_shape)) == 3 else "flat"


def check_fits_task(recipes: Iterable[Recipe], task) -> None:
    """A `RecipeError` naming the first component that does not work on `task`'s inputs (a technique
    for images on token sequences, one for token sequences on images), before any training."""
    kind = input_kind(task)
    for recipe in recipes:
        for spec in recipe.components:
            comp = _find_component(spec.name, recipe.name)
            if comp.inputs and kind not in comp.inputs:
                fits = " or ".join(_INPUT_NAMES[k] for k in comp.inputs)
                raise RecipeError(f"component {spec.name!r} in recipe {recipe.name!r} works on {fits}; task "
                                  f"{task.name!r} has {_INPUT_NAMES[kind]}: choose a task with {fits} "
                                  "(--task) or leave the component out")


def _model_fix(error: Exception, kind: str) -> str:
    """How to give a technique the model it needs, in the bench's terms."""
    if type(error).__name__ != "NotResidualError":
        return ""
    return {"image": " In the bench: --model resnet (a residual CNN).",
            "sequence": " In the bench: --model small (a transformer of residual blocks).",
            "flat": " In the bench: an image task with --model resnet, or --task pysource."}[kind]


def check_fits_model(recipes: Iterable[Recipe], model, model_name: str, task) -> None:
    """A `RecipeError` naming the first component whose technique refuses the campaign's model (its callback's
    `check_model(model)`: stochastic depth, residual gates or growth on a model without residual blocks), with
    the option that fixes it, before any training. `model`: one model as the runs build it."""
    kind = input_kind(task)
    for recipe in recipes:
        for spec in recipe.components:
            cbs, _ = _find_component(spec.name, recipe.name).instantiate(None, spec.args)
            for cb in cbs:
                check = getattr(cb, "check_model", None)
                if check is None:
                    continue
                try:
                    check(model)
                except Exception as e:
                    raise RecipeError(f"component {spec} in recipe {recipe.name!r} cannot train model {model_name!r} "
                                      f"on task {task.name!r}: {e}{_model_fix(e, kind)}") from None


def _find_component(name: str, context: str = "") -> Component:
    key = _key(name)
    comp = COMPONENTS.get(key) or components().get(key)
    if comp is None:
        where = f" in recipe {context!r}" if context and context != name else ""
        raise RecipeError(f"unknown component {name!r}{where}; components: {', '.join(sorted(components()))}")
    return comp


# ---- parsing


@dataclass(frozen=True)
class ComponentSpec:
    """One parsed component: the name as written, its registry key and its keyword arguments."""

    name: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def key(self) -> str:
        return _key(self.name)

    @property
    def args(self) -> dict[str, Any]:
        return dict(self.kwargs)

    def with_args(self, **kwargs) -> ComponentSpec:
        return replace(self, kwargs=tuple({**self.args, **kwargs}.items()))

    def __str__(self) -> str:
        if not self.kwargs:
            return self.name
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.kwargs)})"


_NAME = re.compile(r"\s*([A-Za-z_][\w\-]*)\s*(?:\((.*)\))?\s*\Z", re.DOTALL)


def _split_top_level(text: str) -> list[str]:
    """`text` split at the `+` signs outside parentheses, brackets and string literals."""
    parts, depth, quote, start, i = [], 0, None, 0, 0
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                raise RecipeError(f"unbalanced ')' in recipe {text!r}")
        elif ch == "+" and depth == 0:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    if quote or depth:
        raise RecipeError(f"unclosed {'string' if quote else 'parenthesis'} in recipe {text!r}")
    parts.append(text[start:])
    return parts


def parse_components(text: str) -> tuple[ComponentSpec, ...]:
    """The components of a recipe string, syntax only: `name(k=v, ...)` joined by `+`; values are
    Python literals (numbers, strings, booleans, None, tuples, lists, dicts), read with `ast`."""
    if not isinstance(text, str) or not text.strip():
        raise RecipeError(f"empty recipe {text!r}")
    specs = []
    for part in _split_top_level(text):
        m = _NAME.match(part)
        if not m:
            raise RecipeError(f"cannot read component {part.strip()!r} of recipe {text!r}: write name or "
                              "name(key=value, ...) with components joined by '+'")
        name, args = m.group(1), m.group(2)
        kwargs: dict[str, Any] = {}
        if args is not None and args.strip():
            try:
                call = ast.parse(f"f({args})", mode="eval").body
            except SyntaxError as e:
                raise RecipeError(f"cannot read the arguments of {part.strip()!r} in recipe {text!r}: "
                                  f"{e.msg}") from None
            if not isinstance(call, ast.Call) or call.args or any(k.arg is None for k in call.keywords):
                raise RecipeError(f"{part.strip()!r} in recipe {text!r}: arguments must be key=value")
            for kw in call.keywords:
                if kw.arg in kwargs:
                    raise RecipeError(f"{part.strip()!r} in recipe {text!r}: {kw.arg!r} given twice")
                try:
                    kwargs[kw.arg] = ast.literal_eval(kw.value)
                except ValueError:
                    raise RecipeError(f"{part.strip()!r} in recipe {text!r}: the value of {kw.arg!r} must be "
                                      f"a literal (number, string, True/False/None, list, tuple, dict), got "
                                      f"{ast.unparse(kw.value)!r}") from None
        specs.append(ComponentSpec(name, tuple(kwargs.items())))
    return tuple(specs)


def _check_spec(spec: ComponentSpec, context: str) -> None:
    comp = _find_component(spec.name, context)
    accepted = comp.accepted()
    for k in spec.args:
        if k not in accepted:
            takes = ", ".join(accepted) if accepted else "no arguments"
            raise RecipeError(f"component {spec.name!r} in recipe {context!r} does not accept {k!r}; "
                              f"it accepts: {takes} (usage: {comp.usage()})")
    missing = [k for k in comp.required() if k not in spec.args]
    if missing:
        raise RecipeError(f"component {spec.name!r} in recipe {context!r} needs {', '.join(missing)} "
                          f"(usage: {comp.usage()})")
    try:
        comp.instantiate(None, spec.args)  # wrong values fail here, before any training
    except RecipeError:
        raise
    except Exception as e:
        raise RecipeError(f"component {spec} in recipe {context!r}: {type(e).__name__}: {e}") from None


# ------------------------------------------------------------------------------------------ recipes


@dataclass(frozen=True)
class Recipe:
    """A name, its components (parsed recipe text) and any extra callback factories (Python), and the
    recipes it reads (`after`): when those are in the campaign too, their run of the same seed comes
    first and is in `RunContext.peers`."""

    name: str
    callbacks: tuple[CallbackFactory, ...] = ()
    description: str = ""
    after: tuple[str, ...] = ()
    components: tuple[ComponentSpec, ...] = ()
    matches: str = ""  # a budget-matched baseline: the recipe whose measured spend it is given

    @property
    def reinvests(self) -> bool:
        return any(s.key == "reinvest" for s in self.components)

    @property
    def text(self) -> str:
        """The components as recipe text (what the recipe is, whatever its name)."""
        parts = [str(c) for c in self.components]
        parts += [getattr(f, "__name__", "factory") + "<python>" for f in self.callbacks]
        return "+".join(parts) or "baseline"

    def make_callbacks(self, ctx: RunContext) -> list[Callback]:
        cbs: list[Callback] = []
        for spec in self.components:
            made, notes = _find_component(spec.name, self.name).instantiate(ctx, spec.args)
            key, i = spec.key, 2
            while key in ctx.notes:  # the same component twice in one recipe
                key, i = f"{spec.key}#{i}", i + 1
            ctx.notes[key] = notes
            cbs.extend(made)
        for factory in self.callbacks:
            made = factory(ctx)
            if made is None:
                continue
            cbs.extend(made if isinstance(made, (list, tuple)) else [made])
        return cbs

    def to_config(self) -> dict:
        config = {"name": self.name, "components": [str(c) for c in self.components],
                  "python": [getattr(f, "__qualname__", repr(f)) for f in self.callbacks]}
        if self.matches:
            config["matches"] = self.matches
        return config


RECIPES: dict[str, Recipe] = {}


def register(recipe: Recipe, overwrite: bool = False) -> Recipe:
    """Make `recipe` available by its name (the command line's `--recipe NAME`)."""
    if recipe.name in RECIPES and not overwrite:
        raise ValueError(f"a recipe named {recipe.name!r} is already registered (pass overwrite=True)")
    RECIPES[recipe.name] = recipe
    return recipe


def parse_recipe(text: str, name: str | None = None) -> Recipe:
    """A recipe from its text: a registered recipe's name, or components joined by `+`. The name is the
    text as given (stripped) unless `name` is given. Unknown components or arguments and bad values
    raise `RecipeError` listing what exists."""
    if not isinstance(text, str):
        raise RecipeError(f"a recipe is a string, got {text!r}")
    stripped = text.strip()
    if stripped in RECIPES:
        recipe = RECIPES[stripped]
        return recipe if name is None else replace(recipe, name=name)
    specs = parse_components(stripped)
    display = stripped if name is None else name
    for spec in specs:
        _check_spec(spec, display)
    return Recipe(display, components=specs)


def get_recipe(recipe: str | Recipe | Mapping) -> Recipe:
    """A `Recipe` from a Recipe, a recipe text (see `parse_recipe`) or a mapping {name, components}."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return _recipe_from_mapping(recipe, "recipe")
    try:
        return parse_recipe(recipe)
    except RecipeError as e:
        if isinstance(recipe, str) and _NAME.match(recipe) and "unknown component" in str(e):
            raise RecipeError(f"unknown recipe {recipe.strip()!r}; valid recipes: {', '.join(RECIPES)}; or "
                              f"components joined by '+': {', '.join(sorted(components()))}") from None
        raise


def _recipe_from_mapping(entry: Mapping, where: str) -> Recipe:
    unknown = set(entry) - {"name", "components", "recipe", "description"}
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; a recipe has name "
                          "(optional) and components (a list of component strings) or recipe (one string)")
    comps = entry.get("components", entry.get("recipe"))
    if isinstance(comps, str):
        comps = [comps]
    if not comps or not isinstance(comps, (list, tuple)) or not all(isinstance(c, str) for c in comps):
        raise RecipeError(f"{where}: components must be a non-empty list of strings, e.g. "
                          "components = [\"infobatch(ratio=0.3)\", \"dashboard\"]")
    text = "+".join(c.strip() for c in comps)
    name = entry.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise RecipeError(f"{where}: name must be a non-empty string")
    recipe = parse_recipe(text, name=name.strip() if name else None)
    return replace(recipe, description=str(entry.get("description", recipe.description)))


# Keys a campaign file may set besides its recipes (the command line's options of the same names win).
CAMPAIGN_KEYS = ("task", "n_samples", "epochs", "seeds", "bs", "lr", "model", "width", "target_acc",
                 "fraction", "device", "threads", "budget")


def load_recipes_file(path) -> tuple[list[Recipe], dict[str, Any]]:
    """Read a TOML campaign file: `[[recipe]]` tables (`name`, `components = [...]`) and/or a list
    `recipes = ["baseline", "infobatch(ratio=0.3)+dashboard"]`, plus optional campaign keys
    (`CAMPAIGN_KEYS`: task, epochs, seeds, ...). Returns the recipes and the campaign keys."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise RecipeError(f"cannot read recipes file {str(path)!r}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: not valid TOML: {e}") from None
    recipes: list[Recipe] = []
    for i, text in enumerate(data.pop("recipes", [])):
        if not isinstance(text, str):
            raise RecipeError(f"{path}: recipes[{i}] must be a string, got {text!r}")
        recipes.append(parse_recipe(text))
    entries = data.pop("recipe", [])
    if isinstance(entries, Mapping):
        entries = [entries]
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise RecipeError(f"{path}: each [[recipe]] must be a table")
        recipes.append(_recipe_from_mapping(entry, f"{path}: recipe {i + 1}"))
    unknown = [k for k in data if k not in CAMPAIGN_KEYS]
    if unknown:
        raise RecipeError(f"{path}: unknown key(s) {', '.join(unknown)}; valid keys: [[recipe]], recipes, "
                          f"{', '.join(CAMPAIGN_KEYS)}")
    for key, value in data.items():
        check_campaign_value(key, value, str(path))
    return recipes, data


# What each campaign key must be: "int", "number" (int or float), "str", "ints" (a list of ints).
_KEY_TYPES = {"task": "str", "n_samples": "int", "epochs": "int", "seeds": "ints", "bs": "int", "lr": "number",
              "model": "str", "width": "int", "target_acc": "number", "fraction": "number", "device": "str",
              "threads": "int", "budget": "str"}
_TYPE_WORDS = {"int": "an integer", "number": "a number", "str": "a string", "ints": "a list of integers"}


def check_campaign_value(key: str, value, where: str) -> None:
    """A `RecipeError` unless `value` has the type campaign key `key` needs (no bool for a number, no
    float for an integer, no string for either: nothing is coerced)."""
    kind = _KEY_TYPES[key]
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    ok = {"int": is_int, "number": lambda v: is_int(v) or isinstance(v, float), "str": lambda v: isinstance(v, str),
          "ints": lambda v: isinstance(v, list) and all(map(is_int, v))}[kind](value)
    if not ok:
        example = {"int": f"{key} = 8", "number": f"{key} = 0.01", "str": f'{key} = "..."',
                   "ints": f"{key} = [0, 1, 2]"}[kind]
        raise RecipeError(f"{where}: {key} must be {_TYPE_WORDS[kind]}, got {value!r} ({type(value).__name__}); "
                          f"e.g. {example}")


# ---- ordering and references


def resolve_campaign(recipes: Iterable[Recipe]) -> list[Recipe]:
    """The recipes with their references to each other filled in (random pruning matched to an
    InfoBatch recipe) and `after` set accordingly; names must be unique."""
    recipes = list(recipes)
    names = [r.name for r in recipes]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise RecipeError(f"each recipe may appear once; repeated: {', '.join(dup)} (give a different name)")
    out = []
    for recipe in recipes:
        specs, after = [], list(recipe.after)
        for spec in recipe.components:
            comp = _find_component(spec.name, recipe.name)
            if comp.resolve is not None:
                kwargs, reads = comp.resolve(spec.args, recipe, recipes)
                spec = replace(spec, kwargs=tuple(kwargs.items()))
                after += [a for a in reads if a not in after]
            specs.append(spec)
        out.append(replace(recipe, components=tuple(specs), after=tuple(after)))
    return out


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


# ------------------------------------------------------------------------------------------ budgets

# `--budget` names -> the progress clock's units (`effilab.core.budget.UNITS`).
BUDGET_UNITS = {"samples": "samples", "steps": "steps", "flops": "flops", "time": "seconds"}
REFERENCE = "baseline"  # the recipe whose full-epoch spend is the campaign's budget
MATCHED = "baseline@"  # prefix of a budget-matched baseline's name
# The units a budget-matched baseline is matched in, in this order of preference (after the campaign's own
# budget unit). Wall-clock is not one: on a shared machine it is too noisy to say what a technique saved.
MATCH_UNITS = ("samples", "flops", "steps")
SAVES_BELOW = 0.995  # a technique saved in a unit where it spent less than 99.5% of the baseline's


class NothingToMatch(Exception):
    """A budget-matched baseline whose technique saved nothing against the baseline: not run."""


def check_budget_unit(unit, option: str = "--budget") -> str | None:
    """`unit` if it is a bench budget (`BUDGET_UNITS`) or None, else a `RecipeError` naming the units."""
    if unit is None:
        return None
    if not isinstance(unit, str) or unit not in BUDGET_UNITS:
        raise RecipeError(f"unknown budget unit {unit!r} for {option}: use one of {', '.join(BUDGET_UNITS)} "
                          "(leave --budget out to compare at equal epochs)")
    return unit


def reinvest(unit: str | None = None) -> None:
    """Re-invested savings: the recipe trains until it has spent the baseline's whole budget, so what its
    techniques save buys more epochs (e.g. `infobatch+reinvest`: the samples InfoBatch skips are trained
    on later).

    The budget is the baseline recipe's measured spend at the campaign's epochs, in `unit` (samples,
    steps, flops or time; default: the campaign's `--budget`, else samples), driving the fit's
    one-cycle schedule through `effilab.budget.Budget` so that it ends decayed on the budget. Needs a
    recipe named `baseline` in the campaign (it runs first). Saves nothing: it spends what the technique
    saved on more training."""
    check_budget_unit(unit, "reinvest(unit=...)")


def spent_in(record, unit: str) -> float | None:
    """What a stored run spent in bench budget unit `unit` (None: not measured)."""
    value = {"samples": "samples", "steps": "steps", "flops": "flops", "time": "train_s"}[unit]
    value = getattr(record, value, None)
    return None if value is None else float(value)


def saved_unit(run, baseline, prefer: str | None = None) -> str | None:
    """The unit in which `run` spent less than `baseline` (by `SAVES_BELOW`): `prefer` if it did there,
    else the first of `MATCH_UNITS`; None if it saved nothing. A run that spent more training FLOPs than
    the baseline saved nothing, whatever it forwarded less of (SAM on a time budget: fewer samples, each
    twice the work)."""
    mine, full = spent_in(run, "flops"), spent_in(baseline, "flops")
    if mine is not None and full and mine * SAVES_BELOW > full:
        return None
    for unit in ([prefer] if prefer in MATCH_UNITS else []) + list(MATCH_UNITS):
        mine, full = spent_in(run, unit), spent_in(baseline, unit)
        if mine is not None and full and mine < SAVES_BELOW * full:
            return unit
    return None


@dataclass(frozen=True)
class BudgetPlan:
    """The budget one run trains on: `amount` of `unit` (a bench unit; `clock_unit` is the progress clock's),
    within at most `epochs` epochs (an upper bound: the budget ends the fit), and why (`kind`: "equal"
    under --budget, "reinvest", or "matched" to recipe `matched_to`)."""

    unit: str
    amount: float
    epochs: int
    kind: str
    matched_to: str | None = None

    @property
    def clock_unit(self) -> str:
        return BUDGET_UNITS[self.unit]

    def to_dict(self) -> dict:
        return {"unit": self.unit, "amount": self.amount, "epochs": self.epochs, "kind": self.kind,
                "matched_to": self.matched_to}


def _peer(ctx: RunContext, name: str, why: str):
    ref = ctx.peers.get(name)
    if ref is None:
        raise RuntimeError(f"{why} reads the run of recipe {name!r} with seed {ctx.seed}, which did not finish")
    return ref


def budget_plan(recipe: Recipe, ctx: RunContext, min_fraction: float = 0.5) -> BudgetPlan | None:
    """The budget a run of `recipe` trains on, or None (the campaign's epochs, as without budgets).

    The baseline recipe never has one: its full-epoch spend is the budget of the others. Under
    `--budget UNIT` (`ctx.options["budget"]`) and with `reinvest`, a recipe gets the baseline's spend of
    the same seed; a budget-matched baseline (`recipe.matches`) gets exactly what its technique's run of
    the same seed spent, in the unit where that saved (`saved_unit`; `NothingToMatch` if it saved
    nothing). The epoch bound holds the budget even if a technique forwards only `min_fraction` of each
    epoch (the baseline's spend per epoch is the measure)."""
    mode = ctx.options.get("budget")
    if recipe.name == REFERENCE:
        return None
    if recipe.matches:
        if recipe.matches not in ctx.peers:  # the technique's run failed (FP8 refused on a CPU): nothing to match
            raise NothingToMatch(f"{recipe.matches} did not finish with seed {ctx.seed}: no spend to match")
        run = _peer(ctx, recipe.matches, f"the budget-matched baseline {recipe.name!r}")
        base = _peer(ctx, REFERENCE, f"the budget-matched baseline {recipe.name!r}")
        unit = saved_unit(run, base, mode)
        if unit is None:
            raise NothingToMatch(f"{recipe.matches} saved nothing against the baseline (samples, FLOPs, steps)")
        amount, kind = spent_in(run, unit), "matched"
    elif mode is not None or recipe.reinvests:
        spec = next((s for s in recipe.components if s.key == "reinvest"), None)
        unit = (spec.args.get("unit") if spec is not None else None) or mode or "samples"
        base = _peer(ctx, REFERENCE, f"recipe {recipe.name!r} (budget: the baseline's spend)")
        amount, kind = spent_in(base, unit), "reinvest" if spec is not None else "equal"
        if amount is None:
            raise RuntimeError(f"the baseline's run of seed {ctx.seed} has no {unit} measured: choose another "
                               "budget unit")
    else:
        return None
    per_epoch = (spent_in(base, unit) or 0.0) / max(int(getattr(base, "epochs_run", 0) or ctx.epochs), 1)
    epochs = ctx.epochs if per_epoch <= 0 else max(1, math.ceil(amount / (per_epoch * min_fraction)))
    return BudgetPlan(unit, float(amount), epochs, kind, recipe.matches or None)


def add_matched_baselines(recipes: Sequence[Recipe], budget: str | None = None, matched: bool = True) -> list[Recipe]:
    """`recipes` with a budget-matched baseline `baseline@<name>` right after each recipe but the baseline,
    the re-invested ones and those already matched: the baseline recipe's components, run after both
    (same seed) with the technique's measured spend as its budget. The recipes given the baseline's spend
    (all under `budget`, those with `reinvest`) run after it. Without a baseline recipe: unchanged;
    `matched=False`: no matched baselines."""
    base = next((r for r in recipes if r.name == REFERENCE), None)
    if base is None:
        return list(recipes)
    names = {r.name for r in recipes}
    out: list[Recipe] = []
    for recipe in recipes:
        if recipe is not base and (budget is not None or recipe.reinvests) and REFERENCE not in recipe.after:
            recipe = replace(recipe, after=(*recipe.after, REFERENCE))
        out.append(recipe)
        name = MATCHED + recipe.name
        if not matched or recipe is base or recipe.matches or recipe.reinvests or name in names:
            continue
        out.append(Recipe(name, base.callbacks, f"the baseline given {recipe.name}'s measured spend, its schedule "
                          "decayed to the end", after=(recipe.name, REFERENCE), components=base.components,
                          matches=recipe.name))
    return out


def check_budgets(recipes: Sequence[Recipe], budget: str | None, epochs: int, n_train: int, bs: int,
                  drop_last: bool = True) -> None:
    """Before any training, a `RecipeError` for budgets that cannot hold: a comparison at equal spend
    (`budget`, `reinvest`, matched baselines) without a baseline recipe, a recipe with its own `budget(...)`
    component as well, or a `budget(amount, unit)` component that the campaign's `epochs` cannot spend."""
    check_budget_unit(budget)
    names = {r.name for r in recipes}
    for recipe in recipes:
        own = [s for s in recipe.components if s.key == "budget"]
        needs_base = budget is not None or recipe.reinvests or recipe.matches
        if needs_base and REFERENCE not in names and recipe.name != REFERENCE:
            what = f"--budget {budget}" if budget is not None else f"recipe {recipe.name!r}"
            raise RecipeError(f"{what} compares at the baseline's spend: add the recipe {REFERENCE!r} "
                              f"(--recipe {REFERENCE})")
        if own and (budget is not None or recipe.reinvests):
            what = f"--budget {budget}" if budget is not None else "reinvest"
            raise RecipeError(f"recipe {recipe.name!r} has its own budget(...) and {what} gives it the baseline's: "
                              "keep one of them")
        for spec in own:
            unit, amount = spec.args.get("unit", "samples"), spec.args.get("amount")
            if unit not in ("samples", "steps") or not isinstance(amount, (int, float)):
                continue
            steps = n_train // bs if drop_last else math.ceil(n_train / bs)
            per_epoch = steps if unit == "steps" else (steps * bs if drop_last else n_train)
            if per_epoch * epochs < amount:
                need = math.ceil(amount / per_epoch)
                raise RecipeError(f"recipe {recipe.name!r}: {spec} cannot be spent in {epochs} epochs of "
                                  f"{per_epoch:,} {unit}: give --epochs {need} or more (the budget ends the fit), "
                                  "or a smaller amount")


# ------------------------------------------------------------------------------------------ built-ins


def _has_infobatch(recipe: Recipe) -> bool:
    return any(s.key == "infobatch" for s in recipe.components)


def _random_prune_resolve(kwargs: dict, recipe: Recipe, campaign: Sequence[Recipe]):
    """Random pruning without a `fraction` forwards as many samples as an InfoBatch recipe of the
    campaign: `match` names it, else the recipe called "infobatch", else the only one with InfoBatch."""
    if "fraction" in kwargs:
        if kwargs.get("match") is not None:
            raise RecipeError(f"recipe {recipe.name!r}: random_prune takes fraction or match, not both")
        return kwargs, ()
    names = [r.name for r in campaign if r.name != recipe.name]
    match = kwargs.get("match")
    if match is not None:
        if match not in names:
            raise RecipeError(f"recipe {recipe.name!r}: random_prune(match={match!r}) names no other recipe "
                              f"of this campaign; recipes: {', '.join(names) or '(none)'}")
        return kwargs, (match,)
    with_ib = [r.name for r in campaign if r.name != recipe.name and _has_infobatch(r)]
    if "infobatch" in with_ib:
        ref = "infobatch"
    elif len(with_ib) == 1:
        ref = with_ib[0]
    elif with_ib:
        raise RecipeError(f"recipe {recipe.name!r}: random_prune matches the samples of an InfoBatch recipe, "
                          f"and this campaign has several ({', '.join(with_ib)}): say which with "
                          f"random_prune(match='...'), or give fraction=...")
    else:
        return kwargs, ()  # nothing to match: the campaign's --fraction
    return {**kwargs, "match": ref}, (ref,)


def _reference_delta(ref) -> float | None:
    for key, notes in (ref.params or {}).items():
        if key.split("#")[0] == "infobatch" and isinstance(notes, Mapping) and "delta" in notes:
            return notes["delta"]
    return None


def _random_prune_build(ctx: RunContext | None, kwargs: dict):
    from ..data.infobatch import RandomPrune

    match = kwargs.pop("match", None)
    seed = kwargs.pop("seed", 0 if ctx is None else ctx.seed)
    delta = kwargs.get("delta")
    if ctx is None or match is None or "fraction" in kwargs:
        fraction = kwargs.get("fraction", DEFAULT_FRACTION if ctx is None else
                              float(ctx.options.get("fraction", DEFAULT_FRACTION)))
        delta = 0.875 if delta is None else delta
        notes = {"fraction": fraction, "delta": delta, "seed": seed, "matched_to": None}
    else:
        ref = ctx.peers.get(match)
        if ref is None:
            raise RuntimeError(f"random_prune matches the samples of recipe {match!r}, whose run with seed "
                               f"{ctx.seed} did not finish")
        delta = (_reference_delta(ref) or 0.875) if delta is None else delta
        target = ref.samples
        ran = len(ref.history) or ref.epochs
        if ran < ctx.epochs:  # the reference stopped at its target accuracy: match its rate of samples
            target = round(ref.samples * ctx.epochs / ran)
        fraction = random_prune_fraction(target, ctx.n_train, ctx.epochs, delta, ctx.bs, ctx.drop_last)
        notes = {"fraction": fraction, "delta": delta, "seed": seed, "matched_to": match,
                 "target_samples": target}
    return RandomPrune(fraction=fraction, delta=delta, seed=seed), notes


register_component("baseline", None, "no callback: full data every epoch", "baseline")
register_component("infobatch", "effilab.data.infobatch:InfoBatch",
                   "InfoBatch (Qin et al., ICLR 2024): prune well-learned samples, rescale the rest", "data")
register_component("random_prune", "effilab.data.infobatch:RandomPrune",
                   "random pruning; without fraction=, forwards as many samples as the campaign's InfoBatch "
                   f"recipe (match='recipe name' to choose; --fraction, default {DEFAULT_FRACTION}, if none)",
                   "data", build=_random_prune_build, extra=("match",), resolve=_random_prune_resolve)

register_component("mixup", "effilab.bench.regularisation:mixup",
                   "fastai's MixUp (Zhang et al. 2018): convex combinations of sample pairs", "data",
                   inputs=("flat", "image"))
register_component("cutmix", "effilab.bench.regularisation:cutmix",
                   "fastai's CutMix (Yun et al. 2019): a box of one image pasted into another", "data",
                   inputs=("image",))
register_component("reinvest", "effilab.bench.recipes:reinvest",
                   "train on the baseline's whole budget: what the recipe saves buys more epochs", "budget")
register_component("label_smoothing", "effilab.bench.regularisation:label_smoothing",
                   "fastai's LabelSmoothingCrossEntropyFlat(eps) as the training loss", "data")

for _name, _text, _description in (
        ("baseline", "baseline", "full data every epoch"),
        ("infobatch", "infobatch", "InfoBatch(ratio=0.5, delta=0.875)"),
        ("random-prune", "random-prune", "random pruning forwarding as many samples as the same seed's "
                                         f"InfoBatch run (fraction {DEFAULT_FRACTION} without one)")):
    register(Recipe(_name, description=_description, components=parse_components(_text)))

# Presets that combine techniques, run by name (`--recipe fast`).
for _name, _text, _description in (
        ("fast", "infobatch+linear_decay",
         "InfoBatch's pruning with a learning rate decayed linearly to zero over the fit (Li et al. 2020)"),
        ("fast-reinvest", "infobatch+linear_decay+reinvest",
         "fast, trained until it has spent the baseline's budget: the skipped samples buy more epochs")):
    register(Recipe(_name, description=_description, components=parse_components(_text)))

DEFAULT_RECIPES = ("baseline", "infobatch", "random-prune")
