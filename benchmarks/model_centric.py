"""Model-centric techniques side by side, at equal epochs and at equal spend, on real data, 3 seeds.

Every campaign runs through the bench (`effilab.bench.run(..., matched=True)`): each recipe trains the same
model with `fit_one_cycle` at the same epochs and learning rate, per seed from the same initial weights and
data order, and each recipe that spent less than the baseline (samples, training FLOPs or steps) is followed by
the bench's **budget-matched baseline** `baseline@<recipe>`: the plain recipe given exactly that run's measured
spend, its one-cycle schedule decayed to the end (No Train No Gain's fair comparison). A recipe that saved
none of those (time or memory only, or nothing) has no matched baseline: the bench skips it, and the table
says what the technique saves instead. Three campaigns:

* `--task fashion-mnist` (default, `--model cnn`): `small_model`'s 3-conv BatchNorm CNN on real Fashion-MNIST
  (Debian's `dataset-fashion-mnist`; without it the script stops and says how to get it): bf16 autocast,
  torch.compile (inductor), layer freezing (with and without the frozen prefix's cache), RigL and SET at 10%
  density, activation checkpointing.
* `--task fashion-mnist --model resnet`: the bench's residual CNN (`resnet_small`, stages (4, 1)) for the
  techniques that need residual blocks: stochastic depth, progressive layer dropping, ReZero gates, Fixup,
  model growth, activation checkpointing.
* `--task pysource`: the 2-layer character transformer on the standard library's sources: bf16 autocast,
  activation checkpointing, stochastic depth, PLD, ReZero, model growth, RigL, FP8 (refused on a device
  without FP8 tensor cores: the refusal is the result there).

**Growth against the grown model.** Growth starts small and ends as large as the model it grows into, so it
is compared with training that model throughout: the growth recipe first cuts the campaign's model to its
shallow start (`shallow_start`, below: the first block of each run of identical blocks is kept, e.g. (4, 1)
-> (1, 1), 2 layers -> 1), then `model_growth` deepens it back (each event doubles the identical blocks, copies
started as the identity) to exactly the campaign's architecture: the baseline's model, so the baseline and
its budget-matched copy are "the grown model trained throughout".

Reported per recipe (mean ± std over seeds): validation accuracy, its difference to the baseline at equal
epochs, the paired test against the budget-matched baseline, the bench's **training FLOPs**
(`FlopCounterMode` per batch shape and trainable set, less the blocks stochastic depth skipped), the
**activation bytes** autograd keeps for backward on a sampled step (`saved_tensors_hooks`, each storage
once; measured here, the bench has no such column), wall-clock and CPU time, the run's peak RSS.

    python -m benchmarks.model_centric [--quick] [--task pysource] [--model resnet] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import os

import torch

from benchmarks.common import OUT_DIR, add_common_args, apply_threads, machine, machine_line, table, write_json
from effilab.callback import EffilabCallback

RIGL = "sparse_rigl(density=0.1, delta_t=20)"
SET = "sparse_set(density=0.1, delta_t=20)"
CNN_RECIPES = (
    ("baseline", "baseline"),
    ("autocast", "autocast"),
    ("compile", "compile"),
    ("layer_freezing", "layer_freezing"),
    ("layer_freezing(cache=True)", "layer_freezing(cache=True)"),
    ("rigl", RIGL),
    ("set", SET),
    ("activation_checkpointing", "activation_checkpointing"),
)
RESNET_RECIPES = (
    ("baseline", "baseline"),
    ("stochastic_depth", "stochastic_depth"),
    ("progressive_layer_drop", "progressive_layer_drop"),
    ("rezero", "rezero"),
    ("fixup", "fixup"),
    ("model_growth", "shallow_start+model_growth(at=(0.25, 0.5))"),  # (1, 1) -> (2, 1) -> (4, 1)
    ("activation_checkpointing", "activation_checkpointing"),
)
TEXT_RECIPES = (
    ("baseline", "baseline"),
    ("autocast", "autocast"),
    ("activation_checkpointing", "activation_checkpointing"),
    ("stochastic_depth", "stochastic_depth"),
    ("progressive_layer_drop", "progressive_layer_drop"),
    ("rezero", "rezero"),
    ("model_growth", "shallow_start+model_growth(at=(0.5,))"),  # 1 layer -> 2 layers
    ("rigl", RIGL),
    ("fp8", "fp8"),
)
# What each technique saves, from its method card: said in the table where no budget-matched baseline ran.
SAVES = {
    "autocast": "time and activation memory (bf16), not FLOPs",
    "compile": "time only (fused kernels), not FLOPs",
    "activation_checkpointing": "memory only, for extra FLOPs (a second forward)",
    "rigl": "nothing measurable: masked dense kernels (theoretical sparse FLOPs only)",
    "set": "nothing measurable: masked dense kernels (theoretical sparse FLOPs only)",
    "rezero": "nothing per step (an init): steps to a target, if anything",
    "fixup": "nothing per step (an init): steps to a target, if anything",
    "fp8": "time and memory on FP8 GPUs; refused here",
}


class ActivationBytes(EffilabCallback):
    """Bytes of the tensors autograd keeps for backward (each storage once) on every `every`-th training step,
    from the end of every other callback's `before_batch` (order 1000) to the end of the backward.

    Telemetry source `"activations"`, stream `"epoch"`: `saved_bytes` (mean over the measured steps), `measured`.
    Resets dynamo's cache before a fit with `Compile`: each compiled run starts cold, as in a fresh process, so
    that its compile time is counted (Inductor's on-disk cache stays warm)."""

    order = 1000
    telemetry_name = "activations"

    def __init__(self, every: int = 8):
        self.every = every
        self._hooks = None
        self._last = None

    def before_fit(self):
        from effilab.model import Compile

        if any(isinstance(cb, Compile) for cb in self.learn.cbs):
            torch._dynamo.reset()

    def before_train(self):
        self._saved, self._steps, self._hooks = [], 0, None

    def before_batch(self):
        if not self.training or hasattr(self.learn, "lr_finder"):
            return
        self._steps += 1
        compiled = getattr(self.learn.model, "_compiled_call_impl", None) is not None
        if (self._steps - 1) % self.every or (compiled and self._last is not None):
            return  # a compiled step keeps what the eager one did: measured once
        seen, total = set(), [0]

        def pack(t):
            if t.device.type == "meta":  # a FLOP count inside the step (a FLOP budget's), not the step's own
                return t
            key = (t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))
            if key not in seen:
                seen.add(key)
                total[0] += t.numel() * t.element_size()
            return t

        self._total = total
        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._hooks.__enter__()

    def _close(self):
        if self._hooks is not None:
            hooks, self._hooks = self._hooks, None
            hooks.__exit__(None, None, None)
            self._saved.append(self._total[0])

    def after_backward(self):
        self._close()

    def after_cancel_batch(self):
        self._close()

    def after_train(self):
        self._close()
        if self._saved:
            self._last = sum(self._saved) / len(self._saved)
        if self._steps and self._last is not None:
            self.telemetry.record(self.telemetry_name, "epoch", epoch=self.learn.epoch, measured=len(self._saved),
                                  saved_bytes=self._last)

    def after_cancel_fit(self):
        self._close()


