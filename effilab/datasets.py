"""Offline-first datasets that come back as fastai `DataLoaders` (and plain torch datasets).

Every loader returns a `TaskData`: in-memory train/valid datasets whose items are
``(x: float32 tensor, y: int64 scalar tensor)``, plus the number of classes and the input shape.
Nothing touches the network unless a loader is called with ``download=True``.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import os
import random
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from .core.residual import ResidualBlock

__all__ = [
    "ArrayDataset",
    "DatasetUnavailable",
    "TaskData",
    "TASKS",
    "CharTransformer",
    "TokenWindows",
    "char_transformer",
    "cifar10",
    "digits",
    "fashion_mnist",
    "get_task",
    "image_folder",
    "mnist",
    "mnist1d",
    "pysource",
    "read_idx",
    "resnet_small",
    "ResNetSmall",
    "small_model",
]

# Module-level so tests (and users with a different layout) can point it elsewhere.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# Fixed normalisation constants (the usual published per-dataset statistics of the train split).
MNIST_STATS = ((0.1307,), (0.3081,))
FASHION_MNIST_STATS = ((0.2860,), (0.3530,))
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
MNIST_CLASSES = tuple(str(i) for i in range(10))

_IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "valid_x": "t10k-images-idx3-ubyte",
    "valid_y": "t10k-labels-idx1-ubyte",
}
# IDX type byte -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DatasetUnavailable(FileNotFoundError):
    """The data set is not on this machine and was not allowed to (or could not) be downloaded."""


# ---- datasets


class ArrayDataset(Dataset):
    """`TensorDataset`-like pair of tensors; picklable, so it works with worker processes (fork or spawn)."""

    # fastai's DataLoader forwards unknown attributes to its dataset; this answers `dls.n_inp`
    # without fastai having to draw a batch to find out.
    n_inp = 1

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        if len(x) != len(y):
            raise ValueError(f"x and y differ in length: {len(x)} != {len(y)}")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def new_empty(self) -> ArrayDataset:
        # what `learn.export` keeps of the data: nothing but the types
        return ArrayDataset(self.x[:0], self.y[:0])

    def __repr__(self) -> str:
        return f"ArrayDataset(n={len(self)}, x={tuple(self.x.shape[1:])} {self.x.dtype}, y={self.y.dtype})"


class _IndexedFolder(Dataset):
    """Index subset of an `ImageFolder` that returns labels as int64 tensors like `ArrayDataset`."""

    n_inp = 1

    def __init__(self, folder, indices: Sequence[int]):
        self.folder, self.indices = folder, [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        x, y = self.folder[self.indices[i]]
        return x, torch.tensor(y, dtype=torch.int64)

    def __repr__(self) -> str:
        return f"_IndexedFolder(n={len(self)}, root={self.folder.root!r})"


@dataclass
class TaskData:
    """A classification task: train/valid datasets and what a model needs to know about them."""

    train: Dataset
    valid: Dataset
    n_classes: int
    input_shape: tuple[int, ...]
    name: str
    classes: tuple[str, ...] | None = None
    kind: str = "classification"  # or "language_model": x and y are (seq_len,) int64 tokens, y shifted by one

    def dataloaders(self, bs: int = 128, num_workers: int = 0, device=None, seed: int | None = None):
        """fastai `DataLoaders`: shuffled train (drop_last) and ordered valid at twice the batch size.

        With `seed`, train shuffling (and worker seeds) are reproducible and no global RNG is consumed.
        """
        from fastai.data.core import DataLoaders
        from fastai.data.load import DataLoader

        device = torch.device("cpu") if device is None else torch.device(device)
        # fastai seeds each new DataLoader from the global `random` module; put that state back so a
        # seeded call leaves the caller's RNG stream untouched.
        state = random.getstate() if seed is not None else None
        try:
            train = DataLoader(self.train, bs=bs, shuffle=True, drop_last=True, num_workers=num_workers,
                               device=device)
            valid = DataLoader(self.valid, bs=bs * 2, shuffle=False, drop_last=False, num_workers=num_workers,
                               device=device)
        finally:
            if state is not None:
                random.setstate(state)
        if seed is not None:
            train.rng = random.Random(seed)
            for i, dl in enumerate((train, valid)):
                # torch draws each iterator's worker base seed from this generator (global one if None).
                dl.fake_l.generator = torch.Generator().manual_seed(seed + i)
        return DataLoaders(train, valid, device=device)

    def __repr__(self) -> str:
        return (f"TaskData(name={self.name!r}, n_classes={self.n_classes}, input_shape={self.input_shape}, "
                f"train={len(self.train)}, valid={len(self.valid)})")


# ---- helpers


def _cache_dir() -> Path:
    return Path(os.environ.get("EFFILAB_CACHE") or Path.home() / ".cache" / "effilab")


def _data_dir() -> Path:
    """Where `download=True` puts torchvision data sets by default (and where they are looked for later)."""
    return _cache_dir() / "data"


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[torch.Tensor]:
    """Scale all arrays with the train split's scalar mean/std (keeps spatial structure intact)."""
    mean, std = float(train.mean()), float(train.std())
    std = std if std > 0 else 1.0
    return [torch.from_numpy(((a - mean) / std).astype(np.float32)) for a in (train, *others)]


