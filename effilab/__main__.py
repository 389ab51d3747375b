"""The `effilab` command line: `effilab bench` (or `python -m effilab bench`).

    effilab bench                                   # baseline, infobatch, random-prune on MNIST-1D
    effilab bench --recipe baseline --recipe infobatch --seeds 0 1 2 --epochs 16
    effilab bench --task fashion-mnist --n-samples 10000 --epochs 6
    effilab bench --quick                           # a few seconds: checks that everything runs
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from pathlib import Path

# What `effilab bench` runs when not told otherwise: 3 recipes x 3 seeds on MNIST-1D (16k train
# samples) for 12 epochs: 1-3 minutes on a busy 2-core CPU.
BENCH_DEFAULTS = {"n_samples": 20_000, "seeds": [0, 1, 2], "epochs": 12, "bs": 128, "lr": 1e-2}
# `--quick`: a smoke test of the whole path (a few seconds of training).
BENCH_QUICK = {"n_samples": 2_000, "seeds": [0], "epochs": 4, "bs": 64, "lr": 1e-2}


def _build_parser() -> argparse.ArgumentParser:
    from .bench.recipes import DEFAULT_FRACTION, DEFAULT_RECIPES, RECIPES

    parser = argparse.ArgumentParser(prog="effilab", description="Efficient training, measured.")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser(
        "bench", help="train one model under several recipes and compare them side by side",
        description="Train the same small model on the same data under several recipes and seeds; print "
                    "accuracy, samples forwarded and wall-clock side by side and write results.json.")
    b.add_argument("--task", default="mnist1d", help="data set (default: mnist1d); one of: "
                   "mnist1d, digits, fashion-mnist, mnist, cifar10")
    b.add_argument("--n-samples", type=int, default=None,
                   help="mnist1d: samples generated, 80%% train / 20%% valid (default "
                        f"{BENCH_DEFAULTS['n_samples']}); fashion-mnist, mnist, cifar10: a random subset of "
                        "the training set of this size (default: all; --quick: 2000)")
    b.add_argument("--recipe", action="append", default=None, metavar="NAME",
                   help=f"a recipe to run (repeatable; default: {' '.join(DEFAULT_RECIPES)}); "
                        f"one of: {', '.join(RECIPES)}")
    b.add_argument("--seeds", type=int, nargs="+", default=None,
                   help=f"seeds (default: {' '.join(map(str, BENCH_DEFAULTS['seeds']))})")
    b.add_argument("--epochs", type=int, default=None, help=f"epochs per run (default {BENCH_DEFAULTS['epochs']})")
    b.add_argument("--bs", type=int, default=None, help=f"batch size (default {BENCH_DEFAULTS['bs']})")
    b.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate of fit_one_cycle (default {BENCH_DEFAULTS['lr']})")
    b.add_argument("--fraction", type=float, default=DEFAULT_FRACTION,
                   help="random-prune's fraction when infobatch is not run to match it "
                        f"(default {DEFAULT_FRACTION})")
    b.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    b.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: for models this small more threads gain little, and "
                        "on a busy machine they can make each step many times slower)")
    b.add_argument("--out", default=None, help="output folder (default runs/bench-<timestamp>)")
    b.add_argument("--quick", action="store_true",
                   help="a tiny setting that runs in seconds (explicit options still win)")
    # Usage errors found after parsing are reported by the subcommand's own parser (its usage line).
    b.set_defaults(command_parser=b)
    return parser


def _task_kwargs(parser: argparse.ArgumentParser, task_fn, args) -> dict:
    params = inspect.signature(task_fn).parameters
    defaults = BENCH_QUICK if args.quick else BENCH_DEFAULTS
    n = args.n_samples
    if "n_samples" in params:
        return {"n_samples": n if n is not None else defaults["n_samples"]}
    if "subset" in params:
        n = defaults["n_samples"] if n is None and args.quick else n
        return {} if n is None else {"subset": n}
    if n is not None:
        parser.error(f"--n-samples does not apply to task {args.task!r}")
    return {}


def _out_dir(out: str | None) -> Path:
    if out is not None:
        return Path(out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, i = Path("runs") / f"bench-{stamp}", 1
    while path.exists():  # two runs within the same second
        path, i = Path("runs") / f"bench-{stamp}-{i}", i + 1
    return path


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def bench(parser: argparse.ArgumentParser, args) -> int:
    from . import __version__
    from .bench.recipes import DEFAULT_RECIPES, RECIPES

    recipes = args.recipe or list(DEFAULT_RECIPES)
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe {unknown[0]!r}; valid recipes: {', '.join(RECIPES)}")
    if len(set(recipes)) != len(recipes):
        parser.error(f"each recipe may be given once, got {' '.join(recipes)}")

    from .datasets import TASKS, DatasetUnavailable  # imports torch: after the checks that need none

    task_name = args.task.strip().lower().replace("_", "-")
    if task_name not in TASKS:
        parser.error(f"unknown task {args.task!r}; valid tasks: {', '.join(TASKS)}")
    defaults = BENCH_QUICK if args.quick else BENCH_DEFAULTS
    seeds = args.seeds if args.seeds is not None else defaults["seeds"]
    epochs = args.epochs if args.epochs is not None else defaults["epochs"]
    bs = args.bs if args.bs is not None else defaults["bs"]
    lr = args.lr if args.lr is not None else defaults["lr"]
    if epochs < 1 or bs < 1 or lr <= 0 or (args.threads is not None and args.threads < 1):
        parser.error("--epochs, --bs, --threads must be positive integers and --lr a positive number")
    if not 0.0 <= args.fraction < 1.0:
        parser.error(f"--fraction must be in [0, 1), got {args.fraction}")
    task_kwargs = _task_kwargs(parser, TASKS[task_name], args)

    try:
        task = TASKS[task_name](**task_kwargs)
    except DatasetUnavailable as e:
        print(f"effilab bench: error: {e}", file=sys.stderr)
        return 2

    from .bench.runner import format_table, run, summarize

    out = _out_dir(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"effilab bench: {task!r}; recipes {', '.join(recipes)}; seeds {' '.join(map(str, seeds))}; "
          f"{epochs} epochs, bs {bs}, lr {lr}", flush=True)
    start = time.perf_counter()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = run(task, recipes, seeds, epochs, bs, lr, device=device, threads=args.threads,
                  options={"fraction": args.fraction}, progress=lambda line: print(line, flush=True))
    total = time.perf_counter() - start
    summary = summarize(results)
    table = format_table(summary)
    config = {"task": task_name, "task_kwargs": task_kwargs, "recipes": recipes, "seeds": seeds, "epochs": epochs,
              "bs": bs, "lr": lr, "fraction": args.fraction, "device": device, "threads": args.threads,
              "quick": args.quick}
    _write_json(out / "results.json", {
        "effilab_version": __version__, "config": config, "total_s": total,
        "runs": [r.to_dict() for r in results], "summary": summary, "table": table,
    })
    print()
    print(table)
    print(f"\n{len(results)} runs in {total:.0f} s; results in {out / 'results.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    return bench(args.command_parser, args)  # the only command so far; argparse rejects any other


if __name__ == "__main__":
    sys.exit(main())
