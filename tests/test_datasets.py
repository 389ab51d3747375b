"""Tests for effilab.datasets: offline loaders, splits, determinism, fastai DataLoaders, small models."""

import gzip
import math
import pickle
import random
import struct

import numpy as np
import pytest
import torch

from effilab import datasets as D

N1D = 1000  # small MNIST-1D keeps generation well under a second


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    # Never read or write the user's cache from tests.
    monkeypatch.setenv("EFFILAB_CACHE", str(tmp_path_factory.mktemp("effilab-cache")))


def _write_idx(path, arr: np.ndarray, compress: bool) -> None:
    """Write `arr` (uint8) as an IDX file: magic 0x0000_08_<ndim>, big-endian uint32 dims, raw bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _write_mnist_like(folder, n_train=20, n_valid=10, seed=0, compress_train=True, compress_valid=False):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_valid, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(n_valid, dtype=np.uint8) % 10,
    }
    for name, arr in arrays.items():
        _write_idx(folder / name, arr, compress_train if name.startswith("train") else compress_valid)
    return arrays


def _hide_debian(monkeypatch, tmp_path):
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian-here")


# ---- mnist1d


def test_mnist1d_shapes_split_and_standardisation():
    task = D.mnist1d(N1D, seed=0)
    assert (task.name, task.n_classes, task.input_shape) == ("mnist1d", 10, (40,))
    assert (len(task.train), len(task.valid)) == (800, 200)
    x, y = task.train[0]
    assert x.shape == (40,) and x.dtype == torch.float32
    assert y.shape == () and y.dtype == torch.int64
    assert set(task.train.y.tolist()) == set(range(10))
    assert abs(task.train.x.mean().item()) < 1e-4
    assert task.train.x.std().item() == pytest.approx(1.0, abs=1e-3)


def test_mnist1d_deterministic_cached_and_leaves_global_rng_alone(monkeypatch, tmp_path):
    monkeypatch.setenv("EFFILAB_CACHE", str(tmp_path))
    np_state, py_state = np.random.get_state(), random.getstate()
    a = D.mnist1d(N1D, seed=0)
    assert np.array_equal(np_state[1], np.random.get_state()[1]) and py_state == random.getstate()
    cached = list((tmp_path / "mnist1d").glob("*.npz"))
    assert len(cached) == 1 and not list((tmp_path / "mnist1d").glob("*.tmp"))
    b = D.mnist1d(N1D, seed=0)  # read back from the cache
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.valid.y, b.valid.y)
    c = D.mnist1d(N1D, seed=1)
    assert not torch.equal(a.train.x, c.train.x)
    # A damaged cache file is regenerated rather than failing.
    cached[0].write_bytes(b"not an npz")
    assert torch.equal(D.mnist1d(N1D, seed=0).train.x, a.train.x)


def test_mnist1d_rejects_bad_arguments():
    with pytest.raises(ValueError):
        D.mnist1d(N1D, valid_frac=1.0)
    with pytest.raises(ValueError):
        D.mnist1d(5)


# ---- digits


def test_digits_shapes_split_and_standardisation():
    task = D.digits(seed=0)
    assert (task.n_classes, task.input_shape) == (10, (1, 8, 8))
    assert len(task.train) + len(task.valid) == 1797
    assert len(task.valid) == pytest.approx(0.2 * 1797, abs=10)
    assert task.train.x.dtype == torch.float32 and task.train.y.dtype == torch.int64
    assert task.train.x.shape[1:] == (1, 8, 8)
    assert abs(task.train.x.mean().item()) < 1e-4
    assert task.train.x.std().item() == pytest.approx(1.0, abs=1e-3)
    # Split per class: every class keeps roughly its 20% share in valid.
    counts = torch.bincount(task.valid.y, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38


def test_digits_determinism():
    a, b, c = D.digits(seed=0), D.digits(seed=0), D.digits(seed=1)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.valid.y, b.valid.y)
    assert not torch.equal(a.valid.x, c.valid.x)


# ---- dataloaders


def test_dataloaders_batches_and_lengths():
    task = D.digits()
    dls = task.dataloaders(bs=64)
    assert dls.n_inp == 1
    assert len(dls.train) == len(task.train) // 64
    assert len(dls.valid) == math.ceil(len(task.valid) / 128)
    xb, yb = dls.train.one_batch()
    assert xb.shape == (64, 1, 8, 8) and xb.dtype == torch.float32
    assert yb.shape == (64,) and yb.dtype == torch.int64
    assert xb.device.type == "cpu"
    sizes = [len(yb) for _, yb in dls.valid]
    assert sum(sizes) == len(task.valid) and sizes[0] == 128
    assert sum(len(yb) for _, yb in dls.train) == len(dls.train) * 64  # drop_last


def test_dataloaders_seed_is_reproducible_and_local():
    task = D.mnist1d(N1D)

    def order(seed):
        dls = task.dataloaders(bs=50, seed=seed)
        return [torch.cat([yb for _, yb in dls.train]) for _ in range(2)]

    state = random.getstate()
    torch_state = torch.get_rng_state()
    e1, e2 = order(0)
    assert random.getstate() == state and torch.equal(torch.get_rng_state(), torch_state)
    f1, f2 = order(0)
    assert torch.equal(e1, f1) and torch.equal(e2, f2)
    assert not torch.equal(e1, e2)  # epochs still differ from each other
    assert not torch.equal(e1, order(1)[0])


def test_dataloaders_with_worker_processes():
    task = D.mnist1d(N1D)
    dls = task.dataloaders(bs=100, num_workers=2, seed=0)
    ys = torch.cat([yb for _, yb in dls.train])
    assert len(ys) == 800
    assert torch.equal(ys, torch.cat([yb for _, yb in task.dataloaders(bs=100, seed=0).train]))


# ---- ArrayDataset


def test_array_dataset_pickles_and_works_under_spawn():
    ds = D.ArrayDataset(torch.randn(12, 3), torch.arange(12))
    clone = pickle.loads(pickle.dumps(ds))
    assert len(clone) == 12 and torch.equal(clone[5][0], ds[5][0]) and clone[5][1].item() == 5
    with pytest.raises(ValueError):
        D.ArrayDataset(torch.zeros(3), torch.zeros(4))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1, multiprocessing_context="spawn")
    assert torch.equal(torch.cat([yb for _, yb in loader]), torch.arange(12))


# ---- registry


def test_get_task():
    assert set(D.TASKS) == {"mnist1d", "digits", "fashion-mnist", "mnist", "cifar10", "pysource"}
    assert D.get_task("digits", seed=3).name == "digits"
    with pytest.raises(ValueError) as err:
        D.get_task("imagenet")
    for name in D.TASKS:
        assert name in str(err.value)


# ---- IDX files


def test_read_idx_roundtrip_and_validation(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a-idx3-ubyte", arr, compress=True)
    out = D.read_idx(tmp_path / "a-idx3-ubyte.gz")
    assert out.dtype == np.uint8 and np.array_equal(out, arr)
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="magic"):
        D.read_idx(tmp_path / "bad")
    _write_idx(tmp_path / "short", arr, compress=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(ValueError, match="bytes"):
        D.read_idx(tmp_path / "short")


def test_mnist_from_idx_folder(tmp_path):
    raw = _write_mnist_like(tmp_path)
    task = D.mnist(root=tmp_path)
    assert (task.name, task.n_classes, task.input_shape) == ("mnist", 10, (1, 28, 28))
    assert (len(task.train), len(task.valid)) == (20, 10)
    expected = (raw["train-images-idx3-ubyte"][3] / 255.0 - 0.1307) / 0.3081
    assert torch.allclose(task.train.x[3, 0], torch.from_numpy(expected).float(), atol=1e-5)
    assert task.train.y.dtype == torch.int64 and task.train.y[3].item() == 3


def test_torchvision_layout_and_subset(tmp_path):
    _write_mnist_like(tmp_path / "MNIST" / "raw", n_train=30, compress_train=False)
    a = D.mnist(root=tmp_path, subset=12, seed=0)
    b = D.mnist(root=tmp_path, subset=12, seed=0)
    c = D.mnist(root=tmp_path, subset=12, seed=1)
    assert len(a.train) == 12 and len(a.valid) == 10
    assert torch.equal(a.train.x, b.train.x) and not torch.equal(a.train.x, c.train.x)
    with pytest.raises(ValueError):
        D.mnist(root=tmp_path, subset=31)


def test_fashion_mnist_root_takes_priority(tmp_path):
    _write_mnist_like(tmp_path, n_train=20)
    task = D.fashion_mnist(root=tmp_path)
    assert len(task.train) == 20 and task.name == "fashion-mnist"
    assert task.classes[0] == "T-shirt/top"


def test_missing_data_raises_with_instructions(tmp_path, monkeypatch):
    _hide_debian(monkeypatch, tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(D.DatasetUnavailable) as err:
        D.fashion_mnist(root=empty)
    assert isinstance(err.value, FileNotFoundError)
    assert "apt-get install dataset-fashion-mnist" in str(err.value)
    assert "root=" in str(err.value) and "download=True" in str(err.value)
    with pytest.raises(D.DatasetUnavailable, match="train-images-idx3-ubyte") as err:
        D.mnist(root=empty)
    assert "download=True" in str(err.value)
    with pytest.raises(D.DatasetUnavailable, match="cifar-10-batches-py"):
        D.cifar10(root=empty)


def test_download_goes_through_torchvision(tmp_path, monkeypatch):
    import torchvision

    _hide_debian(monkeypatch, tmp_path)
    calls = []

    class FakeFashionMNIST:
        def __init__(self, root, train=True, download=False):
            calls.append((root, download))
            _write_mnist_like(tmp_path / "dl" / "FashionMNIST" / "raw", n_train=15)

    class OfflineMNIST:
        def __init__(self, root, train=True, download=False):
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeFashionMNIST)
    monkeypatch.setattr(torchvision.datasets, "MNIST", OfflineMNIST)
    with pytest.raises(D.DatasetUnavailable):
        D.fashion_mnist(root=tmp_path / "dl")  # download=False must not call torchvision
    assert calls == []
    assert len(D.fashion_mnist(root=tmp_path / "dl", download=True).train) == 15
    assert calls == [(str(tmp_path / "dl"), True)]
    with pytest.raises(D.DatasetUnavailable, match="download"):
        D.mnist(root=tmp_path / "none", download=True)


def test_cifar10_from_batches_folder(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    # Tiny stand-in batches in the official pickle layout; torchvision's md5 check is bypassed for them.
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 9]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    first = pickle.loads((folder / "data_batch_1").read_bytes())["data"][0]

    task = D.cifar10(root=folder)  # the batches folder itself is accepted as root
    assert (len(task.train), len(task.valid), task.input_shape) == (20, 4, (3, 32, 32))
    assert task.classes[9] == "c9" and task.train.y.dtype == torch.int64
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    expected = (torch.from_numpy(first.reshape(3, 32, 32)).float() / 255 - mean) / std
    assert torch.allclose(task.train.x[0], expected, atol=1e-5)
    assert len(D.cifar10(root=tmp_path, subset=5).train) == 5


@pytest.mark.skipif(not D.DEBIAN_FASHION_MNIST.is_dir(),
                    reason=f"{D.DEBIAN_FASHION_MNIST} absent (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_from_debian_package():
    task = D.fashion_mnist()
    assert (len(task.train), len(task.valid), task.input_shape) == (60_000, 10_000, (1, 28, 28))
    assert task.train.x.dtype == torch.float32 and task.train.y.dtype == torch.int64
    assert torch.bincount(task.train.y).tolist() == [6000] * 10
    # Fixed dataset statistics: the train split comes out close to zero mean, unit std.
    assert abs(task.train.x.mean().item()) < 0.01
    assert task.train.x.std().item() == pytest.approx(1.0, abs=0.01)
    dls = task.dataloaders(bs=256)
    assert len(dls.train) == 60_000 // 256
    xb, yb = dls.valid.one_batch()
    assert xb.shape == (512, 1, 28, 28) and yb.shape == (512,)


# ---- image_folder


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            pixels = rng.integers(0, 256, (10 + i, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / cls / f"{i}.png")
    task = D.image_folder(tmp_path, size=16, valid_pct=0.2, seed=0)
    assert (task.n_classes, task.input_shape, task.classes) == (2, (3, 16, 16), ("cat", "dog"))
    assert (len(task.train), len(task.valid)) == (8, 2)
    x, y = task.valid[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert y.shape == () and y.dtype == torch.int64
    assert pickle.loads(pickle.dumps(task.train))[0][0].shape == (3, 16, 16)
    xb, yb = task.dataloaders(bs=4, seed=0).train.one_batch()
    assert xb.shape == (4, 3, 16, 16) and yb.shape == (4,)
    again = D.image_folder(tmp_path, size=16, seed=0)
    assert again.valid.indices == task.valid.indices


# ---- small_model


@pytest.mark.parametrize("shape", [(40,), (1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_small_model_forward(shape):
    task = D.TaskData(D.ArrayDataset(torch.zeros(1), torch.zeros(1)), D.ArrayDataset(torch.zeros(1),
                      torch.zeros(1)), n_classes=7, input_shape=shape, name="t")
    model = D.small_model(task)
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 7)
    assert sum(p.numel() for p in model.parameters()) < 200_000