def _check_frac(frac: float, name: str) -> None:
    if not 0.0 < frac < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {frac}")


def _take_subset(x: torch.Tensor, y: torch.Tensor, subset: int | None, seed: int):
    if subset is None:
        return x, y
    if not 0 < subset <= len(x):
        raise ValueError(f"subset must be in [1, {len(x)}], got {subset}")
    idx = np.sort(np.random.default_rng(seed).choice(len(x), size=subset, replace=False))
    idx = torch.from_numpy(idx)
    return x[idx].clone(), y[idx].clone()


def _images_to_tensor(images: np.ndarray, stats) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, C) -> float32 (N, C, H, W), scaled to [0, 1] then normalised."""
    t = torch.from_numpy(np.ascontiguousarray(images))
    t = t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
    t = t.float().div_(255.0)
    mean = torch.tensor(stats[0]).view(1, -1, 1, 1)
    std = torch.tensor(stats[1]).view(1, -1, 1, 1)
    return t.sub_(mean).div_(std).contiguous()


# ---- mnist1d


def _mnist1d_arrays(n_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Generate (or read back from the cache) the raw MNIST-1D arrays, x float32 (n, 40), y int64 (n,)."""
    try:
        version = importlib.metadata.version("mnist1d")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    path = _cache_dir() / "mnist1d" / f"mnist1d-{version}-n{n_samples}-seed{seed}.npz"
    if path.exists():
        try:
            with np.load(path) as f:
                return f["x"], f["y"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # a damaged cache file is simply regenerated

    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed, args.train_split = n_samples, seed, 1.0
    # make_dataset reseeds the global `random` and `np.random` generators; give the caller theirs back.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    x, y = data["x"].astype(np.float32), data["y"].astype(np.int64)

    # Generation runs at ~5k samples/s, so keep the result; write-then-rename keeps readers safe.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
            tmp = Path(f.name)
            np.savez(f, x=x, y=y)
        os.chmod(tmp, 0o644)  # NamedTemporaryFile is private (0600); the cache may be shared
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"could not cache MNIST-1D under {path.parent}: {e}", stacklevel=3)
    return x, y