class ShallowStart(EffilabCallback):
    """Growth's starting point: before the first fit, the model's residual blocks are cut to the first of each
    run of identical blocks (same class, identity shortcut, right after a block of the same container), so that
    `model_growth`'s deepening (each event doubles them) grows it back to the model it was given. The kept blocks
    keep their initial weights; the optimizer is rebuilt on what is left."""

    order = -20  # before growth (-5) and before anything that reads the model

    def __init__(self):
        self.done = False

    def before_fit(self):
        if self.done:
            return
        from fastai.torch_core import get_model
        from torch import nn

        from effilab.core.residual import ResidualBlock
        from effilab.model._common import rebuild_optimizer

        model = get_model(self.learn.model)
        self.full_params = sum(p.numel() for p in model.parameters())
        for container in [m for m in model.modules() if isinstance(m, (nn.Sequential, nn.ModuleList))]:
            kept, prev = [], None
            for child in container:
                repeat = (isinstance(child, ResidualBlock) and child.identity_shortcut and prev is not None
                          and type(prev) is type(child))
                if not repeat:
                    kept.append(child)
                prev = child if isinstance(child, ResidualBlock) else None
            if len(kept) < len(container):
                for key in list(container._modules):
                    del container._modules[key]
                for i, child in enumerate(kept):
                    container._modules[str(i)] = child
        self.done = True
        rebuild_optimizer(self.learn)
        self.telemetry.set_meta("shallow_start", full_params=self.full_params,
                                start_params=sum(p.numel() for p in model.parameters()))


