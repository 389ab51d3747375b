"""Model-centric techniques side by side: each against the baseline at equal epochs, on real data, 3 seeds.

Every recipe trains the same model with `fit_one_cycle` at the same epochs and learning rate through
effilab's recipe runner; per seed the recipes run back to back from the same initial weights and data
order. Two campaigns:

* `--task fashion-mnist` (default): `small_model`'s 3-conv BatchNorm CNN on real Fashion-MNIST
  (Debian's `dataset-fashion-mnist`; without it the script stops and says how to get it, or pass
  `--task mnist1d`): bf16 autocast, torch.compile (inductor), layer freezing (with and without the
  frozen prefix's cache), RigL and SET at 10% density, activation checkpointing.
* `--task pysource`: the 2-layer character transformer (`char_transformer`) on the standard library's
  sources, for the techniques that target transformers or need residual blocks (the image campaign's CNN
  has none, and the bench has no residual image model): bf16 autocast, activation checkpointing, stochastic
  depth, progressive layer dropping, ReZero gates, model growth (deepened from 2 to 4 blocks at half the fit,
  so it ends twice the baseline's depth), RigL, FP8 (refused on a device without FP8 tensor cores: the
  refusal is the result there).

Reported per recipe (mean ± std over seeds): validation accuracy, **training FLOPs** (measured with
`torch.utils.flop_counter.FlopCounterMode` on every `--flop-every`-th training step, so a technique that
changes the per-step cost mid-fit is followed; a compiled step is not traced, it computes what the eager one
did), **activation memory** kept for backward per step (bytes of the tensors autograd saves, through
`saved_tensors_hooks`, on the same steps), wall-clock and CPU time, the process's peak memory, and for the
sparse methods the theoretical FLOPs of their masked layers. The budget-matched baseline (`effilab bench
--budget`) is used when the bench has it.

    python -m benchmarks.model_centric [--quick] [--task pysource] [--n-samples 10000 --epochs 3 --seeds 0 1]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import OUT_DIR, add_common_args, apply_threads, mean_std, table, write_json
from effilab.callback import EffilabCallback

IMAGE_RECIPES = (
    ("baseline", []),
    ("autocast", ["autocast"]),
    ("compile", ["compile"]),
    ("layer_freezing", ["layer_freezing"]),
    ("layer_freezing(cache=True)", ["layer_freezing(cache=True)"]),
    ("rigl", ["sparse_rigl(density=0.1, delta_t=20)"]),
    ("set", ["sparse_set(density=0.1, delta_t=20)"]),
    ("activation_checkpointing", ["activation_checkpointing"]),
)
TEXT_RECIPES = (
    ("baseline", []),
    ("autocast", ["autocast"]),
    ("activation_checkpointing", ["activation_checkpointing"]),
    ("stochastic_depth", ["stochastic_depth"]),
    ("progressive_layer_drop", ["progressive_layer_drop"]),
    ("rezero", ["rezero"]),
    ("model_growth(at=0.5)", ["model_growth(at=(0.5,))"]),
    ("rigl", ["sparse_rigl(density=0.1, delta_t=20)"]),
    ("fp8", ["fp8"]),
)


class FlopCount(EffilabCallback):
    """FLOPs and saved-activation bytes of every `every`-th training step (forward, loss, backward).

    Entered after every other callback's `before_batch` (order 1000: freezing, caching and sparsity have
    set the step up) and left after every other `after_backward`. Telemetry source `"flops"`, stream
    `"epoch"`: `steps`, `measured`, `flops` (the epoch's estimate: mean measured step x steps),
    `saved_bytes` (mean per measured step). Resets dynamo's cache before a fit with `Compile`."""

    order = 1000
    telemetry_name = "flops"

    def __init__(self, every: int = 8):
        self.every = every
        self._last_flops = self._last_saved = self._mode = None

    def before_fit(self):
        # dynamo's cache is process-wide and a model of the same structure reuses its graphs: each compiled
        # run starts cold, as in a fresh process, so that its compile time is counted
        from effilab.model import Compile

        if any(isinstance(cb, Compile) for cb in self.learn.cbs):
            torch._dynamo.reset()

    def before_train(self):
        self._flops, self._saved, self._steps, self._mode, self._hooks = [], [], 0, None, None

    def before_batch(self):
        if not self.training or hasattr(self.learn, "lr_finder"):
            return
        self._steps += 1
        compiled = getattr(self.learn.model, "_compiled_call_impl", None) is not None
        if (self._steps - 1) % self.every or (compiled and self._last_flops is not None):
            return
        from torch.utils.flop_counter import FlopCounterMode

        seen, total = set(), [0]

        def pack(t):
            key = (t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))
            if key not in seen:
                seen.add(key)
                total[0] += t.numel() * t.element_size()
            return t

        self._saved_total = total
        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._hooks.__enter__()
        self._mode = FlopCounterMode(display=False)
        self._mode.__enter__()

    def _close(self):
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)
            self._hooks.__exit__(None, None, None)
            self._flops.append(mode.get_total_flops())
            self._saved.append(self._saved_total[0])

    def after_backward(self):
        self._close()

    def after_cancel_batch(self):
        self._close()

    def after_train(self):
        self._close()
        if not self._steps:
            return
        if self._flops:
            self._last_flops = sum(self._flops) / len(self._flops)
            self._last_saved = sum(self._saved) / len(self._saved)
        self.telemetry.record(self.telemetry_name, "epoch", epoch=self.learn.epoch, steps=self._steps,
                              measured=len(self._flops), flops=self._last_flops * self._steps,
                              saved_bytes=self._last_saved)

    def after_cancel_fit(self):
        self._close()