def mnist1d(n_samples: int = 10_000, seed: int = 0, valid_frac: float = 0.2) -> TaskData:
    """MNIST-1D, generated locally: 10 classes of 40-long signals, standardised with train statistics.

    The generator makes ``n_samples // 10`` samples per class. Arrays are cached under
    ``$EFFILAB_CACHE`` (default ``~/.cache/effilab``).
    """
    if n_samples < 10:
        raise ValueError(f"n_samples must be at least 10, got {n_samples}")
    _check_frac(valid_frac, "valid_frac")
    x, y = _mnist1d_arrays(int(n_samples), int(seed))
    # make_dataset already shuffled the samples, so a head/tail split is a random split.
    n_train = len(x) - max(1, round(len(x) * valid_frac))
    xt, xv = _standardise(x[:n_train], x[n_train:])
    yt, yv = torch.from_numpy(y[:n_train]), torch.from_numpy(y[n_train:])
    return TaskData(ArrayDataset(xt, yt), ArrayDataset(xv, yv), 10, (x.shape[1],), "mnist1d",
                    MNIST_CLASSES)


# ---- digits


def digits(seed: int = 0, valid_frac: float = 0.2) -> TaskData:
    """scikit-learn's bundled 8x8 digits (1797 images), x (1, 8, 8) standardised; per-class split."""
    from sklearn.datasets import load_digits

    _check_frac(valid_frac, "valid_frac")
    images, labels = load_digits(return_X_y=True)
    images = (images / 16.0).reshape(-1, 1, 8, 8)
    rng = np.random.default_rng(seed)
    train_idx, valid_idx = [], []
    # Split each class separately so both splits keep the class balance.
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = round(len(idx) * valid_frac)
        valid_idx.append(idx[:k])
        train_idx.append(idx[k:])
    train_idx = rng.permutation(np.concatenate(train_idx))
    valid_idx = np.sort(np.concatenate(valid_idx))
    xt, xv = _standardise(images[train_idx], images[valid_idx])
    yt = torch.from_numpy(labels[train_idx].astype(np.int64))
    yv = torch.from_numpy(labels[valid_idx].astype(np.int64))
    return TaskData(ArrayDataset(xt, yt), ArrayDataset(xv, yv), 10, (1, 8, 8), "digits", MNIST_CLASSES)


# ---- IDX (MNIST-style)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (``.gz`` or uncompressed) into a numpy array of its stored dtype and shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path}: header says {shape} ({expected} bytes) but the file has {len(data)} bytes")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _idx_candidates(stem: str) -> list[str]:
    # torchvision keeps both forms; some mirrors write "train-images.idx3-ubyte".
    dotted = stem.replace("-idx", ".idx")
    return [stem + ".gz", stem, dotted + ".gz", dotted]


def _find_idx_files(dirs: Sequence[Path]) -> dict[str, Path] | None:
    """First folder in `dirs` that holds all four MNIST-style IDX files."""
    for d in dirs:
        if not d.is_dir():
            continue
        found = {}
        for key, stem in _IDX_FILES.items():
            hit = next((d / n for n in _idx_candidates(stem) if (d / n).is_file()), None)
            if hit is None:
                break
            found[key] = hit
        else:
            return found
    return None


def _idx_search_dirs(bases: Sequence[Path], tv_name: str) -> list[Path]:
    # A plain folder of IDX files, or torchvision's layout: <root>/<Name>/raw/.
    return [p for b in bases for p in (b, b / tv_name / "raw", b / tv_name)]


