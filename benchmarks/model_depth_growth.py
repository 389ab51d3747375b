"""What stochastic depth, model growth and the residual inits save, measured on the CPU in plain PyTorch.

1. **Stochastic depth step cost.** One training step (forward, backward, SGD) of `resnet_small` on a batch of
   28x28 images: the plain model, block-wise dropping and per-sample-subset dropping at the same keep
   probabilities (linear decay to `--final-keep`). Interleaved repeats, medians of wall-clock and CPU time, and
   the FLOPs the dropper counted as skipped.
2. **Growth compute.** Training FLOPs per sample (`torch.utils.flop_counter`) of the small and the grown
   `resnet_small` (deepen at 25% and 50% of the run), the planned saving against the grown model throughout.
3. **Residual inits at step 0.** Activation scale at the last residual block of a deep residual MLP without
   normalisation: default init, Fixup, ReZero gates (signal propagation, `effilab.core.init.signal_propagation`).

    python -m benchmarks.model_depth_growth [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import add_common_args, apply_threads, machine, machine_line, median, table, write_json
from effilab.core.depth import DepthDropper, linear_decay_keep
from effilab.core.growth import grow_blocks, train_flops_per_sample
from effilab.core.init import fixup_, insert_gates, signal_propagation
from effilab.core.residual import Residual, residual_blocks
from effilab.datasets import ResNetSmall


def depth_step_costs(args) -> list[dict]:
    torch.manual_seed(0)
    base = ResNetSmall(1, 10, width=args.width, stages=(args.blocks, args.blocks), first_stride=2)
    x, y = torch.randn(args.bs, 1, 28, 28), torch.randint(0, 10, (args.bs,))
    keep = linear_decay_keep(len(residual_blocks(base)), args.final_keep)
    setups = {}
    for mode in ("plain", "block", "sample"):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), 0.01)
        dropper = None if mode == "plain" else DepthDropper(model, mode, seed=0)
        setups[mode] = [model, opt, dropper, 0]

    def step(mode):
        model, opt, dropper, i = setups[mode]
        if dropper is not None:
            dropper.begin_step(i, keep)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        setups[mode][3] = i + 1

    for mode in setups:  # warm-up
        step(mode)
    wall = {m: [] for m in setups}
    cpu = {m: [] for m in setups}
    order = list(setups)
    for r in range(args.repeats):  # interleaved, rotating order
        for mode in order[r % 3:] + order[:r % 3]:
            t0, c0 = time.perf_counter(), time.process_time()
            step(mode)
            wall[mode].append(time.perf_counter() - t0)
            cpu[mode].append(time.process_time() - c0)
    rows = []
    for mode, (_, _, dropper, _) in setups.items():
        s = dropper.epoch_summary() if dropper else None
        rows.append({"mode": mode, "wall_ms": 1e3 * median(wall[mode]), "cpu_ms": 1e3 * median(cpu[mode]),
                     "block_flops_skipped_frac": s["flops_skipped"] / s["flops_blocks"] if s else 0.0,
                     "expected_skipped_frac": 1 - sum(keep) / len(keep) if dropper else 0.0})
    return rows


def growth_compute(args) -> dict:
    torch.manual_seed(0)
    model = ResNetSmall(1, 10, width=args.width, stages=(1, 1), first_stride=2)
    x = torch.randn(2, 1, 28, 28)
    stages = [train_flops_per_sample(model, x)]
    for event in range(2):
        grow_blocks(model, "deepen", 2.0, torch.Generator().manual_seed(event), 0.0)
        stages.append(train_flops_per_sample(model, x))
    bounds = [0.0, 0.25, 0.5, 1.0]
    spent = sum(f * (b - a) for f, a, b in zip(stages, bounds[:-1], bounds[1:]))
    return {"flops_per_sample": stages, "blocks": len(residual_blocks(model)), "saving": 1 - spent / stages[-1]}


def init_scales(args) -> list[dict]:
    def deep_mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(12, 64), *[Residual(nn.Sequential(nn.Linear(64, 64), nn.ReLU(),
                                                                         nn.Linear(64, 64)))
                                                  for _ in range(args.depth)], nn.Linear(64, 4))

    x, y = torch.randn(256, 12), torch.randint(0, 4, (256,))
    rows = []
    for name, prepare in (("default", lambda m: None), ("fixup", fixup_), ("rezero", lambda m: insert_gates(m, 0.0))):
        model = deep_mlp()
        prepare(model)
        table_rows = signal_propagation(model, x, y)
        blocks = [r for r in table_rows if r["kind"] == "Residual"]
        rows.append({"init": name, "first_block_act_std": blocks[0]["act_std"],
                     "last_block_act_std": blocks[-1]["act_std"],
                     "first_layer_weight_grad": table_rows[0]["weight_grad_norm"]})
    return rows


def init_steps_to_target(args) -> list[dict]:
    """Steps of SGD until a deep residual MLP without normalisation reaches `--target-acc` on held-out data
    (checked every 10 steps), per init and seed."""
    rows = []
    for seed in range(args.seeds):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(12, 4, generator=g)
        x = torch.randn(4096, 12, generator=g)
        y = (x @ w + 0.5 * torch.randn(4096, 4, generator=g)).argmax(1)
        xt, yt, xv, yv = x[:3072], y[:3072], x[3072:], y[3072:]
        for name, prepare in (("default", lambda m: None), ("fixup", fixup_),
                              ("rezero", lambda m: insert_gates(m, 0.0))):
            torch.manual_seed(seed)
            model = nn.Sequential(nn.Linear(12, 64), *[Residual(nn.Sequential(nn.Linear(64, 64), nn.ReLU(),
                                                                              nn.Linear(64, 64)))
                                                       for _ in range(args.depth)], nn.Linear(64, 4))
            prepare(model)
            opt = torch.optim.SGD(model.parameters(), args.init_lr, momentum=0.9)
            reached = None
            for step in range(1, args.max_steps + 1):
                idx = torch.randint(0, len(xt), (64,), generator=g)
                loss = F.cross_entropy(model(xt[idx]), yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                if step % 10 == 0:
                    with torch.no_grad():
                        acc = float((model(xv).argmax(1) == yv).float().mean())
                    if not torch.isfinite(loss):
                        break
                    if acc >= args.target_acc:
                        reached = step
                        break
            rows.append({"init": name, "seed": seed, "steps": reached})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--bs", type=int, default=128)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=4, help="residual blocks per stage (two stages)")
    parser.add_argument("--final-keep", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--depth", type=int, default=32, help="residual blocks of the init MLP")
    parser.add_argument("--target-acc", type=float, default=0.85)
    parser.add_argument("--init-lr", type=float, default=0.02)
    parser.add_argument("--max-steps", type=int, default=1500)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    if args.quick:
        args.bs, args.width, args.blocks, args.repeats, args.depth = 32, 8, 2, 5, 8
        args.max_steps, args.seeds = 200, 1
    apply_threads(args)
    m = machine()
    print(machine_line(m))
    depth = depth_step_costs(args)
    plain = next(r for r in depth if r["mode"] == "plain")
    print(f"\nStochastic depth, resnet_small width {args.width}, {2 * args.blocks} blocks, batch {args.bs}, "
          f"keep linear to {args.final_keep} (median of {args.repeats} interleaved steps)\n")
    print(table(["mode", "wall ms/step", "CPU ms/step", "CPU vs plain", "block FLOPs skipped (expected)"],
                [[r["mode"], f"{r['wall_ms']:.1f}", f"{r['cpu_ms']:.1f}", f"{r['cpu_ms'] / plain['cpu_ms']:.2f}",
                  f"{r['block_flops_skipped_frac']:.1%} ({r['expected_skipped_frac']:.1%})"] for r in depth]))
    growth = growth_compute(args)
    print(f"\nGrowth (deepen at 25% and 50%): training FLOPs/sample per stage "
          f"{[f'{f / 1e6:.1f}M' for f in growth['flops_per_sample']]}, {growth['blocks']} blocks at the end, "
          f"saving vs the grown model throughout: {growth['saving']:.1%}")
    init = init_scales(args)
    print(f"\nSignal at step 0, residual MLP of {args.depth} blocks without normalisation\n")
    print(table(["init", "act std, first block", "act std, last block", "first layer weight-grad norm"],
                [[r["init"], f"{r['first_block_act_std']:.3g}", f"{r['last_block_act_std']:.3g}",
                  f"{r['first_layer_weight_grad']:.3g}"] for r in init]))
    steps = init_steps_to_target(args)
    print(f"\nSteps to {args.target_acc:.0%} held-out accuracy (SGD lr {args.init_lr}, momentum 0.9, batch 64; "
          f"None: not within {args.max_steps} steps or diverged), per seed\n")
    print(table(["init", "steps per seed"], [[name, [r["steps"] for r in steps if r["init"] == name]]
                                             for name in ("default", "fixup", "rezero")]))
    path = write_json("model_depth_growth" + ("_quick" if args.quick else ""),
                      {"args": vars(args), "depth": depth, "growth": growth, "init": init, "steps_to_target": steps})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
