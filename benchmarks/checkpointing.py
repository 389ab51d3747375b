"""Activation checkpointing: peak memory against step time, for no checkpointing, every block, every second
block, selective checkpointing (matmuls kept) and the blocks chosen for a budget of half the activations.

A causal character transformer (effilab.datasets.char_transformer) trains with AdamW in a plain PyTorch
loop through `effilab.core.checkpointing`. Each arm runs in its own process so that its memory peak is its
own:
- on CPU, the peak resident set size (`ru_maxrss`) minus the RSS after the model, optimizer state and
  batch exist and one warm-up step ran. RSS is coarse: glibc keeps freed heap memory, so the base would
  already hold the warm-up step's activations. The child runs with `MALLOC_MMAP_THRESHOLD_=65536`: every
  tensor of 64 KiB or more is its own mapping, returned to the system when freed, so RSS follows the live
  tensors; and the model's activations are hundreds of MB, far above page granularity;
- on CUDA (`--device cuda`), `torch.cuda.max_memory_allocated()` over the timed steps minus the memory
  allocated before them.
Beside it: the activation bytes kept for backward as counted by `saved_tensors_hooks` (what the callback's
budget uses), and the step time over the timed steps: median wall-clock, median and minimum CPU time (one
torch thread; on a shared machine the minimum is the steadiest, and the ratio to "none" uses it).

    python -m benchmarks.checkpointing [--quick] [--device cuda] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from benchmarks.common import add_common_args, apply_threads, machine, machine_line, median, table, write_json
from effilab.core.checkpointing import checkpointed, choose_blocks, find_blocks, saved_activation_bytes
from effilab.datasets import char_transformer

ARMS = ("none", "all blocks", "every 2nd block", "selective, all blocks", "budget 50%")
MB = 2**20


def sizes(quick: bool) -> dict:
    if quick:
        return dict(d_model=64, n_layer=4, seq=64, bs=8, vocab=128)
    return dict(d_model=256, n_layer=6, seq=256, bs=16, vocab=128)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / MB


def child(arm: str, size: dict, steps: int, device: str) -> dict:
    """One arm in this process: returns its memory and times."""
    torch.manual_seed(0)
    model = char_transformer(size["vocab"], d_model=size["d_model"], n_layer=size["n_layer"], n_head=4,
                             max_len=size["seq"]).to(device)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, size["vocab"], (size["bs"], size["seq"]), generator=g).to(device)
    y = torch.randint(0, size["vocab"], (size["bs"], size["seq"]), generator=g).to(device)
    blocks = find_blocks(model)
    # Counted on 2 samples and scaled to the batch (as the callback does): a full unchecked forward here
    # would set the process's RSS high-water mark before the timed steps.
    sample, scale = (x[:2],), size["bs"] / 2
    per_block, total = saved_activation_bytes(model, blocks, sample)
    selective = arm.startswith("selective")
    if arm == "none":
        chosen = []
    elif arm == "every 2nd block":
        chosen = list(blocks)[::2]
    elif arm == "budget 50%":
        chosen = choose_blocks(per_block, total, total / 2)
    else:
        chosen = list(blocks)
    if selective:
        per_block, _ = saved_activation_bytes(model, blocks, sample, selective=True)
    total, per_block = total * scale, {n: b * scale for n, b in per_block.items()}
    est_kept = total - sum(per_block[n] for n in chosen)

    def step():
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    walls, cpus = [], []
    with checkpointed({n: blocks[n] for n in chosen}, selective=selective):
        step()  # warm-up: optimizer state and allocator caches exist from here on
        sync()
        base_rss = _rss_mb()
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if device.startswith("cuda"):
            base_cuda = torch.cuda.memory_allocated() / MB
            torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            sync()
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    out = {"arm": arm, "checkpointed": chosen, "activation_mb_counted": total / MB, "kept_mb_estimated": est_kept / MB,
           "step_s": walls, "step_cpu_s": cpus, "base_rss_mb": base_rss,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "peak_rss_before_mb": peak_before}
    out["peak_over_base_mb"] = out["peak_rss_mb"] - base_rss
    if device.startswith("cuda"):
        out["cuda_peak_over_base_mb"] = torch.cuda.max_memory_allocated() / MB - base_cuda
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per arm (after one warm-up step)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    apply_threads(args)
    size = sizes(args.quick)
    if args.child:
        print(json.dumps(child(args.child, size, args.steps, args.device)))
        return
    results = []
    for arm in ARMS:
        cmd = [sys.executable, "-m", "benchmarks.checkpointing", "--child", arm, "--steps", str(args.steps),
               "--device", args.device, "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{arm}: done", file=sys.stderr)
    base = results[0]
    cuda = args.device.startswith("cuda")
    headers = ["arm", "blocks checkpointed", "activations kept (counted) MB", "peak RSS over base MB"]
    headers += ["CUDA peak over base MB"] if cuda else []
    headers += ["step s (median)", "step CPU s (median)", "step CPU s (min)", "step time vs none (min CPU)"]
    rows = []
    for r in results:
        row = [r["arm"], f"{len(r['checkpointed'])}/{size['n_layer']}", f"{r['kept_mb_estimated']:.0f}",
               f"{r['peak_over_base_mb']:.0f}"]
        row += [f"{r['cuda_peak_over_base_mb']:.0f}"] if cuda else []
        row += [f"{median(r['step_s']):.3f}", f"{median(r['step_cpu_s']):.3f}", f"{min(r['step_cpu_s']):.3f}",
                f"{min(r['step_cpu_s']) / min(base['step_cpu_s']):.2f}x"]
        rows.append(row)
    print(f"char transformer d_model={size['d_model']} layers={size['n_layer']} seq={size['seq']} "
          f"batch={size['bs']}, AdamW, {args.steps} timed steps per arm, device {args.device}")
    print(machine_line(machine()))
    print(table(headers, rows))
    path = write_json("checkpointing" + ("_quick" if args.quick else ""), {"size": size, "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
