"""The bench at equal spend: budgets per run (`--budget`, `reinvest`, budget-matched baselines), what they
are given, the paired test against the matched baseline, the Pareto picture, training FLOPs, and the
errors before any training."""

import math
import re
from types import SimpleNamespace

import pytest

from effilab import bench
from effilab.bench import recipes as R
from effilab.bench.report import matched_verdicts, pareto_figure, pareto_front, report_html
from effilab.bench.table import matched_text, paired_test

from .test_bench import _main, _private_cache, _results, _table  # noqa: F401  (an autouse fixture)


def _rec(samples, steps, flops, train_s=10.0, epochs_run=4):
    return SimpleNamespace(samples=samples, steps=steps, flops=flops, train_s=train_s, epochs_run=epochs_run)


def _ctx(peers, budget=None, epochs=4):
    return R.RunContext(task=None, seed=0, epochs=epochs, bs=10, lr=1e-2, n_train=1000, peers=peers,
                        options={} if budget is None else {"budget": budget})


BASE = _rec(4000, 400, 8e9)


# ------------------------------------------------------------------------------------------ what each run is given


def test_matched_baseline_gets_the_techniques_spend_in_the_unit_it_saved():
    recipes = R.add_matched_baselines([R.get_recipe("baseline"), R.get_recipe("infobatch")])
    matched = recipes[-1]
    assert (matched.name, matched.matches, matched.after) == ("baseline@infobatch", "infobatch",
                                                               ("infobatch", "baseline"))
    ib = _rec(2900, 290, 5.8e9)
    plan = R.budget_plan(matched, _ctx({"baseline": BASE, "infobatch": ib}))
    assert (plan.unit, plan.amount, plan.kind, plan.matched_to, plan.clock_unit) == (
        "samples", 2900, "matched", "infobatch", "samples")
    # The epoch bound holds the budget at half the baseline's samples per epoch: 2900 / (1000 * 0.5).
    assert plan.epochs == math.ceil(2900 / 500)
    # Under --budget flops the budget's unit comes first where the technique saved in it.
    assert R.budget_plan(matched, _ctx({"baseline": BASE, "infobatch": ib}, "flops")).amount == 5.8e9
    # Fewer steps only (a growing batch): matched in steps.
    grow = _rec(4000, 300, 8e9)
    assert R.budget_plan(matched, _ctx({"baseline": BASE, "infobatch": grow})).unit == "steps"
    # Nothing saved (within 0.5%), or fewer samples for more FLOPs (SAM on a time budget): not run.
    for run in (_rec(3990, 399, 7.99e9), _rec(2400, 240, 9.6e9)):
        with pytest.raises(R.NothingToMatch, match="infobatch saved nothing against the baseline"):
            R.budget_plan(matched, _ctx({"baseline": BASE, "infobatch": run}))
    # The technique's run failed (FP8 refused on a CPU): its matched baseline is skipped, not failed.
    with pytest.raises(R.NothingToMatch, match="infobatch did not finish with seed 0: no spend to match"):
        R.budget_plan(matched, _ctx({"baseline": BASE}))
    with pytest.raises(RuntimeError, match="run of recipe 'baseline' with seed 0, which did not finish"):
        R.budget_plan(matched, _ctx({"infobatch": ib}))


def test_equal_spend_and_reinvest_get_the_baselines_full_spend():
    base, ib = R.get_recipe("baseline"), R.get_recipe("infobatch")
    assert R.budget_plan(base, _ctx({}, "samples")) is None  # the baseline defines the budget
    assert R.budget_plan(ib, _ctx({"baseline": BASE})) is None  # equal epochs: no budget
    for unit, amount in (("samples", 4000), ("steps", 400), ("flops", 8e9), ("time", 10.0)):
        plan = R.budget_plan(ib, _ctx({"baseline": BASE}, unit))
        assert (plan.unit, plan.amount, plan.kind) == (unit, amount, "equal")
        assert plan.epochs == 8  # 4 epochs of the baseline, at half its spend per epoch
    assert R.budget_plan(ib, _ctx({"baseline": BASE}, "time")).clock_unit == "seconds"
    again = R.budget_plan(R.get_recipe("infobatch+reinvest"), _ctx({"baseline": BASE}))
    assert (again.unit, again.amount, again.kind) == ("samples", 4000, "reinvest")
    steps = R.budget_plan(R.get_recipe("infobatch+reinvest(unit='steps')"), _ctx({"baseline": BASE}, "flops"))
    assert (steps.unit, steps.amount) == ("steps", 400)  # the component's unit wins


