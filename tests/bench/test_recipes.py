"""Recipes: the text syntax, components from the technique registry, references between recipes, TOML
campaign files, and random pruning's matched fraction."""

import inspect
import math

import numpy as np
import pytest

from effilab.bench import recipes as R
from effilab.core.infobatch import random_plan
from effilab.registry import all_techniques


def _ctx(seed=3, **kw):
    return R.RunContext(task=None, seed=seed, epochs=8, bs=100, lr=1e-2, n_train=1000, **kw)


# ------------------------------------------------------------------------------------------ syntax


@pytest.mark.parametrize("text, expected", [
    ("baseline", [("baseline", {})]),
    ("infobatch(ratio=0.3)", [("infobatch", {"ratio": 0.3})]),
    (" infobatch( ratio = 0.3 , delta=0.75 ) + dashboard ", [("infobatch", {"ratio": 0.3, "delta": 0.75}),
                                                             ("dashboard", {})]),
    ("random-prune(fraction=2e-1)+system_monitor(every_s=1)", [("random-prune", {"fraction": 0.2}),
                                                               ("system_monitor", {"every_s": 1})]),
    # literals of every kind, and '+' inside a string or a number is not a separator
    ("dashboard(mode='a+b')+x(v=(1, -2.5), w=[True, None], d={'k': 1e+3})",
     [("dashboard", {"mode": "a+b"}), ("x", {"v": (1, -2.5), "w": [True, None], "d": {"k": 1000.0}})]),
])
def test_parse_components(text, expected):
    specs = R.parse_components(text)
    assert [(s.name, s.args) for s in specs] == expected


def test_spec_text_round_trips():
    specs = R.parse_components("infobatch(ratio=0.3, delta=0.75)+random-prune(match='ib')")
    assert [str(s) for s in specs] == ["infobatch(ratio=0.3, delta=0.75)", "random-prune(match='ib')"]
    assert R.parse_components("+".join(map(str, specs))) == specs
    assert specs[1].key == "random_prune"


