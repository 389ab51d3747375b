"""The device-resident loader against fastai's DataLoader with 0, 1 and 2 worker processes, on Fashion-MNIST.

Both loaders serve the same normalised training images with the same augmentation: a random horizontal flip
and a random translation by up to 2 pixels (reflect padding). fastai's loader applies it per image in
`after_item` (torchvision's `RandomHorizontalFlip` + `RandomCrop(padding_mode="reflect")`, the usual
per-item path) and collates; effilab's `DeviceDataLoaders` gathers each batch from the tensors on the
device and augments it as a batch. Two measures, medians over repeats:
- an epoch: iterate the training loader once (shuffled, augmented; batches on the device), no model;
- a short fit: one epoch of `learn.fit` of effilab's small CNN (validation included).
Wall-clock beside CPU time (this process plus its finished worker processes, `os.times`); samples/s from
the wall-clock. `--device cuda` runs the same comparison with the batches on the GPU.

    python -m benchmarks.device_loader [--quick] [--device cuda] [--n 10000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from benchmarks.common import add_common_args, apply_threads, machine, machine_line, median, table, write_json
from effilab.core.device_data import Augment
from effilab.datasets import ArrayDataset, fashion_mnist, small_model
from effilab.system import DeviceDataLoaders

PAD = 2


class ItemAugment:
    """fastai `after_item`: flip and translate one (x, y) item, as torchvision transforms do per image."""

    def __init__(self, size):
        from torchvision.transforms import v2

        self.tfm = v2.Compose([v2.RandomHorizontalFlip(), v2.RandomCrop(size, padding=PAD, padding_mode="reflect")])

    def __call__(self, item):
        x, y = item
        return self.tfm(x), y


def fastai_dls(task, bs: int, workers: int, device: str, seed: int):
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader

    train = DataLoader(ArrayDataset(task.train.x, task.train.y), bs=bs, shuffle=True, drop_last=True,
                       num_workers=workers, after_item=ItemAugment(task.input_shape[-2:]), device=device)
    valid = DataLoader(ArrayDataset(task.valid.x, task.valid.y), bs=2 * bs, num_workers=workers, device=device)
    train.fake_l.generator = torch.Generator().manual_seed(seed)
    return DataLoaders(train, valid, device=device)


def device_dls(task, bs: int, device: str, seed: int):
    return DeviceDataLoaders.from_task(task, bs=bs, device=device, seed=seed,
                                       augment=Augment(flip=True, translate=PAD))


def _clock() -> tuple[float, float]:
    t = os.times()  # children: worker processes that have exited (fastai's end with each pass)
    return time.perf_counter(), t.user + t.system + t.children_user + t.children_system


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_epoch(dls, device: str) -> dict:
    t0, c0 = _clock()
    n = 0
    for xb, _ in dls.train:
        n += len(xb)
    _sync(device)
    t1, c1 = _clock()
    return {"wall": t1 - t0, "cpu": c1 - c0, "samples": n}


def time_fit(dls, task, device: str) -> dict:
    from fastai.callback.progress import ProgressCallback
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat

    torch.manual_seed(0)
    learn = Learner(dls, small_model(task, width=16).to(device), loss_func=CrossEntropyLossFlat())
    learn.remove_cb(ProgressCallback)
    learn.logger = lambda *a, **k: None
    _sync(device)
    t0, c0 = _clock()
    learn.fit(1, 1e-2)
    _sync(device)
    t1, c1 = _clock()
    return {"wall": t1 - t0, "cpu": c1 - c0, "samples": len(dls.train) * dls.train.bs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=10_000, help="training images (a fixed random subset)")
    parser.add_argument("--fit-n", type=int, default=4_000, help="training images for the short fit")
    parser.add_argument("--bs", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    if args.quick:
        args.n, args.fit_n, args.repeats = 2_000, 1_000, 2
    apply_threads(args)
    device = args.device

    tasks = {"epoch": fashion_mnist(subset=args.n, seed=0), "fit": fashion_mnist(subset=args.fit_n, seed=0)}
    # the short fit validates on 2,000 of the 10,000 test images, to keep it short
    fit_task = tasks["fit"]
    fit_task.valid = ArrayDataset(fit_task.valid.x[:2000], fit_task.valid.y[:2000])
    arms = [("fastai DataLoader", w) for w in args.workers] + [("effilab DeviceDataLoaders", None)]

    def make(arm, task):
        workers = arm[1]
        if workers is None:
            return device_dls(task, args.bs, device, 0)
        return fastai_dls(task, args.bs, workers, device, 0)

    runs: dict[str, dict[str, list]] = {}
    for kind, timer in (("epoch", lambda d, t: time_epoch(d, device)), ("fit", lambda d, t: time_fit(d, t, device))):
        task = tasks[kind]
        loaders = {arm: make(arm, task) for arm in arms}
        for arm in arms:  # warm-up: worker start-up code paths, allocator, first-touch of the data
            timer(loaders[arm], task)
        for _ in range(args.repeats):  # arms interleaved: a busy spell of the shared machine hits all of them
            for arm in arms:
                runs.setdefault(f"{arm[0]}|{arm[1]}", {}).setdefault(kind, []).append(timer(loaders[arm], task))

    rows, results = [], []
    for arm in arms:
        r = runs[f"{arm[0]}|{arm[1]}"]
        e_wall, e_cpu = median([x["wall"] for x in r["epoch"]]), median([x["cpu"] for x in r["epoch"]])
        f_wall, f_cpu = median([x["wall"] for x in r["fit"]]), median([x["cpu"] for x in r["fit"]])
        e_n, f_n = r["epoch"][0]["samples"], r["fit"][0]["samples"]
        workers = "-" if arm[1] is None else arm[1]
        results.append({"loader": arm[0], "workers": arm[1], "epoch": r["epoch"], "fit": r["fit"],
                        "epoch_samples_per_s": e_n / e_wall, "fit_samples_per_s": f_n / f_wall})
        rows.append([arm[0], workers, f"{e_n / e_wall:,.0f}", f"{e_wall:.3f}", f"{e_cpu:.3f}",
                     f"{f_n / f_wall:,.0f}", f"{f_wall:.2f}", f"{f_cpu:.2f}"])
    m = machine()
    print(f"\n{machine_line(m)}; device {device}; load average {m['loadavg']}")
    print(f"epoch: {args.n} Fashion-MNIST images, bs {args.bs}, flip + translate {PAD} px; fit: {args.fit_n} images, "
          f"1 epoch, small CNN (width 16), 2,000 validation images; medians of {args.repeats}\n")
    print(table(["loader", "workers", "epoch samples/s", "epoch wall s", "epoch CPU s", "fit samples/s",
                 "fit wall s", "fit CPU s"], rows))
    name = "device_loader" + ("_quick" if args.quick else "") + ("" if device == "cpu" else f"_{device}")
    path = write_json(name, {"args": vars(args), "results": results})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