def _mnist_like(name: str, tv_name: str, stats, classes, root, download: bool, subset, seed: int,
                extra_dirs: Sequence[Path], how_to: str) -> TaskData:
    bases = ([Path(root).expanduser()] if root is not None else []) + list(extra_dirs) + [_data_dir()]
    dirs = _idx_search_dirs(bases, tv_name)
    files = _find_idx_files(dirs)
    if files is None and download:
        import torchvision

        target = Path(root).expanduser() if root is not None else _data_dir()
        try:
            # One instance downloads all four files into <target>/<tv_name>/raw.
            getattr(torchvision.datasets, tv_name)(str(target), train=True, download=True)
        except (OSError, RuntimeError) as e:
            raise DatasetUnavailable(f"{name}: download into {target} failed ({e}). {how_to}") from e
        files = _find_idx_files(_idx_search_dirs([target], tv_name))
    if files is None:
        looked = ", ".join(str(d) for d in dirs)
        raise DatasetUnavailable(f"{name} not found (looked in: {looked}). {how_to}")

    arrays = {k: read_idx(p) for k, p in files.items()}
    for split in ("train", "valid"):
        if len(arrays[f"{split}_x"]) != len(arrays[f"{split}_y"]):
            raise ValueError(f"{name}: {split} images and labels differ in length ({files})")
    xt = _images_to_tensor(arrays["train_x"], stats)
    xv = _images_to_tensor(arrays["valid_x"], stats)
    yt = torch.from_numpy(arrays["train_y"].astype(np.int64))
    yv = torch.from_numpy(arrays["valid_y"].astype(np.int64))
    xt, yt = _take_subset(xt, yt, subset, seed)
    return TaskData(ArrayDataset(xt, yt), ArrayDataset(xv, yv), len(classes), tuple(xt.shape[1:]), name,
                    tuple(classes))


_IDX_NAMES = ", ".join(s + "[.gz]" for s in _IDX_FILES.values())


def fashion_mnist(root: str | os.PathLike | None = None, download: bool = False, subset: int | None = None,
                  seed: int = 0) -> TaskData:
    """Fashion-MNIST, x (1, 28, 28) normalised; valid is the official 10k test split.

    Looks in `root` (IDX files, or torchvision's ``root/FashionMNIST/raw``), then the Debian package
    folder, then the effilab data cache; downloads only with ``download=True``.
    `subset=k` keeps a reproducible random k of the 60k training images.
    """
    how_to = (f"Install it with `sudo apt-get install dataset-fashion-mnist` (files land in "
              f"{DEBIAN_FASHION_MNIST}), or pass root=<folder with {_IDX_NAMES}>, "
              "or call fashion_mnist(download=True) on a machine that is online.")
    return _mnist_like("fashion-mnist", "FashionMNIST", FASHION_MNIST_STATS, FASHION_MNIST_CLASSES, root,
                       download, subset, seed, [DEBIAN_FASHION_MNIST], how_to)


def mnist(root: str | os.PathLike | None = None, download: bool = False, subset: int | None = None,
          seed: int = 0) -> TaskData:
    """MNIST, x (1, 28, 28) normalised; valid is the official 10k test split.

    Looks in `root` (IDX files, or torchvision's ``root/MNIST/raw``), then the effilab data cache;
    downloads only with ``download=True``.
    """
    how_to = (f"Call mnist(download=True) on a machine that is online, or pass root=<folder with "
              f"{_IDX_NAMES}>.")
    return _mnist_like("mnist", "MNIST", MNIST_STATS, MNIST_CLASSES, root, download, subset, seed, [], how_to)


# ---- CIFAR-10


def cifar10(root: str | os.PathLike | None = None, download: bool = False, subset: int | None = None,
            seed: int = 0) -> TaskData:
    """CIFAR-10 via torchvision, x (3, 32, 32) normalised; valid is the official 10k test split.

    `root` is the folder that contains ``cifar-10-batches-py`` (the folder itself is accepted too);
    the effilab data cache is tried next; downloads only with ``download=True``.
    """
    from torchvision.datasets import CIFAR10

    how_to = ("Call cifar10(download=True) on a machine that is online, or pass root=<folder containing "
              "cifar-10-batches-py> (the extracted https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz).")
    bases = []
    if root is not None:
        root = Path(root).expanduser()
        bases.append(root.parent if root.name == "cifar-10-batches-py" else root)
    bases.append(_data_dir())
    base = next((b for b in bases if (b / "cifar-10-batches-py").is_dir()), None)
    if base is None and download:
        base = bases[0]
    if base is None:
        looked = ", ".join(str(b / "cifar-10-batches-py") for b in bases)
        raise DatasetUnavailable(f"cifar10 not found (looked in: {looked}). {how_to}")
    try:
        train = CIFAR10(str(base), train=True, download=download)
        valid = CIFAR10(str(base), train=False, download=False)
    except (OSError, RuntimeError) as e:
        raise DatasetUnavailable(f"cifar10 could not be loaded from {base} ({e}). {how_to}") from e
    xt = _images_to_tensor(train.data, CIFAR10_STATS)
    xv = _images_to_tensor(valid.data, CIFAR10_STATS)
    yt = torch.tensor(train.targets, dtype=torch.int64)
    yv = torch.tensor(valid.targets, dtype=torch.int64)
    xt, yt = _take_subset(xt, yt, subset, seed)
    return TaskData(ArrayDataset(xt, yt), ArrayDataset(xv, yv), 10, (3, 32, 32), "cifar10",
                    tuple(train.classes))


