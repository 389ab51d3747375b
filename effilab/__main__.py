"""The `effilab` command line: `effilab bench` (or `python -m effilab bench`).

    effilab bench                                   # baseline, infobatch, random-prune on MNIST-1D
    effilab bench --recipe baseline --recipe "infobatch(ratio=0.3)+dashboard" --seeds 0 1 2
    effilab bench --task fashion-mnist --n-samples 20000 --epochs 8 --target-acc 0.85
    effilab bench --recipes-file campaign.toml      # recipes and settings from a TOML file
    effilab bench --resume runs/bench-20260101-120000   # continue an interrupted campaign
    effilab bench --budget samples                  # every recipe on the baseline's samples (equal spend)
    effilab bench --recipe baseline --recipe infobatch+reinvest   # skipped samples buy more epochs
    effilab bench --list                            # recipes, components and their arguments, tasks
    effilab bench --quick                           # a few seconds: checks that everything runs

Exit status: 0 all runs finished, 1 some run failed (the others completed), 2 usage or data error
(nothing trained), 3 results.json or report.html could not be written (the runs finished; the table is
printed), 130 interrupted (the finished runs are saved; continue with --resume).
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
import time
from importlib import import_module
from pathlib import Path

from .bench.tasks import MODELS, QUICK, TASK_DEFAULTS, TASK_NAMES

DESCRIPTION = ("Train the same small model on the same data under several recipes and seeds, and compare "
               "what each saved (samples, steps, wall-clock, CPU time, memory) with what it cost in "
               "accuracy: a table, results.json (rewritten after every run) and a self-contained "
               "report.html.")
RECIPE_SYNTAX = ("A recipe is components joined by '+', each NAME or NAME(key=value, ...) with Python "
                 "literal values, e.g. \"infobatch(ratio=0.3)+dashboard\". Components: baseline, infobatch, "
                 "random-prune (matched to the campaign's InfoBatch recipe unless given fraction=) and every "
                 "technique of effilab.registry by its name (dashboard, system_monitor, fit_recorder, ...): "
                 "see --list.")

TOML_EXAMPLE = """\
  task = "mnist1d"            # optional campaign keys: task, n_samples, epochs, seeds, bs, lr, model,
  epochs = 8                  #   width, target_acc, fraction, device, threads, budget (options given win)
  seeds = [0, 1]
  [[recipe]]
  name = "ib30"               # optional; default: the components joined by '+'
  components = ["infobatch(ratio=0.3)", "dashboard"]
  [[recipe]]
  components = ["baseline"]"""


def _build_parser() -> argparse.ArgumentParser:
    from .bench.recipes import DEFAULT_FRACTION, DEFAULT_RECIPES

    mn = TASK_DEFAULTS["mnist1d"]
    parser = argparse.ArgumentParser(prog="effilab", description="Efficient training, measured.")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser(
        "bench", help="train one model under several recipes and compare them side by side",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(DESCRIPTION, 79) + "\n\n" + textwrap.fill(RECIPE_SYNTAX, 79),
        epilog="A recipes file (TOML):\n" + TOML_EXAMPLE + "\n\nExit status: 0 all runs finished, 1 some run "
               "failed,\n2 usage or data error (nothing trained), 3 results or report not written,\n130 "
               "interrupted (continue with --resume DIR).")
    b.add_argument("--task", default=None,
                   help=f"data (default mnist1d): {', '.join(TASK_NAMES)}, or folder:PATH (an image folder "
                        "with one subfolder per class)")
    b.add_argument("--n-samples", type=int, default=None,
                   help=f"mnist1d: samples generated, 80%% train / 20%% valid (default {mn['n_samples']}); "
                        "fashion-mnist, mnist, cifar10: a random subset of the training set (default: all; "
                        f"--quick: {QUICK['n_samples']})")
    b.add_argument("--recipe", action="append", default=None, metavar="RECIPE",
                   help=f"a recipe to run (repeatable; default: {' '.join(DEFAULT_RECIPES)})")
    b.add_argument("--recipes-file", default=None, metavar="FILE",
                   help="a TOML file of recipes and campaign settings (see below); --recipe adds to its "
                        "recipes")
    b.add_argument("--seeds", type=int, nargs="+", default=None,
                   help=f"seeds (default: {' '.join(map(str, mn['seeds']))})")
    b.add_argument("--epochs", type=int, default=None,
                   help=f"epochs per run, or at most with --target-acc (default: per task, {mn['epochs']} "
                        "for mnist1d)")
    b.add_argument("--budget", default=None, metavar="UNIT",
                   help="compare at equal spend: every recipe trains on the baseline's spend at --epochs in UNIT "
                        "(samples, steps, flops or time), one-cycle over that budget (default: equal epochs). "
                        "Either way each technique that saves something is compared with baseline@TECHNIQUE, "
                        "the baseline given exactly the technique's measured spend")
    b.add_argument("--no-matched", dest="matched", action="store_false",
                   help="leave out the budget-matched baselines (baseline@TECHNIQUE): fewer runs")
    b.add_argument("--target-acc", type=float, default=None, metavar="ACC",
                   help="time-to-accuracy: stop each run after the epoch whose validation accuracy reaches "
                        "ACC (a fraction, e.g. 0.85) and report the time and samples it took")
    b.add_argument("--bs", type=int, default=None, help=f"batch size (default {mn['bs']})")
    b.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate of fit_one_cycle (default {mn['lr']})")
    b.add_argument("--model", choices=MODELS, default=None,
                   help="small: effilab.datasets.small_model (an MLP for flat inputs, a CNN for images, a "
                        "transformer of residual blocks for pysource; default); mlp: the MLP on flattened inputs; "
                        "cnn: the CNN; resnet: a residual CNN (images; for stochastic depth, gates, Fixup, growth)")
    b.add_argument("--width", type=int, default=None,
                   help="the model's width: MLP hidden size (default 256), first conv's channels (default 32; "
                        "resnet 16) or the transformer's width (default 128)")
    b.add_argument("--fraction", type=float, default=None,
                   help=f"random-prune's fraction when there is no InfoBatch recipe to match (default "
                        f"{DEFAULT_FRACTION})")
    b.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    b.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1: for models this small more threads gain little, and "
                        "on a busy machine they can make each step many times slower)")
    b.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train each run on N processes under torchrun (DDP through effilab.system.distrib_ctx: "
                        "gloo on CPU cores, NCCL on GPUs; at most the GPUs, or the CPU cores, available; "
                        "default 1)")
    b.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default runs/bench-<timestamp>); refused if it holds results")
    b.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the campaign in DIR with its missing (and failed) runs; options not given "
                        "are taken from it, options given must match it")
    b.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    b.add_argument("--quick", action="store_true",
                   help="a tiny setting that runs in seconds (explicit options still win)")
    b.add_argument("--list", action="store_true",
                   help="list the recipes, the components with their arguments, the tasks, and exit")
    b.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (repeatable): a module that registers its own components or "
                        "recipes")
    # Usage errors found after parsing are reported by the subcommand's own parser (its usage line).
    b.set_defaults(command_parser=b)
    return parser


def _out_dir(out: str | None) -> Path:
    if out is not None:
        return Path(out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, i = Path("runs") / f"bench-{stamp}", 1
    while path.exists():  # two runs within the same second
        path, i = Path("runs") / f"bench-{stamp}-{i}", i + 1
    return path


def _list() -> int:
    from .bench.recipes import RECIPES, components

    print("recipes (--recipe NAME):")
    for name, r in RECIPES.items():
        print(f"  {name:<16} {r.description}")
    print("\ncomponents (--recipe \"NAME(key=value, ...)+NAME...\"; each with its method card's first line):")
    for _, comp in sorted(components().items()):
        print(f"  {comp.usage()}")
        card = comp.card()
        if card:
            print(textwrap.fill(card, 100, initial_indent="      ", subsequent_indent="      "))
    print(f"\ntasks (--task): {', '.join(TASK_NAMES)}, folder:PATH")
    print(f"models (--model): {', '.join(MODELS)}")
    return 0


# Options that are campaign keys too (the recipes file's keys, same names).
_OPTIONS = ("task", "n_samples", "epochs", "seeds", "bs", "lr", "model", "width", "target_acc", "fraction",
            "device", "threads", "budget")


def _from_stored(config: dict) -> dict:
    """A stored campaign configuration as campaign keys (what --resume fills in)."""
    kw = config.get("task_kwargs") or {}
    keys = {"task": config.get("task"), "n_samples": kw.get("n_samples", kw.get("subset"))}
    keys.update({k: config.get(k) for k in ("epochs", "seeds", "bs", "lr", "model", "width", "target_acc",
                                            "fraction", "device", "budget")})
    return keys


def bench(parser: argparse.ArgumentParser, args) -> int:
    from .bench import store as S
    from .bench.recipes import (
        DEFAULT_RECIPES,
        RecipeError,
        add_matched_baselines,
        check_budget_unit,
        check_campaign_value,
        get_recipe,
        load_recipes_file,
        resolve_campaign,
    )
    from .bench.tasks import TaskError, parse_task, task_defaults, task_kwargs

    for module in args.imports:
        try:
            import_module(module)
        except Exception as e:
            parser.error(f"--import {module}: {type(e).__name__}: {e}")
    if args.list:
        return _list()

    # Campaign settings: the recipes file, then the options given, then (resuming) the stored campaign,
    # then the task's defaults.
    file_recipes, settings = [], {}
    if args.recipes_file:
        try:
            file_recipes, settings = load_recipes_file(args.recipes_file)
        except RecipeError as e:
            parser.error(str(e))
    settings.update({key: getattr(args, key) for key in _OPTIONS if getattr(args, key) is not None})

    given = set(settings)  # before a resumed campaign's settings fill in the rest
    stored = None
    if args.resume is not None and Path(args.resume).is_file():
        parser.error(f"--resume {args.resume} is a file: give the campaign's folder (the one holding "
                     f"{S.RESULTS})")
    if args.resume is not None:
        if args.out is not None and Path(args.out).resolve() != Path(args.resume).resolve():
            parser.error("--resume DIR continues the campaign in DIR: give --out DIR or neither")
        if args.overwrite:
            parser.error("--resume and --overwrite exclude each other")
        try:
            stored = S.load_results(args.resume)
        except (FileNotFoundError, ValueError) as e:
            parser.error(str(e))
        for key, value in _from_stored(stored["config"]).items():
            settings.setdefault(key, value)
    try:
        for key, value in settings.items():
            if value is not None:
                check_campaign_value(key, value, "campaign settings")
    except RecipeError as e:
        parser.error(str(e))

    try:
        task_name, _ = parse_task(settings.get("task", "mnist1d"))
        task_spec = settings.get("task", "mnist1d")
        if task_name == "folder":
            task_spec = f"folder:{parse_task(task_spec)[1]}"
        defaults = task_defaults(task_name, args.quick)
        kwargs = task_kwargs(task_name, settings.get("n_samples"), args.quick)
    except TaskError as e:
        parser.error(str(e))
    if stored is not None and "n_samples" not in given and stored["config"].get("task_kwargs") is not None:
        kwargs = stored["config"]["task_kwargs"]  # the loader's arguments as stored (e.g. a --quick size)
    get = lambda key: settings[key] if settings.get(key) is not None else defaults.get(key)
    seeds, epochs, bs, lr = get("seeds"), get("epochs"), get("bs"), get("lr")
    model, width, target = settings.get("model") or "small", settings.get("width"), settings.get("target_acc")
    fraction, threads = settings.get("fraction"), settings.get("threads", 1)
    if any(v is not None and v < 1 for v in (epochs, bs, threads, width)) or not (math.isfinite(lr) and lr > 0):
        parser.error(f"--epochs, --bs, --threads, --width must be positive integers and --lr a positive finite "
                     f"number (got --lr {lr})")
    if not seeds or len(set(seeds)) != len(seeds):
        parser.error(f"--seeds must be distinct integers, got {seeds}")
    if model not in MODELS:
        parser.error(f"unknown model {model!r}; models: {', '.join(MODELS)}")
    if target is not None and not 0.0 < target <= 1.0:
        parser.error(f"--target-acc is a validation accuracy in (0, 1], e.g. 0.85; got {target}")
    if fraction is not None and not 0.0 <= fraction < 1.0:
        parser.error(f"--fraction must be in [0, 1), got {fraction}")
    budget = settings.get("budget")
    try:
        check_budget_unit(budget)
    except RecipeError as e:
        parser.error(str(e))

    nproc = args.nproc if args.nproc is not None else (stored or {}).get("config", {}).get("nproc", 1)
    from .bench.distributed import check_nproc

    try:
        check_nproc(nproc)
    except ValueError as e:
        parser.error(str(e))

    # Recipes: the file's, then --recipe's; resuming without either, the stored campaign's.
    try:
        recipes = list(file_recipes) + [get_recipe(text) for text in args.recipe or []]
        if not recipes and stored is not None:
            # the budget-matched baselines are not recipes of their own: the campaign adds them again
            recipes = [get_recipe({"name": r["name"], "components": r["components"]})
                       for r in stored["config"].get("recipes", []) if r.get("components") and not r.get("matches")]
        if not recipes:
            recipes = [get_recipe(name) for name in DEFAULT_RECIPES]
        matched = args.matched if stored is None else args.matched and stored["config"].get("matched", False)
        resolve_campaign(add_matched_baselines(recipes, budget, matched))
    except RecipeError as e:
        parser.error(str(e))

    out = Path(args.resume) if args.resume is not None else _out_dir(args.out)
    if stored is None:
        try:
            S.check_out_dir(out, overwrite=args.overwrite)
        except (S.OutputExists, S.OutputUnwritable) as e:
            parser.error(str(e))

    from .bench.campaign import CampaignInterrupted, run  # imports torch and fastai: after the checks
    from .datasets import DatasetUnavailable

    options = {} if fraction is None else {"fraction": fraction}
    try:
        campaign = run(task_spec, recipes, seeds, epochs, bs, lr, task_kwargs=kwargs, model=model,
                       width=width, target_acc=target, device=settings.get("device"), options=options,
                       threads=threads, progress="auto", out=out, resume=stored is not None,
                       overwrite=args.overwrite, budget=budget, matched=matched, nproc=nproc)
        interrupted = False
    except (TaskError, RecipeError) as e:
        parser.error(str(e))
    except (DatasetUnavailable, S.ConfigMismatch, S.OutputUnwritable) as e:
        print(f"effilab bench: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # every run raises inside the campaign: this is a setting checked before them
        parser.error(str(e))
    except CampaignInterrupted as e:
        campaign, interrupted = e.campaign, True

    print()
    try:
        print(campaign.table)
    except Exception as e:  # the runs are stored; a table that cannot be drawn must not hide that
        print(f"(the summary table could not be drawn: {type(e).__name__}: {e})")
    n_plan = len(campaign.config["seeds"]) * len(campaign.config["recipes"])
    cpu = sum(r.cpu_s for r in campaign)
    skipped = f" ({len(campaign.skipped)} not needed)" if campaign.skipped else ""
    print(f"\n{len(campaign)} of {n_plan} runs finished{skipped} in {campaign.total_s:.0f} s "
          f"(training: {sum(r.wall_s for r in campaign):.0f} s wall-clock, {cpu:.0f} s CPU)")
    if campaign.failures:
        print(f"\n{len(campaign.failures)} run(s) FAILED (tracebacks in results.json, \"failures\"):")
        for f in campaign.failures:
            print(f"  {f.recipe} seed={f.seed}: {f.message}")
    for s in campaign.skipped:
        print(f"not run: {s['recipe']} seed={s['seed']}: {s['reason']}")
    print(f"results: {campaign.results_path}")
    print(f"report:  {campaign.report_path}")
    if campaign.write_errors:
        print("\neffilab bench: error: " + "; ".join(campaign.write_errors) + f". The {len(campaign)} finished "
              "runs are in the table above" + (f" and in {campaign.results_path}" if not any(
                  S.RESULTS in e for e in campaign.write_errors) else "") + "; free space or choose a writable "
              "folder, then write the report again with Campaign.load(DIR).save_report()", file=sys.stderr)
    if interrupted:
        print(f"\ninterrupted: the {len(campaign)} finished runs are saved; continue with: "
              f"effilab bench --resume {out}", file=sys.stderr)
        return 130
    if campaign.write_errors:
        return 3
    return 1 if campaign.failures else 0


def main(argv: list[str] | None = None) -> int:
    import warnings

    # A dependency's deprecation notice, printed at import on every run: noise in a command's output.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    parser = _build_parser()
    args = parser.parse_args(argv)
    return bench(args.command_parser, args)  # the only command so far; argparse rejects any other


if __name__ == "__main__":
    sys.exit(main())