def _components():
    from effilab.bench import register_component

    register_component("activation_bytes", ActivationBytes, "activation bytes kept for backward on sampled steps",
                       "system", overwrite=True)
    register_component("shallow_start", ShallowStart, "growth's start: the model cut to one block per run",
                       "model", overwrite=True)


# ------------------------------------------------------------------------------------------ tables


def _records(run: dict, source: str, stream: str = "epoch") -> list:
    return run.get("telemetry", {}).get("records", {}).get(source, {}).get(stream, [])


def _meta(run: dict, source: str) -> dict:
    return run.get("telemetry", {}).get("meta", {}).get(source, {})


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def model_rows(data: dict) -> tuple[list[str], list[list[str]]]:
    """The campaign's table (from its results.json content): per recipe and matched baseline, accuracy, the
    differences at equal epochs and at equal spend, FLOPs, activation bytes, time and memory."""
    from effilab.bench.table import _flops, matched_text

    summary = {row["recipe"]: row for row in data["summary"]}
    runs: dict[str, list] = {}
    for r in data["runs"]:
        runs.setdefault(r["recipe"], []).append(r)
    skipped = {s["recipe"]: s for s in data.get("skipped", [])}
    act = {name: _mean([max((e["saved_bytes"] for e in _records(r, "activations")), default=None) for r in rs])
           for name, rs in runs.items()}
    base_act = act.get("baseline")

    def pct(x):
        return "" if x is None else f" ({x:.0%})"

    headers = ["recipe", "seeds", "accuracy %", "Δ vs baseline, equal epochs (pts)",
               "vs budget-matched baseline (Δ pts, paired t-test)", "training FLOPs (% of baseline)",
               "activations kept, MiB (%)", "wall-clock s (%)", "CPU s (%)", "peak RSS MiB"]
    rows = []
    for name, row in summary.items():
        seeds = f"{row['n_runs']}" + (f" ({row['n_failed']} failed)" if row["n_failed"] else "")
        if not row["n_runs"]:
            rows.append([name, seeds] + ["—"] * (len(headers) - 2))
            continue
        is_matched = name.startswith("baseline@")
        if is_matched:
            budgets = [r["params"].get("budget", {}) for r in runs[name]]
            vs = f"(given {name[len('baseline@'):]}'s {budgets[0].get('unit', '?')})"
        elif name == "baseline":
            vs = "—"
        elif row.get("matched"):
            unit = next((r["params"].get("budget", {}).get("unit") for r in runs.get("baseline@" + name, [])), "?")
            vs = f"{matched_text(row['matched'])}; matched in {unit}"
        else:
            why = SAVES.get(name) or (skipped.get("baseline@" + name) or {}).get("reason", "no matched run")
            vs = f"— (saves {why})" if name in SAVES else f"— ({why})"
        acc = f"{100 * row['accuracy_mean']:.2f} ± {100 * row['accuracy_std']:.2f}"
        delta = "—" if name == "baseline" else f"{100 * row['accuracy_delta']:+.2f}"
        flops = _flops(row.get("flops_mean"), row.get("flops_frac"))
        a = act.get(name)
        acts = "—" if a is None else f"{a / 2**20:.1f}" + pct(a / base_act if base_act else None)
        rows.append([name, seeds, acc, delta, vs, flops, acts,
                     f"{row['wall_s_mean']:.1f} ± {row['wall_s_std']:.1f}{pct(row.get('wall_frac'))}",
                     f"{row['cpu_s_mean']:.1f} ± {row['cpu_s_std']:.1f}{pct(row.get('cpu_frac'))}",
                     "—" if row.get("peak_mem_mb_max") is None else f"{row['peak_mem_mb_max']:.0f}"])
    return headers, rows