def test_campaign_order_matched_names_and_presets():
    names = lambda rs: [(r.name, r.after) for r in rs]
    given = [R.get_recipe(t) for t in ("baseline", "infobatch", "random-prune", "fast-reinvest")]
    recipes = R.add_matched_baselines(given)
    assert names(recipes) == [
        ("baseline", ()), ("infobatch", ()), ("baseline@infobatch", ("infobatch", "baseline")),
        ("random-prune", ()), ("baseline@random-prune", ("random-prune", "baseline")),
        ("fast-reinvest", ("baseline",))]  # a re-invested recipe spends the full budget: no matched baseline
    assert [r.name for r in R.run_order(R.resolve_campaign(recipes))][:3] == ["baseline", "infobatch",
                                                                               "baseline@infobatch"]
    under_budget = R.add_matched_baselines(given[:2], "samples")
    assert under_budget[1].after == ("baseline",) and under_budget[2].name == "baseline@infobatch"
    assert R.add_matched_baselines(given[1:3]) == given[1:3]  # no baseline: nothing to match
    assert len(R.add_matched_baselines(given, matched=False)) == 4
    assert [str(c) for c in R.get_recipe("fast").components] == ["infobatch", "linear_decay"]
    assert R.get_recipe("fast-reinvest").reinvests


@pytest.mark.parametrize("recipes, budget, epochs, message", [
    (["infobatch"], "samples", 4, "--budget samples compares at the baseline's spend: add the recipe 'baseline'"),
    (["infobatch+reinvest"], None, 4, "recipe 'infobatch+reinvest' compares at the baseline's spend"),
    (["baseline", "budget(amount=100)"], "samples", 4, "has its own budget(...) and --budget samples"),
    (["baseline", "budget(amount=100)+reinvest"], None, 4, "has its own budget(...) and reinvest"),
    (["baseline", "budget(amount=5000)"], None, 4,
     "budget(amount=5000) cannot be spent in 4 epochs of 1,000 samples: give --epochs 5 or more"),
    (["baseline", "budget(amount=500, unit='steps')"], None, 4, "give --epochs 5 or more"),
    (["baseline"], "joules", 4, "unknown budget unit 'joules' for --budget: use one of samples, steps, flops, time"),
])
def test_budgets_that_cannot_hold_are_refused(recipes, budget, epochs, message):
    with pytest.raises(R.RecipeError, match=re.escape(message)):
        R.check_budgets([R.get_recipe(r) for r in recipes], budget, epochs, n_train=1000, bs=10)
    with pytest.raises(R.RecipeError, match="unknown budget unit 'hours' for reinvest"):
        R.get_recipe("infobatch+reinvest(unit='hours')")


@pytest.mark.parametrize("args, message", [
    (["--budget", "joules"], "unknown budget unit 'joules' for --budget: use one of samples, steps, flops, time"),
    (["--budget", "samples", "--recipe", "infobatch"], "add the recipe 'baseline'"),
    (["--recipe", "baseline", "--recipe", "budget(amount=100000)"],
     "cannot be spent in 4 epochs of 1,600 samples: give --epochs 63 or more"),
    (["--budget", "steps", "--recipe", "baseline", "--recipe", "budget(amount=100)"], "keep one of them"),
])
def test_cli_bad_budgets_exit_2_before_training(args, message, tmp_path, capsys):
    rc, out, err = _main(capsys, "--quick", "--out", str(tmp_path / "out"), *args)
    assert rc == 2, (out, err)
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ the paired test