def _flop_component():
    from effilab.bench import register_component

    register_component("flop_count", FlopCount, "FLOPs and saved activations of sampled steps", "system",
                       overwrite=True)
    # The bench infers from the registry (whose generic test trains it on the transformer) that activation
    # checkpointing works on token sequences only; it works on any model with blocks (the CNN's stages too).
    from effilab.system import ActivationCheckpointing

    register_component("activation_checkpointing", ActivationCheckpointing, "activation checkpointing", "system",
                       overwrite=True)


def _records(run, source, stream="epoch"):
    return run.telemetry.get("records", {}).get(source, {}).get(stream, [])


def _meta(run, source):
    return run.telemetry.get("meta", {}).get(source, {})


def model_rows(campaign, reference="baseline") -> tuple[list, list]:
    """Per recipe: accuracy, FLOPs, saved activations, time, memory (means ± std), and vs the reference."""
    by_recipe: dict[str, list] = {}
    for r in campaign.results:
        by_recipe.setdefault(r.recipe, []).append(r)
    per = {}
    for name, runs in by_recipe.items():
        flops = [sum(rec["flops"] for rec in _records(r, "flops")) for r in runs]
        saved = [max(rec["saved_bytes"] for rec in _records(r, "flops")) / 2**20 for r in runs]
        sparse = [_meta(r, "sparse").get("flops_fraction") for r in runs]
        per[name] = {"acc": mean_std([100 * r.accuracy for r in runs]), "flops": mean_std(flops),
                     "saved_mb": mean_std(saved), "wall": mean_std([r.wall_s for r in runs]),
                     "cpu": mean_std([r.cpu_s for r in runs]),
                     "peak": max(r.peak_mem_mb or 0 for r in runs), "n": len(runs),
                     "sparse": sparse[0] if sparse and sparse[0] is not None else None}
    base = per.get(reference)
    rows = []
    for name, p in per.items():
        def rel(key, p=p, b=base):
            return f" ({p[key][0] / b[key][0]:.0%})" if b and b[key][0] else ""
        dacc = f"{p['acc'][0] - base['acc'][0]:+.2f}" if base else ""
        rows.append([name, p["n"], f"{p['acc'][0]:.2f} ± {p['acc'][1]:.2f}", dacc,
                     f"{p['flops'][0] / 1e12:.3f}{rel('flops')}",
                     "" if p["sparse"] is None else f"{p['sparse']:.0%} of the masked layers'",
                     f"{p['saved_mb'][0]:.1f}{rel('saved_mb')}",
                     f"{p['wall'][0]:.1f} ± {p['wall'][1]:.1f}{rel('wall')}",
                     f"{p['cpu'][0]:.1f} ± {p['cpu'][1]:.1f}{rel('cpu')}", f"{p['peak']:.0f}"])
    headers = ["recipe", "seeds", "accuracy %", "Δ acc (pts)", "training TFLOP (% of baseline)",
               "theoretical sparse FLOPs", "activations kept, peak step MiB (%)", "wall-clock s (%)", "CPU s (%)",
               "peak RSS MiB"]
    return headers, rows


def technique_notes(campaign) -> list[str]:
    """What each technique's telemetry says it did (one line per run kind, first seed)."""
    notes, seen = [], set()
    for r in campaign.results:
        if r.recipe in seen:
            continue
        seen.add(r.recipe)
        if _records(r, "compile"):
            last = _records(r, "compile")[-1]
            notes.append(f"{r.recipe}: eager step {1e3 * (last['eager_step_s'] or 0):.1f} ms, compiled "
                         f"{1e3 * (last['compiled_step_s'] or 0):.1f} ms, compile {last['compile_s']:.1f} s, "
                         f"recompiles {last['recompiles']}, break-even step {last['break_even_step']}")
        if _records(r, "freezing"):
            last = _records(r, "freezing")[-1]
            skipped = sum(x.get("prefix_samples_skipped", 0) for x in _records(r, "freezing"))
            extra = f", prefix forwards skipped for {skipped} samples" if "cache_depth" in last else ""
            notes.append(f"{r.recipe}: {last['n_frozen']} layers frozen at the end{extra}")
        for source in ("stochastic_depth", "progressive_layer_drop"):
            if _records(r, source):
                fracs = [e["flops_saved_frac"] for e in _records(r, source)]
                notes.append(f"{r.recipe}: block FLOPs skipped per epoch {', '.join(f'{f:.0%}' for f in fracs)}")
        if _records(r, "growth"):
            ev = _records(r, "growth", "event")
            notes.append(f"{r.recipe}: grew to {ev[-1]['n_blocks'] if ev else '?'} blocks, max output change "
                         f"{max((e['max_abs_change'] for e in ev), default=0):.1e}, training FLOPs "
                         f"{_records(r, 'growth')[-1]['saved_frac']:.0%} below the grown model's throughout")
        if _records(r, "autocast"):
            notes.append(f"{r.recipe}: {_meta(r, 'autocast').get('note')}")
        if _meta(r, "checkpointing"):
            m = _meta(r, "checkpointing")
            notes.append(f"{r.recipe}: checkpointed {m.get('checkpointed')}, estimated {m.get('saved_mb', 0):.1f} "
                         f"of {m.get('activation_mb', 0):.1f} MiB of activations freed")
    return notes


