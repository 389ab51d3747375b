"""Sequence-length warmup on the character corpus: wall-clock to the same loss, and stability at a high LR.

A small causal transformer (`effilab.datasets.char_transformer`) learns the next character of the Python
standard library's own sources (`effilab.datasets.pysource`, no download). For each learning rate and
seed, two fits start from the same weights and data order: full-length sequences from the first step
(**baseline**) and `SeqLenWarmup` (8 tokens growing to the full length over the first `--warmup-frac`
of the fit). Both use `fit_one_cycle` with a short learning-rate warm-up (`pct_start` 0.05), so the
sequence length is the only warm-up that differs. Validation (full length, every `--evals` per epoch)
gives the loss curve; the wall-clock to reach the baseline's final loss is read off it (interpolated).

Published expectation (Li, Zhang & He 2022): up to 3.7x less wall-clock to the same loss on GPT
pre-training, and stable training at learning rates where the baseline diverges. A run counts as
diverged when its final validation loss is not finite or above the unigram entropy of the corpus
(what a model that learned nothing beyond character frequencies gets).

    python -m benchmarks.seq_len_warmup [--quick] [--device cuda] [--lrs 2e-3 1e-2]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from benchmarks.common import (
    add_common_args,
    apply_threads,
    machine,
    machine_line,
    mean_std,
    skip_validation,
    table,
    write_json,
)


def unigram_entropy(task) -> float:
    counts = torch.bincount(task.train.tokens, minlength=task.n_classes).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def valid_every(k: int, valid_dl, loss_func, curve: list):
    """A callback appending the validation loss (full-length sequences) `k` times per epoch to `curve`,
    with the training wall-clock so far (evaluations excluded)."""
    from fastai.callback.core import Callback

    class _Eval(Callback):
        order = 200

        def before_fit(self):
            self.t0 = time.perf_counter()
            self.paused = 0.0

        def after_batch(self):
            if not self.training:
                return
            n = self.learn.n_iter
            if (self.learn.iter + 1) % max(1, n // k) and self.learn.iter != n - 1:
                return
            if self.learn.dls.device.type == "cuda":
                torch.cuda.synchronize()
            t_eval = time.perf_counter()
            model = self.learn.model
            model.eval()
            total, count = 0.0, 0
            with torch.no_grad():
                for xb, yb in valid_dl:
                    out = model(xb)
                    total += float(loss_func(out, yb)) * xb.shape[0]
                    count += xb.shape[0]
            model.train()
            curve.append({"pct": float(self.learn.pct_train), "time_s": t_eval - self.t0 - self.paused,
                          "valid_loss": total / count})
            self.paused += time.perf_counter() - t_eval  # evaluation time is not training time

    return _Eval()


def fit(task, args, lr: float, seed: int, warmup: bool) -> dict:
    import fastai.callback.schedule  # noqa: F401
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.torch_core import set_seed

    from effilab.data import SeqLenWarmup
    from effilab.datasets import char_transformer

    set_seed(seed)
    dls = task.dataloaders(bs=args.bs, seed=seed, device=args.device)
    model = char_transformer(task.n_classes, d_model=args.d_model, n_layer=args.n_layer, n_head=args.n_head,
                             max_len=args.seq_len)
    curve: list[dict] = []
    loss_func = CrossEntropyLossFlat()
    cbs = [valid_every(args.evals, dls.valid, loss_func, curve), skip_validation()]  # our own validation
    if warmup:
        cbs.append(SeqLenWarmup(start=8, warmup_frac=args.warmup_frac))
    learn = Learner(dls, model, loss_func=loss_func, cbs=cbs)
    t0 = time.perf_counter()
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(args.epochs, lr, pct_start=0.05)
    if dls.device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    tokens = (learn.telemetry.records("seq_len_warmup", "epoch")[-1]["tokens_forwarded_total"] if warmup
              else args.epochs * len(dls.train) * args.bs * args.seq_len)
    return {"lr": lr, "seed": seed, "recipe": "warmup" if warmup else "baseline", "wall_s": wall,
            "train_s": curve[-1]["time_s"], "tokens": tokens, "final_loss": curve[-1]["valid_loss"],
            "curve": curve}


def time_to(curve: list[dict], target: float) -> float | None:
    """Training seconds at which the validation loss first reaches `target` (linear between evaluations)."""
    prev = {"time_s": 0.0, "valid_loss": math.inf}
    for point in curve:
        if point["valid_loss"] <= target:
            if not math.isfinite(prev["valid_loss"]):
                return point["time_s"]
            frac = (prev["valid_loss"] - target) / (prev["valid_loss"] - point["valid_loss"])
            return prev["time_s"] + frac * (point["time_s"] - prev["time_s"])
        prev = point
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--lrs", type=float, nargs="+", default=[2e-3, 1e-2])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--bs", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-bytes", type=int, default=2_000_000)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--warmup-frac", type=float, default=0.3)
    p.add_argument("--evals", type=int, default=4, help="validations per epoch")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    apply_threads(args)
    if args.quick:
        args.lrs, args.seeds, args.epochs, args.max_bytes, args.seq_len = [2e-3], [0], 2, 120_000, 64
        args.d_model, args.evals = 32, 2
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from effilab.datasets import pysource

    task = pysource(seq_len=args.seq_len, max_bytes=args.max_bytes)
    task.valid = torch.utils.data.Subset(task.valid, range(min(len(task.valid), 256)))
    chance = unigram_entropy(task)
    name = "seq_len_warmup" + ("_quick" if args.quick else "")
    runs = []
    t_start = time.perf_counter()
    for lr in args.lrs:
        for seed in args.seeds:
            order = (False, True) if seed % 2 == 0 else (True, False)  # alternate who runs first
            for warmup in order:
                r = fit(task, args, lr, seed, warmup)
                r["diverged"] = not (math.isfinite(r["final_loss"]) and r["final_loss"] < chance)
                runs.append(r)
                print(f"[{time.perf_counter() - t_start:6.0f}s] lr {lr:g} seed {seed} {r['recipe']:8s} "
                      f"valid loss {r['final_loss']:.3f}  tokens {r['tokens']:,}  {r['wall_s']:.1f}s", flush=True)
    rows, summary = [], {}
    for lr in args.lrs:
        base = {r["seed"]: r for r in runs if r["lr"] == lr and r["recipe"] == "baseline"}
        for recipe in ("baseline", "warmup"):
            rs = [r for r in runs if r["lr"] == lr and r["recipe"] == recipe]
            # Paired per seed: the warmup run's time to the baseline run's final loss.
            speedups = []
            for r in rs:
                b = base[r["seed"]]
                if recipe == "baseline" or b["diverged"]:
                    continue
                t = time_to(r["curve"], b["final_loss"])
                if t is not None and t > 0:
                    speedups.append(b["train_s"] / t)
            s = {"final_loss": mean_std([r["final_loss"] for r in rs]),
                 "tokens_frac": mean_std([r["tokens"] / base[r["seed"]]["tokens"] for r in rs]),
                 "wall_frac": mean_std([r["wall_s"] / base[r["seed"]]["wall_s"] for r in rs]),
                 "diverged": sum(r["diverged"] for r in rs), "runs": len(rs),
                 "speedup_to_baseline_loss": mean_std(speedups) if speedups else None,
                 "reached_baseline_loss": len(speedups)}
            summary[f"{recipe}@{lr:g}"] = s
            sp = s["speedup_to_baseline_loss"]
            rows.append([f"{lr:g}", recipe, f"{s['final_loss'][0]:.3f} ± {s['final_loss'][1]:.3f}",
                         f"{100 * s['tokens_frac'][0]:.0f}%", f"{100 * s['wall_frac'][0]:.0f}%",
                         "—" if sp is None else f"{sp[0]:.2f}x ({s['reached_baseline_loss']}/{len(rs)})",
                         f"{s['diverged']}/{len(rs)}"])
    text = table(["lr", "recipe", "final valid loss", "tokens fwd (% of baseline)", "wall (% of baseline)",
                  "speed-up to baseline's final loss (seeds reaching it)", "diverged"], rows)
    m = machine()
    print(f"\n{machine_line(m)}; device {args.device}\nunigram entropy of the corpus: {chance:.3f} nats\n\n{text}")
    setting = {k: (str(v) if k == "device" else v) for k, v in vars(args).items()}
    path = write_json(name, {"setting": setting, "unigram_entropy": chance, "runs": runs, "summary": summary,
                             "table": text})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