@pytest.mark.parametrize("text, message", [
    ("", "empty recipe"),
    ("infobatch(0.3)", "arguments must be key=value"),
    ("infobatch(**{'ratio': 0.3})", "arguments must be key=value"),
    ("infobatch(ratio=__import__('os').getcwd())", "must be a literal"),
    ("infobatch(ratio=x)", "must be a literal"),
    ("infobatch(ratio=0.3", "unclosed parenthesis"),
    ("infobatch(ratio=0.3))", "unbalanced ')'"),
    ("infobatch(ratio=0.3, ratio=0.4)", "'ratio' given twice"),
    ("infobatch++dashboard", "cannot read component ''"),
    ("info batch", "cannot read component 'info batch'"),
    ("dashboard(mode='live)", "unclosed string"),
])
def test_parse_rejects_bad_syntax(text, message):
    with pytest.raises(R.RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        R.parse_components(text)


def test_parse_never_evaluates(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(R.RecipeError):
        R.parse_recipe("infobatch(ratio=open('pwned', 'w'))")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("text, message", [
    ("nosuch", "unknown component 'nosuch'; components: activation_checkpointing, autocast, baseline, "),
    ("infobatch+dashbord", "unknown component 'dashbord' in recipe 'infobatch+dashbord'; components: "),
    ("infobatch(ratoi=0.3)", "does not accept 'ratoi'; it accepts: ratio, delta, momentum, seed"),
    ("baseline(x=1)", "'baseline' in recipe 'baseline(x=1)' does not accept 'x'; it accepts: no arguments"),
    ("infobatch(ratio=2)", "ValueError: ratio must be in [0, 1)"),
    ("dashboard(mode='sideways')", "dashboard(mode='sideways')"),
])
def test_parse_recipe_checks_names_arguments_and_values(text, message):
    with pytest.raises(R.RecipeError) as e:
        R.parse_recipe(text)
    assert message in str(e.value)


def test_get_recipe_unknown_name_lists_recipes_and_components():
    with pytest.raises(R.RecipeError) as e:
        R.get_recipe("nosuch")
    msg = str(e.value)
    assert msg.startswith("unknown recipe 'nosuch'; valid recipes: baseline, infobatch, random-prune, fast, "
                          "fast-reinvest; or "
                          "components")
    for name in all_techniques():
        assert name in msg


def test_recipe_name_is_the_text_as_given():
    r = R.parse_recipe("  infobatch(ratio=0.3)+dashboard ")
    assert r.name == "infobatch(ratio=0.3)+dashboard"
    assert r.text == "infobatch(ratio=0.3)+dashboard"
    assert R.parse_recipe("infobatch(ratio=0.3)", name="ib30").name == "ib30"
    assert R.get_recipe("baseline") is R.RECIPES["baseline"]


# ------------------------------------------------------------------------------------------ components


def test_every_registered_technique_is_a_component():
    comps = R.components()
    techniques = all_techniques()
    assert {"dashboard", "system_monitor", "fit_recorder", "infobatch", "random_prune"} <= set(techniques)
    for name in techniques:
        assert name in comps, name
        if comps[name].required():  # e.g. budget(amount): refused by name without it
            with pytest.raises(R.RecipeError, match=f"needs {comps[name].required()[0]}"):
                R.parse_recipe(name)
            continue
        (cb,) = R.parse_recipe(name).make_callbacks(_ctx())
        assert type(cb).__name__ != "function"


def test_technique_components_use_the_class_with_the_users_arguments():
    # The registry's `make()` builds test-friendly settings (InfoBatch delta 0.75, seed 0): not used.
    recipe = R.parse_recipe("infobatch(ratio=0.3)+dashboard(max_per_s=5.0)+system-monitor(every_s=2)")
    (ib, dash, mon) = recipe.make_callbacks(_ctx(seed=7))
    assert (type(ib).__name__, ib.ratio, ib.delta, ib.seed) == ("InfoBatch", 0.3, 0.875, 7)  # the run's seed
    assert (type(dash).__name__, dash.max_per_s) == ("Dashboard", 5.0)
    assert (type(mon).__name__, mon.every_s) == ("SystemMonitor", 2)
    (ib,) = R.parse_recipe("infobatch(seed=11)").make_callbacks(_ctx(seed=7))
    assert ib.seed == 11


def test_notes_record_each_components_arguments():
    ctx = _ctx()
    R.parse_recipe("infobatch(ratio=0.3)+dashboard").make_callbacks(ctx)
    assert ctx.notes["infobatch"] == {"ratio": 0.3, "delta": 0.875, "momentum": None, "seed": 3}
    from effilab.viz.dashboard import Dashboard

    default = inspect.signature(Dashboard).parameters["max_per_s"].default  # the class's own default
    assert ctx.notes["dashboard"]["max_per_s"] == default


def test_register_component_and_duplicates():
    from fastai.callback.core import Callback

    class Probe(Callback):
        def __init__(self, level: int = 1, seed: int | None = None):
            self.level, self.seed = level, seed

    try:
        R.register_component("probe-test", Probe, "a test probe")
        with pytest.raises(ValueError, match="already registered"):
            R.register_component("probe_test", Probe)
        (cb,) = R.parse_recipe("probe-test(level=3)").make_callbacks(_ctx(seed=5))
        assert (cb.level, cb.seed) == (3, 5)
        with pytest.raises(R.RecipeError, match="it accepts: level, seed"):
            R.parse_recipe("probe_test(lvl=3)")
    finally:
        R.COMPONENTS.pop("probe_test", None)
    with pytest.raises(ValueError, match="already registered"):
        R.register(R.RECIPES["baseline"])


# ------------------------------------------------------------------------------------------ references


def _names(recipes):
    return [(r.name, r.after, [str(s) for s in r.components]) for r in recipes]


def test_random_prune_matches_the_campaigns_infobatch_recipe():
    base, ib, rp = (R.get_recipe(n) for n in ("baseline", "infobatch", "random-prune"))
    resolved = R.resolve_campaign([rp, base, ib])
    assert _names(resolved)[0] == ("random-prune", ("infobatch",), ["random-prune(match='infobatch')"])
    assert [r.name for r in R.run_order(resolved)] == ["baseline", "infobatch", "random-prune"]
    # The only InfoBatch recipe, whatever its name; none: no reference (the campaign's fraction).
    ib30 = R.parse_recipe("infobatch(ratio=0.3)+dashboard")
    assert R.resolve_campaign([rp, ib30])[0].after == ("infobatch(ratio=0.3)+dashboard",)
    assert R.resolve_campaign([rp, base])[0].after == ()
    # Several: say which.
    ib30x, ib70 = R.parse_recipe("infobatch(ratio=0.3)"), R.parse_recipe("infobatch(ratio=0.7)")
    with pytest.raises(R.RecipeError, match=r"several \(infobatch\(ratio=0.3\), infobatch\(ratio=0.7\)\)"):
        R.resolve_campaign([rp, ib30x, ib70])
    chosen = R.resolve_campaign([R.parse_recipe("random-prune(match='infobatch(ratio=0.7)')"), ib30x, ib70])
    assert chosen[0].after == ("infobatch(ratio=0.7)",)
    with pytest.raises(R.RecipeError, match="names no other recipe of this campaign; recipes: baseline"):
        R.resolve_campaign([R.parse_recipe("random-prune(match='ib')"), base])
    with pytest.raises(R.RecipeError, match="fraction or match, not both"):
        R.resolve_campaign([R.parse_recipe("random-prune(fraction=0.2, match='infobatch')"), ib])
    assert R.resolve_campaign([R.parse_recipe("random-prune(fraction=0.2)"), ib])[0].after == ()
    with pytest.raises(R.RecipeError, match="repeated: baseline"):
        R.resolve_campaign([base, base])


def test_run_order_cycles():
    a, b = R.Recipe("a", after=("b",)), R.Recipe("b", after=("a",))
    with pytest.raises(ValueError, match="cycle"):
        R.run_order([a, b])


def test_random_prune_fraction_from_the_matched_run():
    class Ref:
        samples, params, history, epochs = 6000, {"infobatch": {"delta": 0.75}}, [{}] * 8, 8

    rp = R.resolve_campaign([R.get_recipe("random-prune"), R.get_recipe("infobatch")])[0]
    ctx = _ctx(peers={"infobatch": Ref})
    (cb,) = rp.make_callbacks(ctx)
    assert cb.delta == 0.75 and cb.seed == 3
    assert cb.fraction == pytest.approx(R.random_prune_fraction(6000, 1000, 8, 0.75, 100))
    assert ctx.notes["random_prune"]["matched_to"] == "infobatch"
    assert ctx.notes["random_prune"]["target_samples"] == 6000
    # The reference's run of this seed failed: this run fails too, saying why.
    with pytest.raises(RuntimeError, match="whose run with seed 3 did not finish"):
        rp.make_callbacks(_ctx())
    # Nothing to match: the campaign's fraction option, else 0.3.
    alone = R.resolve_campaign([R.get_recipe("random-prune")])[0]
    (cb,) = alone.make_callbacks(_ctx(options={"fraction": 0.2}))
    assert (cb.fraction, cb.delta) == (0.2, 0.875)
    assert alone.make_callbacks(_ctx())[0].fraction == R.DEFAULT_FRACTION == 0.3


# ------------------------------------------------------------------------------------------ TOML


def test_load_recipes_file(tmp_path):
    path = tmp_path / "campaign.toml"
    path.write_text('task = "mnist1d"\nepochs = 3\nseeds = [0, 1]\nrecipes = ["baseline"]\n'
                    '[[recipe]]\nname = "ib30"\ncomponents = ["infobatch(ratio=0.3)", "dashboard"]\n'
                    '[[recipe]]\ncomponents = ["random-prune(fraction=0.2)"]\n')
    recipes, keys = R.load_recipes_file(path)
    assert [(r.name, r.text) for r in recipes] == [
        ("baseline", "baseline"), ("ib30", "infobatch(ratio=0.3)+dashboard"),
        ("random-prune(fraction=0.2)", "random-prune(fraction=0.2)")]
    assert keys == {"task": "mnist1d", "epochs": 3, "seeds": [0, 1]}


@pytest.mark.parametrize("text, message", [
    ("epochz = 3\n", "unknown key(s) epochz; valid keys: [[recipe]], recipes, task, n_samples, epochs"),
    ("[[recipe]]\nname = 'x'\n", "components must be a non-empty list of strings"),
    ("[[recipe]]\ncomponents = 'infobatch'\nratio = 0.3\n", "unknown key(s) ratio"),
    ("[[recipe]]\ncomponents = ['infobatch(ratoi=0.3)']\n", "does not accept 'ratoi'"),
    ("recipes = [1]\n", "recipes[0] must be a string"),
    ("[[recipe]\n", "not valid TOML"),
])
def test_load_recipes_file_errors(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(R.RecipeError) as e:
        R.load_recipes_file(path)
    assert message in str(e.value)
    with pytest.raises(R.RecipeError, match="cannot read recipes file"):
        R.load_recipes_file(tmp_path / "missing.toml")


# ------------------------------------------------------------------------------------------ fraction


def _random_prune_forwarded(n, fraction, epochs, delta, bs=None, seed=0):
    """What RandomPrune forwards: its own plans, batched like the training loader (drop_last)."""
    stop = math.floor(delta * epochs)
    total = 0
    for e in range(epochs):
        k = len(random_plan(n, fraction, e, seed, annealing=e >= stop))
        total += k if bs is None else (k // bs) * bs
    return total


def test_random_prune_fraction_by_hand():
    # N=1000, bs=100, E=8, delta=0.875: epochs 0..6 prune, epoch 7 is full (1000 forwarded).
    # Target 6000 -> the 7 pruning epochs share 5000 -> 714.3 each -> 7 whole batches -> keep 700.
    assert R.random_prune_fraction(6000, 1000, 8, 0.875, bs=100) == pytest.approx(0.3)
    assert _random_prune_forwarded(1000, 0.3, 8, 0.875, bs=100) == 7 * 700 + 1000
    # Without batching: 5000 / 7 = 714.29 -> keep 714.
    assert R.random_prune_fraction(6000, 1000, 8, 0.875) == pytest.approx(286 / 1000)
    # The drop_last remainder: 1050 samples, bs 100 -> a full epoch forwards 1000. Epochs 0, 1 prune
    # (delta 0.5 of 4). Target 4000 leaves 1000 per pruning epoch, a full epoch's worth: no pruning.
    assert R.random_prune_fraction(4000, 1050, 4, 0.5, bs=100) == 0.0
    # Target 3400 leaves 700 per pruning epoch: keep 700 of the 1050 (not 700 of 1000).
    assert R.random_prune_fraction(3400, 1050, 4, 0.5, bs=100) == pytest.approx((1050 - 700) / 1050)
    assert _random_prune_forwarded(1050, (1050 - 700) / 1050, 4, 0.5, bs=100) == 3400
    # delta * epochs < 1: RandomPrune never prunes.
    assert R.random_prune_fraction(500, 1000, 1, 0.875, bs=100) == 0.0


@pytest.mark.parametrize("n, epochs, delta, bs", [(1600, 4, 0.875, 64), (8000, 10, 0.875, 128),
                                                  (999, 7, 0.75, 50), (5000, 16, 0.5, None)])
def test_random_prune_fraction_matches_infobatch_like_totals(n, epochs, delta, bs):
    rng = np.random.default_rng(n + epochs)
    stop = math.floor(delta * epochs)
    full = n if bs is None else (n // bs) * bs
    for _ in range(5):
        # An InfoBatch-like run: epoch 0 full, each pruning epoch keeps 55-95%, annealing epochs full.
        kept = [n] + [int(n * rng.uniform(0.55, 0.95)) for _ in range(stop - 1)] + [n] * (epochs - stop)
        target = sum(k if bs is None else (k // bs) * bs for k in kept)
        frac = R.random_prune_fraction(target, n, epochs, delta, bs)
        assert 0.0 <= frac < 1.0
        got = _random_prune_forwarded(n, frac, epochs, delta, bs)
        tolerance = stop * (bs / 2 if bs else 0.5)
        assert abs(got - target) <= tolerance, (frac, got, target)
        assert got == full * (epochs - stop) + stop * ((n - round(frac * n)) // (bs or 1)) * (bs or 1)