def print_results(path) -> None:
    """The tables of a finished campaign, from its results.json (no training)."""
    import json
    from types import SimpleNamespace

    data = json.loads(open(path).read())
    campaign = SimpleNamespace(results=[SimpleNamespace(**r) for r in data["runs"]])
    print(table(*model_rows(campaign)) + "\n")
    print("\n".join(technique_notes(campaign)))
    for f in data.get("failures", []):
        print(f"failed: {f['recipe']} (seed {f['seed']}): {f.get('error_type')}: {f.get('error')}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--task", default="fashion-mnist", choices=["fashion-mnist", "mnist1d", "pysource"])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--n-samples", type=int, default=None, help="training subset / characters (pysource)")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--bs", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--device", default=None)
    parser.add_argument("--flop-every", type=int, default=8, help="count FLOPs on every n-th training step")
    parser.add_argument("--recipes", nargs="+", default=None, help="a subset of the recipes (by name)")
    parser.add_argument("--from-results", default=None, help="print the tables of a campaign's results.json again")
    args = parser.parse_args(argv)
    apply_threads(args)
    if args.from_results:
        return print_results(args.from_results)

    from effilab import datasets
    from effilab.bench import run

    recipes = TEXT_RECIPES if args.task == "pysource" else IMAGE_RECIPES
    if args.recipes:
        unknown = set(args.recipes) - {n for n, _ in recipes}
        if unknown:
            raise SystemExit(f"unknown recipes {sorted(unknown)}; this task's recipes: {[n for n, _ in recipes]}")
        recipes = [r for r in recipes if r[0] in args.recipes]
    seeds, epochs, n = args.seeds, args.epochs, args.n_samples
    if args.quick:
        seeds, epochs, n = [0], 2, 2048 if args.task != "pysource" else 60_000
    name = f"model_centric_{args.task.replace('-', '_')}" + ("_quick" if args.quick else "")
    if args.recipes:  # a subset does not overwrite the whole campaign's results
        name += "_" + "_".join("".join(c for c in r if c.isalnum() or c == "_") for r in args.recipes)
    if args.task == "pysource":
        task = datasets.pysource(seq_len=64, max_bytes=n or 400_000)
    elif args.task == "fashion-mnist":
        try:
            task = datasets.fashion_mnist(subset=n, seed=0)
        except datasets.DatasetUnavailable as e:
            raise SystemExit(f"Fashion-MNIST is missing: {e}\n(or run with --task mnist1d)") from None
    else:
        task = datasets.mnist1d(n_samples=n or 20_000, seed=0)
    _flop_component()
    specs = [{"name": rn, "components": comps + [f"flop_count(every={args.flop_every})"]} for rn, comps in recipes]
    campaign = run(task, specs, seeds=seeds, epochs=epochs, bs=args.bs, lr=args.lr, width=args.width,
                   device=args.device, threads=args.threads, out=OUT_DIR / name, overwrite=True, progress="lines")
    headers, rows = model_rows(campaign)
    text = table(headers, rows)
    notes = technique_notes(campaign)
    failures = [f"{f.recipe} (seed {f.seed}): {f.error_type}: {f.error}" for f in campaign.failures]
    print(f"\n{text}\n")
    print("\n".join(notes))
    if failures:
        print("\nfailed runs:\n" + "\n".join(failures))
    budget = "not yet measured: `effilab bench --budget` is not in this version of the bench"
    setting = {"task": task.name, "n_train": len(task.train), "n_valid": len(task.valid), "epochs": epochs,
               "seeds": seeds, "bs": args.bs, "lr": args.lr, "width": args.width, "flop_every": args.flop_every}
    path = write_json(name, {"setting": setting, "table": text, "notes": notes, "failures": failures,
                             "budget_matched": budget, "summary": campaign.summary})
    print(f"\nbudget-matched baseline: {budget}\nwrote {path} and {campaign.results_path}")


if __name__ == "__main__":
    main()
