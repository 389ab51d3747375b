"""System-centric techniques, measured: activation checkpointing (memory, time), data loaders (samples/s),
and data parallelism on CPU processes (the same result as one process; time per epoch).

    python -m benchmarks.system_centric [--quick] [--parts checkpointing loaders ddp] [--device cuda]

- checkpointing: the arms of `benchmarks/checkpointing.py` (no checkpointing, every block, every 2nd block,
  selective, a budget of half the activations), each in its own process through that script's `--child`:
  peak memory over the base (RSS on CPU, allocated CUDA memory on a GPU) and step time.
- loaders: one epoch of batches (no model) through fastai's `DataLoader` with per-image augmentation
  (random flip, translate by up to 2 px) and `num_workers` 0, 1 and 2, against effilab's device-resident
  `DeviceDataLoaders` with the same augmentation as batched tensor ops: the arms and timer of
  `benchmarks/device_loader.py` (which also times a short fit), on Fashion-MNIST. Samples per second and
  CPU time (the workers' included), medians over repeats.
- ddp: a plain PyTorch loop (MLP on MNIST-1D, SGD with momentum) under `torchrun` with 1 and 2 processes
  and the same global batch: each rank takes `global_bs / world` samples per step from a
  `DistributedSampler` (strided shards, so that the union of the ranks' batches is the one-process batch)
  and `DistributedDataParallel` averages the gradients. Reported: the largest weight difference to the
  one-process run after training, the final accuracies, and the time per epoch (wall-clock and CPU, median
  over epochs, slowest rank).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import add_common_args, apply_threads, machine, machine_line, median, table, write_json

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("checkpointing", "loaders", "ddp")


# --------------------------------------------------------------------------------------------- checkpointing


def checkpointing(args) -> dict:
    from benchmarks.checkpointing import ARMS, sizes

    size = sizes(args.quick)
    results = []
    for arm in ARMS:
        cmd = [sys.executable, "-m", "benchmarks.checkpointing", "--child", arm, "--steps", str(args.steps),
               "--device", args.device, "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
        # Every tensor of 64 KiB or more its own mapping: RSS follows the live tensors (see checkpointing.py).
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env, cwd=ROOT)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = results[0]
    cuda = args.device.startswith("cuda")
    rows = [[r["arm"], f"{len(r['checkpointed'])}/{size['n_layer']}", f"{r['kept_mb_estimated']:.1f}",
             f"{r['cuda_peak_over_base_mb'] if cuda else r['peak_over_base_mb']:.1f}",
             f"{1e3 * median(r['step_s']):.1f}", f"{1e3 * min(r['step_cpu_s']):.1f}",
             f"{min(r['step_cpu_s']) / min(base['step_cpu_s']):.2f}x"] for r in results]
    headers = ["arm", "blocks", "activations kept (counted) MB",
               "CUDA peak over base MB" if cuda else "peak RSS over base MB", "step ms (median)",
               "step CPU ms (min)", "step time vs none (min CPU)"]
    title = (f"char transformer d_model={size['d_model']}, {size['n_layer']} layers, seq {size['seq']}, "
             f"batch {size['bs']}, AdamW; {args.steps} timed steps per arm")
    return {"title": title, "table": table(headers, rows), "size": size, "results": results}


# --------------------------------------------------------------------------------------------- loaders


def loaders(args) -> dict:
    """One epoch of batches, no model, through the loaders of `benchmarks/device_loader.py` (its arms and timer)."""
    from benchmarks.device_loader import PAD, device_dls, fastai_dls, time_epoch
    from effilab.datasets import DatasetUnavailable, fashion_mnist

    n, bs, repeats = (2_000, 256, 2) if args.quick else (10_000, 256, 3)
    try:
        task = fashion_mnist(subset=n, seed=0)
    except DatasetUnavailable as e:
        return {"title": "skipped", "table": f"loaders: Fashion-MNIST is not on this machine ({e})", "results": {}}
    arms = {f"fastai DataLoader, per-item augmentation, num_workers={w}": fastai_dls(task, bs, w, args.device, 0)
            for w in (0, 1, 2)}
    arms["effilab DeviceDataLoaders, batched augmentation on the device"] = device_dls(task, bs, args.device, 0)
    for dls in arms.values():  # warm-up: worker start-up, allocator, first touch of the data
        time_epoch(dls, args.device)
    results = {name: [] for name in arms}
    for _ in range(repeats):  # arms interleaved: a busy spell of the shared machine hits all of them
        for name, dls in arms.items():
            results[name].append(time_epoch(dls, args.device))
    base_cpu = median([r["cpu"] for r in next(iter(results.values()))])
    rows = []
    for name, runs in results.items():
        wall, cpu, samples = median([r["wall"] for r in runs]), median([r["cpu"] for r in runs]), runs[0]["samples"]
        rows.append([name, samples, f"{samples / wall:,.0f}", f"{1e3 * wall:.0f}", f"{1e3 * cpu:.0f}",
                     f"{samples / cpu:,.0f}", f"{cpu / base_cpu:.2f}x"])
    # On a shared machine wall-clock follows the load; CPU time (the workers' included) is the steadier cost.
    headers = ["loader", "samples/epoch", "samples/s (median)", "epoch ms (median)", "epoch CPU ms with workers",
               "samples per CPU s", "CPU vs num_workers=0"]
    title = (f"{n} Fashion-MNIST images, batches of {bs}, random flip + translate by up to {PAD} px; one epoch of "
             f"batches, no model; medians of {repeats} after a warm-up epoch, device {args.device}")
    return {"title": title, "table": table(headers, rows), "results": results}


# --------------------------------------------------------------------------------------------- ddp


def ddp_worker(out: Path, epochs: int, global_bs: int, n_samples: int) -> None:
    """One rank (under torchrun): train, time each epoch, save the weights and times."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, DistributedSampler

    from effilab import datasets

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    task = datasets.mnist1d(n_samples=n_samples, seed=0)
    sampler = DistributedSampler(task.train, num_replicas=world, rank=rank, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(task.train, batch_size=global_bs // world, sampler=sampler, drop_last=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    walls, cpus, first_step = [], [], None
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            if first_step is None:
                first_step = [p.detach().clone() for p in model.module.parameters()]
        dist.barrier()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    with torch.no_grad():
        xv, yv = task.valid[:]
        acc = (model.module(xv).argmax(1) == yv).float().mean().item()
    torch.save({"rank": rank, "world": world, "wall_s": walls, "cpu_s": cpus, "accuracy": acc,
                "steps_per_epoch": len(loader),
                "params": [p.detach().clone() for p in model.module.parameters()], "params_step1": first_step},
               out / f"rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp(args) -> dict:
    epochs, global_bs, n_samples = (2, 64, 2_000) if args.quick else (4, 128, 10_000)
    if args.device != "cpu":
        return {"title": "skipped", "table": "DDP part: CPU processes (gloo) only; on GPUs use torchrun with NCCL.",
                "results": {}}
    runs = {}
    for world in (1, 2):
        with tempfile.TemporaryDirectory(prefix="effilab-ddp-") as tmp:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", f"--nproc_per_node={world}",
                   "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "benchmarks.system_centric",
                   "--ddp-worker", tmp, "--epochs", str(epochs), "--global-bs", str(global_bs),
                   "--n-samples", str(n_samples)]
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True, text=True)
            total = time.perf_counter() - t0
            ranks = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world)]
        runs[world] = {"ranks": ranks, "launch_total_s": total}
    one, two = runs[1]["ranks"][0], runs[2]["ranks"]

    def max_diff(key):
        return max((a - b).abs().max().item() for r in two for a, b in zip(r[key], one[key]))

    diff, diff1 = max_diff("params"), max_diff("params_step1")
    rank_diff = max((a - b).abs().max().item() for a, b in zip(two[0]["params"], two[1]["params"]))
    def epoch_s(run, key):  # per epoch the slowest rank; the median over epochs
        return median([max(r[key][e] for r in run["ranks"]) for e in range(epochs)])

    rows = []
    for world, run in runs.items():
        r0 = run["ranks"][0]
        rows.append([world, f"{global_bs // world} x {world}", r0["steps_per_epoch"], f"{100 * r0['accuracy']:.2f}",
                     "—" if world == 1 else f"{diff1:.1e}", "—" if world == 1 else f"{diff:.1e}",
                     f"{epoch_s(run, 'wall_s'):.2f}",
                     f"{epoch_s(run, 'cpu_s'):.2f}", f"{epoch_s(runs[1], 'wall_s') / epoch_s(run, 'wall_s'):.2f}x",
                     f"{run['launch_total_s']:.1f}"])
    headers = ["processes", "batch per rank x ranks", "steps/epoch", "valid accuracy %",
               "max weight diff to 1 process, after step 1", "... after training", "epoch s (median, slowest rank)",
               "epoch CPU s (median, max rank)", "speed-up vs 1", "torchrun total s"]
    title = (f"MNIST-1D ({n_samples} samples), MLP 40-256-256-10, SGD lr 0.05 momentum 0.9, global batch "
             f"{global_bs}, {epochs} epochs, gloo; ranks agree to {rank_diff:.1e}")
    for run in runs.values():
        for r in run["ranks"]:
            r.pop("params"), r.pop("params_step1")
    return {"title": title, "table": table(headers, rows), "max_weight_diff": diff, "max_weight_diff_step1": diff1,
            "rank_weight_diff": rank_diff,
            "results": {str(k): v for k, v in runs.items()}}


# --------------------------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--device", default="cpu", help="cpu or cuda (checkpointing and loaders; ddp runs on CPU)")
    parser.add_argument("--steps", type=int, default=5, help="checkpointing: timed steps per arm")
    parser.add_argument("--ddp-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--global-bs", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--n-samples", type=int, default=2_000, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    apply_threads(args)
    if args.ddp_worker:
        ddp_worker(Path(args.ddp_worker), args.epochs, args.global_bs, args.n_samples)
        return {}
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    parts = {"checkpointing": checkpointing, "loaders": loaders, "ddp": ddp}
    out = {}
    print(machine_line(machine()))
    for name in args.parts:
        out[name] = parts[name](args)
        print(f"\n## {name}: {out[name]['title']}\n\n{out[name]['table']}", flush=True)
    path = write_json("system_centric" + ("_quick" if args.quick else ""), out)
    print(f"\nwrote {path}")
    return out


if __name__ == "__main__":
    main()