# ---- folders


def image_folder(path: str | os.PathLike, size: int = 32, valid_pct: float = 0.2, seed: int = 0) -> TaskData:
    """An ImageFolder-style directory (one subfolder per class), resized to (3, size, size).

    Images are read lazily, scaled to [0, 1] and normalised with ImageNet statistics; the split is a
    random permutation from ``numpy.random.default_rng(seed)``.
    """
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    _check_frac(valid_pct, "valid_pct")
    tfm = transforms.Compose([
        transforms.Resize((size, size)),
        transforms.ToTensor(),
        transforms.Normalize(*IMAGENET_STATS),
    ])
    folder = ImageFolder(str(Path(path).expanduser()), transform=tfm)
    n = len(folder)
    perm = np.random.default_rng(seed).permutation(n)
    n_valid = min(max(1, round(n * valid_pct)), n - 1) if n > 1 else 0
    train = _IndexedFolder(folder, np.sort(perm[n_valid:]))
    valid = _IndexedFolder(folder, np.sort(perm[:n_valid]))
    return TaskData(train, valid, len(folder.classes), (3, size, size), Path(path).name or "image_folder",
                    tuple(folder.classes))


# ---- Python source (character-level language model)


class TokenWindows(Dataset):
    """Consecutive windows of a token stream: item `i` is `(x, y)`, both `(seq_len,)` int64, with `y` the
    tokens that follow `x` by one position (next-token targets)."""

    n_inp = 1

    def __init__(self, tokens: torch.Tensor, seq_len: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be at least 1, got {seq_len}")
        self.tokens, self.seq_len = tokens, int(seq_len)

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        start = (i % len(self)) * self.seq_len
        chunk = self.tokens[start:start + self.seq_len + 1]
        return chunk[:-1], chunk[1:]

    def new_empty(self) -> TokenWindows:
        return TokenWindows(self.tokens[:0], self.seq_len)

    def __repr__(self) -> str:
        return f"TokenWindows(n={len(self)}, seq_len={self.seq_len})"


PYSOURCE_VOCAB = 128  # ASCII; any other byte becomes "?"


def _stdlib_source_files() -> list[Path]:
    """The standard library's own `.py` files in a fixed order (sorted relative paths), without installed
    packages and without the standard library's test suite (large, repetitive data files)."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "__pycache__"}
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip]  # prune: installed packages can be large
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def pysource(seq_len: int = 128, max_bytes: int = 2_000_000, valid_frac: float = 0.1) -> TaskData:
    """A character-level language model on the Python standard library's own `.py` sources (offline).

    The files are read in sorted order and concatenated until `max_bytes`; bytes are ASCII token ids
    0..127 (others become "?"). The first `1 - valid_frac` of the stream trains, the rest validates; items
    are non-overlapping `(x, y)` windows of `seq_len` tokens with `y` shifted by one. `n_classes` is the
    vocabulary size. The corpus is fixed for a given Python installation (its version decides the files).
    """
    if max_bytes < 2 * (seq_len + 1):
        raise ValueError(f"max_bytes={max_bytes} is too small for windows of seq_len={seq_len}")
    _check_frac(valid_frac, "valid_frac")
    parts, total = [], 0
    for path in _stdlib_source_files():
        data = path.read_bytes() + b"\n"
        parts.append(data[:max_bytes - total])
        total += len(parts[-1])
        if total >= max_bytes:
            break
    if not parts:
        raise DatasetUnavailable("pysource: no .py files found in the Python standard library")
    raw = np.frombuffer(b"".join(parts), dtype=np.uint8)
    tokens = torch.from_numpy(np.where(raw < PYSOURCE_VOCAB, raw, ord("?")).astype(np.int64))
    n_train = len(tokens) - max(seq_len + 1, round(len(tokens) * valid_frac))
    train, valid = TokenWindows(tokens[:n_train], seq_len), TokenWindows(tokens[n_train:], seq_len)
    classes = tuple(chr(i) for i in range(PYSOURCE_VOCAB))
    return TaskData(train, valid, PYSOURCE_VOCAB, (seq_len,), "pysource", classes, kind="language_model")


# ---- registry


TASKS: dict[str, Callable[..., TaskData]] = {
    "mnist1d": mnist1d,
    "digits": digits,
    "fashion-mnist": fashion_mnist,
    "mnist": mnist,
    "cifar10": cifar10,
    "pysource": pysource,
}


def get_task(name: str, **kwargs) -> TaskData:
    """Load a task by name (``fashion_mnist`` is accepted for ``fashion-mnist``)."""
    key = name.strip().lower().replace("_", "-")
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[key](**kwargs)


# ---- models


def _conv_bn(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class CharTransformer(nn.Module):
    """A small decoder-only transformer: token + learned position embeddings, pre-norm blocks of causal
    `scaled_dot_product_attention` and a GELU MLP, tied output head. Input (N, T) int64 with
    T <= `max_len`; output logits (N, T, vocab)."""

    def __init__(self, vocab: int, d_model: int = 128, n_layer: int = 2, n_head: int = 4, max_len: int = 256,
                 dropout: float = 0.0):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model ({d_model}) must be a multiple of n_head ({n_head})")
        self.n_head, self.max_len = n_head, max_len
        self.tok, self.pos = nn.Embedding(vocab, d_model), nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, n_head, dropout) for _ in range(n_layer))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        if t > self.max_len:
            raise ValueError(f"sequence length {t} exceeds max_len={self.max_len}")
        h = self.tok(x) + self.pos.weight[:t]
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


class _Block(ResidualBlock):
    """A pre-norm transformer layer as one residual block: `h + branch(h)` with
    `branch(h) = a + mlp(norm2(h + a))`, `a = proj(attention(norm1(h)))` (the usual two residual adds).
    Zeroing `proj` and the MLP's last Linear makes it the identity (Fixup, growth); the MLP's hidden
    width can grow (Net2WiderNet)."""

    def __init__(self, d_model: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv, self.proj = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model),
                                 nn.Dropout(dropout))

    def branch(self, h: torch.Tensor) -> torch.Tensor:
        n, t, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(n, t, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                       dropout_p=self.dropout if self.training else 0.0)
        a = self.proj(a.transpose(1, 2).reshape(n, t, d))
        return a + self.mlp(self.norm2(h + a))

    def branch_layers(self) -> list[nn.Module]:
        return [self.qkv, self.proj, self.mlp[0], self.mlp[2]]

    def last_layers(self) -> list[nn.Module]:
        return [self.proj, self.mlp[2]]

    def widen_pairs(self):
        return [(self.mlp[0], [], self.mlp[2])]


def char_transformer(vocab: int, d_model: int = 128, n_layer: int = 2, n_head: int = 4, max_len: int = 256,
                     dropout: float = 0.0) -> CharTransformer:
    """A small causal transformer language model over `vocab` tokens (see `CharTransformer`)."""
    return CharTransformer(vocab, d_model, n_layer, n_head, max_len, dropout)


def small_model(task: TaskData, width: int | None = None) -> nn.Module:
    """A small baseline for `task`: an MLP for flat inputs, a 3-conv BatchNorm CNN for images, a 2-layer
    causal transformer for language models.

    `width` is the hidden size of the MLP (default 256), the first conv's channels (default 32,
    doubled at each stride-2 conv) or the transformer's width (default 128).
    """
    shape = tuple(task.input_shape)
    if getattr(task, "kind", "classification") == "language_model":
        return char_transformer(task.n_classes, d_model=width or 128, max_len=shape[0])
    if len(shape) == 3:
        c, h, w = shape
        width = width or 32
        # Large images start with a stride-2 conv: most of the compute sits in the first layers.
        first_stride = 2 if min(h, w) > 16 else 1
        return nn.Sequential(
            _conv_bn(c, width, first_stride),
            _conv_bn(width, 2 * width, 2),
            _conv_bn(2 * width, 4 * width, 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * width, task.n_classes),
        )
    width = width or 256
    n_in = int(np.prod(shape))
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(n_in, width, bias=False),
        nn.BatchNorm1d(width),
        nn.ReLU(inplace=True),
        nn.Linear(width, width, bias=False),
        nn.BatchNorm1d(width),
        nn.ReLU(inplace=True),
        nn.Linear(width, task.n_classes),
    )


class _PreActBlock(ResidualBlock):
    """Pre-activation ResNet basic block (He et al. 2016, "Identity mappings"): `shortcut(x) + branch(x)`
    with `branch = BN-ReLU-conv3x3-BN-ReLU-conv3x3` and a strided 1x1 conv shortcut when the shape changes.
    The sum is not followed by a ReLU, so a zero branch is exactly the identity (stochastic depth, growth)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, hidden: int | None = None):
        super().__init__()
        hidden = hidden or c_out
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, hidden, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(hidden), nn.Conv2d(hidden, c_out, 3, 1, 1, bias=False)
        self.down = None if stride == 1 and c_in == c_out else nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(torch.relu(self.bn1(x)))
        return self.conv2(torch.relu(self.bn2(h)))

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.down is None else self.down(x)

    @property
    def identity_shortcut(self) -> bool:
        return self.down is None

    def branch_layers(self) -> list[nn.Module]:
        return [self.conv1, self.conv2]

    def widen_pairs(self):
        return [(self.conv1, [self.bn2], self.conv2)]