def test_paired_test_and_its_cell():
    scipy_stats = pytest.importorskip("scipy.stats")
    diffs = [0.010, 0.020, 0.015]
    t = paired_test(diffs)
    assert t["p"] == pytest.approx(scipy_stats.ttest_1samp(diffs, 0.0).pvalue)
    assert (t["n"], t["verdict"], t["test"]) == (3, "beat", "paired t-test") and t["p"] < 0.05
    assert paired_test([-0.03, -0.031, -0.029])["verdict"] == "lost"
    assert paired_test([0.01, -0.02, 0.005])["verdict"] == "no clear difference"
    assert paired_test([0.02])["verdict"] == "n/a" and paired_test([0.02])["p"] is None
    two = paired_test([-0.0032, -0.0033])  # two near-equal differences: a tiny p, and no verdict from it
    assert two["p"] < 1e-2 and two["verdict"] == "too few seeds"
    assert matched_text({"against": "b@x", **two}).endswith("(n=2): too few seeds for a verdict (>= 3)")
    cell = matched_text({"against": "baseline@ib", **t})
    assert cell == f"+1.50 pts, p={t['p']:.2g} (n=3): beat baseline@ib"
    assert matched_text({"against": "baseline@ib", **paired_test([-0.01])}) == "-1.00 pts (n=1): n/a (1 seed)"


