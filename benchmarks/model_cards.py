"""The numbers quoted in the method cards of Autocast and LayerFreezing, measured on this machine.

1. bf16 autocast: training-step time (forward, loss, backward, SGD step) of `small_model`'s 3-conv CNN on
   1x28x28 inputs, fp32 and bf16 steps interleaved, medians over repeats, CPU time beside wall-clock.
2. Layer freezing: forward and backward FLOPs of the same CNN (torch.utils.flop_counter) with the first k of
   its 7 layers frozen, i.e. what freezing really skips.

    python -m benchmarks.model_cards [--quick]     # writes benchmarks/out/model_cards.json
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import add_common_args, apply_threads, machine, machine_line, median, table, write_json
from effilab.core.freezing import PrefixFreezer, forward_layers
from effilab.core.precision import cpu_fast_bf16
from effilab.datasets import small_model


class _Task:
    input_shape, n_classes, kind = (1, 28, 28), 10, "classification"


def autocast_steps(batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = small_model(_Task())
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))

    def step(dtype):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    times = {"fp32": [], "bf16": []}
    cpu = {"fp32": [], "bf16": []}
    for dtype in ("fp32", "bf16", "fp32", "bf16"):  # warm-up
        step(dtype)
    for _ in range(repeats):
        for dtype in ("fp32", "bf16"):
            t0, c0 = time.perf_counter(), time.process_time()
            step(dtype)
            times[dtype].append(time.perf_counter() - t0)
            cpu[dtype].append(time.process_time() - c0)
    out = {d: {"wall_s": median(times[d]), "cpu_s": median(cpu[d])} for d in times}
    out["ratio_wall"] = out["bf16"]["wall_s"] / out["fp32"]["wall_s"]
    out["ratio_cpu"] = out["bf16"]["cpu_s"] / out["fp32"]["cpu_s"]
    return out


def freezing_flops(batch: int) -> list[dict]:
    torch.manual_seed(0)
    model = small_model(_Task())
    layers = forward_layers(model)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    rows = []
    for k in range(len(layers)):
        freezer = PrefixFreezer(layers)
        freezer.freeze_to(k)
        with FlopCounterMode(display=False) as fwd:
            loss = F.cross_entropy(model(x), y)
        with FlopCounterMode(display=False) as bwd:
            loss.backward()
        freezer.restore(training=True)
        model.zero_grad(set_to_none=True)
        rows.append({"frozen": k, "last_frozen": layers[k - 1][0] if k else "-",
                     "forward_flops": fwd.get_total_flops(), "backward_flops": bwd.get_total_flops()})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    args = parser.parse_args()
    apply_threads(args)
    m = machine()
    fast, found = cpu_fast_bf16()
    amp = autocast_steps(batch=128, repeats=5 if args.quick else 15)
    flops = freezing_flops(batch=64)
    write_json("model_cards", {"machine": m, "cpu_fast_bf16": [fast, found], "autocast": amp, "freezing": flops})
    print(machine_line(m))
    print(f"\nbf16 autocast (fast bf16 on this CPU: {fast}, {found}); CNN 1x28x28, batch 128, median step")
    print(table(["dtype", "wall ms", "CPU ms"],
                [[d, f"{amp[d]['wall_s'] * 1e3:.1f}", f"{amp[d]['cpu_s'] * 1e3:.1f}"] for d in ("fp32", "bf16")]))
    print(f"bf16/fp32 step time: {amp['ratio_wall']:.2f} wall-clock, {amp['ratio_cpu']:.2f} CPU")
    base = flops[0]
    base_step = base["forward_flops"] + base["backward_flops"]
    print("\nLayer freezing: FLOPs of one training step, CNN 1x28x28, batch 64")
    print(table(["frozen layers", "last frozen", "forward MFLOP", "backward MFLOP", "backward saved", "step saved"],
                [[r["frozen"], r["last_frozen"], f"{r['forward_flops'] / 1e6:.1f}",
                  f"{r['backward_flops'] / 1e6:.1f}",
                  f"{1 - r['backward_flops'] / base['backward_flops']:.1%}",
                  f"{1 - (r['forward_flops'] + r['backward_flops']) / base_step:.1%}"]
                 for r in flops]))


if __name__ == "__main__":
    main()