class ResNetSmall(nn.Module):
    """A small pre-activation ResNet: a 3x3 stem conv, stages of `_PreActBlock`s (the first block of each
    later stage halves the resolution and doubles the channels), BN-ReLU, global pooling, a linear head."""

    def __init__(self, c_in: int, n_classes: int, width: int = 16, stages: Sequence[int] = (2, 2),
                 first_stride: int = 1):
        super().__init__()
        if not stages or any(not isinstance(n, int) or n < 1 for n in stages):
            raise ValueError(f"stages must be a non-empty sequence of positive ints (blocks per stage), got {stages}")
        self.stem = nn.Conv2d(c_in, width, 3, first_stride, 1, bias=False)
        blocks, c = [], width
        for i, n in enumerate(stages):
            c_out = width * 2 ** i
            for j in range(n):
                blocks.append(_PreActBlock(c, c_out, stride=2 if i > 0 and j == 0 else 1))
                c = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(c, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def resnet_small(task: TaskData, width: int = 16, stages: Sequence[int] = (2, 2)) -> ResNetSmall:
    """A small pre-activation ResNet for an image `task` (input (C, H, W)): `stages` blocks per stage, `width`
    channels in the first (doubled per stage). Built from residual blocks, so stochastic depth, residual
    gates, Fixup and growth apply to it. Images larger than 16 px start with a stride-2 stem."""
    shape = tuple(task.input_shape)
    if len(shape) != 3:
        raise ValueError(f"resnet_small needs an image task (input (C, H, W)); {task.name} has input {shape}")
    c, h, w = shape
    return ResNetSmall(c, task.n_classes, width, stages, first_stride=2 if min(h, w) > 16 else 1)