def test_exact_sign_flip_test_without_scipy(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_scipy(name, *args, **kwargs):
        if name.startswith("scipy"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    t = paired_test([0.01, 0.02, 0.015, 0.03, 0.012, 0.02])
    # All six positive: only the all-plus and all-minus sign patterns are as extreme, 2 of 64.
    assert (t["test"], t["p"], t["verdict"]) == ("sign-flip permutation test", 2 / 64, "beat")
    assert paired_test([0.01, 0.02, 0.015, 0.03, 0.012])["verdict"] == "no clear difference"  # 2/32 > 0.05
    assert paired_test([0.01, -0.02, 0.015])["p"] == 1.0  # the observed sum, 0.005, is the smallest there is


def test_pareto_front_keeps_what_nothing_cheaper_beats():
    assert pareto_front([(3, 90), (1, 80), (2, 79), (2, 85), (4, 89)]) == [(1, 80), (2, 85), (3, 90)]


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def reinvested():
    """Equal epochs, two seeds: the baseline, InfoBatch, its matched baseline and InfoBatch re-invested."""
    return bench.run("mnist1d", ["baseline", "infobatch", "infobatch+reinvest"], seeds=[0, 1], epochs=3, bs=64,
                     task_kwargs={"n_samples": 1000}, progress=None, threads=1, matched=True)


def test_reinvested_savings_buy_more_epochs_and_the_matched_baseline_is_paired(reinvested):
    c = reinvested
    assert c.recipes == ["baseline", "infobatch", "baseline@infobatch", "infobatch+reinvest"]
    assert c.config["matched"] is True
    for seed in (0, 1):
        runs = {r.recipe: r for r in c if r.seed == seed}
        base, ib, again = runs["baseline"], runs["infobatch"], runs["infobatch+reinvest"]
        assert ib.samples < base.samples and ib.epochs_run == 3
        # Re-invested: the baseline's samples (whole batches, the budget ends the fit on them), in more epochs.
        assert again.params["budget"] | {"epochs": None} == {
            "unit": "samples", "amount": base.samples, "epochs": None, "kind": "reinvest", "matched_to": None,
            "spent": base.samples, "progress": 1.0, "stopped_by_budget": True}
        assert again.samples == base.samples and again.epochs_run > 3
        assert runs["baseline@infobatch"].samples == ib.samples
    row = next(r for r in c.summary if r["recipe"] == "infobatch")
    m = row["matched"]
    diffs = [r.accuracy - o.accuracy for r in c if r.recipe == "infobatch"
             for o in c if o.recipe == "baseline@infobatch" and o.seed == r.seed]
    assert (m["against"], m["n"], m["seeds"]) == ("baseline@infobatch", 2, [0, 1])
    assert m["mean"] == pytest.approx(sum(diffs) / 2)
    assert matched_text(m) in c.table
    assert next(r for r in c.summary if r["recipe"] == "infobatch+reinvest")["matched"] is None
    data = c.to_dict()
    assert matched_verdicts(data) == [("infobatch", f"infobatch: {matched_text(m)}")]
    assert "Against the budget-matched baseline" in report_html(data)
    fig = pareto_figure(data)
    joined = [t for t in fig.data if t.name == "infobatch vs baseline@infobatch"]
    assert len(joined) == 1 and len(joined[0].x) == 2
    front = next(t for t in fig.data if t.name == "Pareto front (means)")
    means = {t.name: (t.x[0], t.y[0]) for t in fig.data if t.name in c.recipes}
    assert list(zip(front.x, front.y)) == pareto_front(list(means.values()))


def test_cli_budget_in_steps_gives_every_recipe_the_baselines_steps(tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, err = _main(capsys, "--task", "mnist1d", "--n-samples", "1000", "--epochs", "3", "--bs", "64",
                            "--seeds", "0", "--budget", "steps", "--recipe", "baseline", "--recipe", "infobatch",
                            "--out", str(out))
    assert rc == 0, err
    data = _results(out)
    assert data["config"]["budget"] == "steps"
    runs = {r["recipe"]: r for r in data["runs"]}
    base, ib = runs["baseline"], runs["infobatch"]
    assert "budget" not in base["params"]
    assert (ib["params"]["budget"]["unit"], ib["params"]["budget"]["kind"]) == ("steps", "equal")
    assert ib["steps"] == ib["params"]["budget"]["amount"] == base["steps"] and ib["epochs_run"] > 3
    # At equal steps InfoBatch saved nothing: its matched baseline is not run, and said so.
    assert data["skipped"] == [{"recipe": "baseline@infobatch", "seed": 0,
                                "reason": "infobatch saved nothing against the baseline (samples, FLOPs, steps)"}]
    assert "[3/3] baseline@infobatch seed=0: not run: infobatch saved nothing" in stdout
    header, rows = _table(stdout)
    assert list(rows) == ["baseline", "infobatch"]
    assert "(1 not needed)" in stdout
    # Resuming the finished campaign runs nothing again, the skipped run included.
    rc, stdout, err = _main(capsys, "--resume", str(out))
    assert rc == 0, err
    assert "resuming" in stdout and "3 of 3 runs done, 0 to go" in stdout


# ------------------------------------------------------------------------------- techniques that follow the clock


def _budgeted_fit(cb, amount=2048, epochs=20):
    """A fit of at most `epochs` epochs (512 samples each) ended by a budget of `amount` samples, and the
    budget's progress at the start of each epoch that ran."""
    from effilab.budget import Budget
    from effilab.callback import telemetry_of

    from ..conftest import make_learner

    learn = make_learner([cb])
    learn.fit_one_cycle(epochs, 1e-2, cbs=Budget(amount, "samples"))
    tel = telemetry_of(learn)
    ends = [r["progress"] for r in tel.records("budget", "epoch")]
    return tel, [0.0, *ends[:-1]], ends


def test_infobatch_and_random_pruning_anneal_by_the_budgets_progress():
    from effilab.data.infobatch import InfoBatch, RandomPrune

    # 20 epochs are only the bound: annealing by epoch would start at epoch 10, which a budget of ~4
    # epochs never reaches.
    for cb, source in ((InfoBatch(ratio=0.5, delta=0.5, seed=0), "infobatch"),
                       (RandomPrune(fraction=0.3, delta=0.5, seed=0), "random_prune")):
        tel, starts, _ = _budgeted_fit(cb)
        annealing = [r["annealing"] for r in tel.records(source, "epoch")]
        assert annealing == [p >= 0.5 for p in starts], (source, starts)
        assert True in annealing and annealing[1] is False


def test_swa_starts_and_the_batch_size_grows_by_the_budgets_progress():
    from effilab.optim.averaging import SWA
    from effilab.optim.batch_size import BatchSizeSchedule

    tel, _, ends = _budgeted_fit(SWA(start_frac=0.5))
    averaged = [r["n_averaged"] for r in tel.records("swa", "epoch")]
    assert averaged == [sum(p >= 0.5 for p in ends[: i + 1]) for i in range(len(ends))] and averaged[-1] >= 1
    tel, starts, _ = _budgeted_fit(BatchSizeSchedule(milestones=(0.5,), factor=2))
    sizes = [r["bs"] for r in tel.records("batch_size_schedule", "epoch")]
    assert sizes == [64 if p >= 0.5 else 32 for p in starts] and sizes[0] == 32 and sizes[-1] == 64


def test_list_shows_the_presets_and_reinvest(capsys):
    rc, out, _ = _main(capsys, "--list")
    assert rc == 0
    lines = out.splitlines()
    assert any(ln.split()[:1] == ["fast-reinvest"] and "more epochs" in ln for ln in lines)
    i = lines.index("  reinvest(unit=None)")
    assert lines[i + 1].strip().startswith("Re-invested savings:")