def technique_notes(data: dict) -> list[str]:
    """What each technique's telemetry says it did (first seed of each recipe)."""
    notes, seen = [], set()
    for r in data["runs"]:
        name = r["recipe"]
        if name in seen or name.startswith("baseline"):
            continue
        seen.add(name)
        if _records(r, "compile"):
            last = _records(r, "compile")[-1]
            notes.append(f"{name}: eager step {1e3 * (last['eager_step_s'] or 0):.1f} ms, compiled "
                         f"{1e3 * (last['compiled_step_s'] or 0):.1f} ms, compile {last['compile_s']:.1f} s, "
                         f"recompiles {last['recompiles']}, break-even step {last['break_even_step']}")
        if _records(r, "freezing"):
            last = _records(r, "freezing")[-1]
            skipped = sum(x.get("prefix_samples_skipped", 0) for x in _records(r, "freezing"))
            extra = f", prefix forwards skipped for {skipped} samples" if "cache_depth" in last else ""
            notes.append(f"{name}: {last['n_frozen']} layers frozen at the end{extra}")
        for source in ("stochastic_depth", "progressive_layer_drop"):
            if _records(r, source):
                fracs = [e["flops_saved_frac"] for e in _records(r, source)]
                notes.append(f"{name}: block FLOPs skipped per epoch {', '.join(f'{f:.0%}' for f in fracs)}")
        if _records(r, "growth"):
            ev = _records(r, "growth", "event")
            start = _meta(r, "shallow_start")
            final = ev[-1]["n_params"] if ev else None
            same = "" if not start else (f", {start['start_params']:,} -> {final:,} parameters (the baseline's: "
                                         f"{start['full_params']:,})")
            notes.append(f"{name}: grew to {ev[-1]['n_blocks'] if ev else '?'} blocks{same}, max output change "
                         f"{max((e['max_abs_change'] for e in ev), default=0):.1e}, training FLOPs "
                         f"{_records(r, 'growth')[-1]['saved_frac']:.0%} below the grown model's throughout")
        if _meta(r, "autocast"):
            notes.append(f"{name}: {_meta(r, 'autocast').get('note')}")
        if _meta(r, "sparse").get("flops_fraction") is not None:
            notes.append(f"{name}: theoretical FLOPs of the masked layers {_meta(r, 'sparse')['flops_fraction']:.0%}")
        if _meta(r, "checkpointing"):
            m = _meta(r, "checkpointing")
            notes.append(f"{name}: checkpointed {m.get('checkpointed')}, estimated {m.get('saved_mb', 0):.1f} "
                         f"of {m.get('activation_mb', 0):.1f} MiB of activations freed")
    for s in data.get("skipped", []):
        if s["seed"] == data["config"]["seeds"][0]:
            notes.append(f"{s['recipe']}: not run: {s['reason']}")
    for f in data.get("failures", []):
        error = " ".join(f.get("error", "").split())[:400]
        notes.append(f"failed: {f['recipe']} (seed {f['seed']}): {f.get('error_type')}: {error}")
    return notes


def report(data: dict) -> str:
    headers, rows = model_rows(data)
    return table(headers, rows) + "\n\n" + "\n".join(technique_notes(data))


def print_results(path) -> None:
    """The tables of a finished campaign, from its results.json (no training)."""
    import json

    print(report(json.loads(open(path).read())))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--task", default="fashion-mnist", choices=["fashion-mnist", "mnist1d", "pysource"])
    parser.add_argument("--model", default=None, choices=["cnn", "resnet"],
                        help="image tasks: cnn (default; the CNN recipes) or resnet (the residual recipes)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--n-samples", type=int, default=None, help="training images / bytes of source (pysource)")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--bs", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--device", default=None)
    parser.add_argument("--every", type=int, default=8, help="measure activation bytes on every n-th step")
    parser.add_argument("--recipes", nargs="+", default=None, help="a subset of the recipes (by name)")
    parser.add_argument("--no-matched", dest="matched", action="store_false",
                        help="leave out the budget-matched baselines")
    parser.add_argument("--from-results", default=None, help="print the tables of a campaign's results.json again")
    args = parser.parse_args(argv)
    apply_threads(args)
    if args.from_results:
        return print_results(args.from_results)

    from effilab import datasets
    from effilab.bench import run

    if args.task == "pysource":
        if args.model is not None:
            raise SystemExit("--model applies to image tasks; pysource trains its character transformer")
        recipes, model = TEXT_RECIPES, "small"
    else:
        model = args.model or "cnn"
        recipes = RESNET_RECIPES if model == "resnet" else CNN_RECIPES
    if args.recipes:
        unknown = set(args.recipes) - {n for n, _ in recipes}
        if unknown:
            raise SystemExit(f"unknown recipes {sorted(unknown)}; this campaign's recipes: {[n for n, _ in recipes]}")
        if "baseline" not in args.recipes and args.matched:
            args.recipes = ["baseline", *args.recipes]  # the budget-matched baselines need it
        recipes = [r for r in recipes if r[0] in args.recipes]
    seeds, epochs, n = args.seeds, args.epochs, args.n_samples
    if args.quick:
        seeds, epochs, n = [0], 2, 2048 if args.task != "pysource" else 60_000
    name = f"model_centric_{args.task.replace('-', '_')}" + ("_resnet" if model == "resnet" else "")
    name += "_quick" if args.quick else ""
    if args.recipes:  # a subset does not overwrite the whole campaign's results
        name += "_" + "_".join("".join(c for c in r if c.isalnum() or c == "_") for r in args.recipes)
    if args.task == "pysource":
        task = datasets.pysource(seq_len=64, max_bytes=n or 200_000)
    elif args.task == "fashion-mnist":
        try:
            task = datasets.fashion_mnist(subset=n or 10_000, seed=0)
        except datasets.DatasetUnavailable as e:
            raise SystemExit(f"Fashion-MNIST is missing: {e}\n(or run with --task mnist1d)") from None
    else:
        task = datasets.mnist1d(n_samples=n or 20_000, seed=0)
    _components()
    specs = [{"name": rn, "components": [text, f"activation_bytes(every={args.every})"]} for rn, text in recipes]
    load_before = os.getloadavg()
    campaign = run(task, specs, seeds=seeds, epochs=epochs, bs=args.bs, lr=args.lr, model=model, width=args.width,
                   device=args.device, threads=args.threads, out=OUT_DIR / name, overwrite=True, progress="lines",
                   matched=args.matched)
    load_after = os.getloadavg()
    data = campaign.to_dict()
    text = report(data)
    print(f"\n{text}\n")
    m = machine()
    setting = {"task": task.name, "model": model, "n_train": len(task.train), "n_valid": len(task.valid),
               "epochs": epochs, "seeds": seeds, "bs": args.bs, "lr": args.lr, "width": args.width,
               "every": args.every, "matched": args.matched, "load_before": load_before, "load_after": load_after,
               "total_s": campaign.total_s}
    path = write_json(name, {"setting": setting, "machine": m, "report": text, "summary": data["summary"],
                             "skipped": data["skipped"]})
    print(f"{machine_line(m)}; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
          f"{campaign.total_s:.0f} s in all\nwrote {path} and {campaign.results_path}")


if __name__ == "__main__":
    main()
