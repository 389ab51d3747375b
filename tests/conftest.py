"""Shared fixtures: a tiny, fast, deterministic fastai task for technique tests."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from torch import nn

# Tiny models run fastest on one thread, and a second thread only fights the loader workers and the
# notebook kernels the suite starts on a 2-core machine.
torch.set_num_threads(1)

warnings.filterwarnings("ignore", message=".*torch.jit.script.*")


def make_arrays(n: int = 512, dim: int = 12, classes: int = 4, seed: int = 0):
    """A separable-but-not-trivial classification problem with per-sample difficulty spread."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, classes, generator=g)
    logits = x @ w + 0.8 * torch.randn(n, classes, generator=g)
    return x, logits.argmax(1)


def make_images(n: int = 512, classes: int = 4, seed: int = 0, side: int = 16):
    """(n, 1, side, side) images whose class is a linear function of 12 hidden features (as in
    `make_arrays`), drawn as smooth spatial patterns, plus pixel noise: learnable by a tiny CNN."""
    x, y = make_arrays(n, classes=classes, seed=seed)
    g = torch.Generator().manual_seed(1000 + seed)
    basis = torch.nn.functional.interpolate(torch.randn(x.shape[1], 1, 4, 4, generator=g), size=(side, side),
                                            mode="bilinear", align_corners=False)
    images = torch.einsum("nf,fchw->nchw", x, basis) + 0.3 * torch.randn(n, 1, side, side, generator=g)
    return images, y


@functools.lru_cache(maxsize=1)
def _corpus_tokens() -> torch.Tensor:
    from effilab.datasets import pysource

    task = pysource(seq_len=SEQ_LEN, max_bytes=120_000, valid_frac=0.1)
    return task.train.tokens


SEQ_LEN = 32  # the sequence learner's window
TASK_KINDS = ("tabular", "image", "sequence")


def make_sequences(n: int = 512, seed: int = 0):
    """`n` windows of `SEQ_LEN` tokens of the standard library's Python source (x) and the next tokens (y)."""
    tokens = _corpus_tokens()
    starts = (torch.arange(n) + seed * 7) % ((len(tokens) - 1) // SEQ_LEN) * SEQ_LEN
    pos = starts[:, None] + torch.arange(SEQ_LEN + 1)
    windows = tokens[pos]
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def example_input(task: str = "tabular", n: int = 3) -> torch.Tensor:
    """A batch of inputs of the kind `make_learner(task=task)` trains on."""
    if task == "image":
        return torch.randn(n, 1, 16, 16)
    if task == "sequence":
        return torch.randint(0, 128, (n, SEQ_LEN))
    return torch.randn(n, 12)


def _model(task: str, batchnorm: bool) -> nn.Module:
    if task == "image":
        def norm(c):
            return [nn.BatchNorm2d(c)] if batchnorm else []
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), *norm(8), nn.ReLU(),
                             nn.Conv2d(8, 16, 3, stride=2, padding=1), *norm(16), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    if task == "sequence":
        from effilab.datasets import char_transformer

        return char_transformer(128, d_model=32, n_layer=1, n_head=2, max_len=SEQ_LEN)
    layers = [nn.Linear(12, 32)] + ([nn.BatchNorm1d(32)] if batchnorm else []) + [nn.ReLU(), nn.Linear(32, 4)]
    return nn.Sequential(*layers)


def make_learner(cbs=(), n: int = 512, bs: int = 32, num_workers: int = 0, shuffle: bool = False,
                 loss_func=None, seed: int = 0, model_seed: int = 0, batchnorm: bool = True, task: str = "tabular",
                 **learner_kwargs):
    """A Learner on `seed`'s data with a small model whose weights depend on `model_seed` only.

    `task`: "tabular" (`make_arrays`, 12 features, 4 classes, an MLP), "image" (`make_images`, 1x16x16,
    4 classes, a tiny CNN with global pooling) or "sequence" (`make_sequences`, next-character prediction
    over 128 ASCII tokens, a one-layer causal transformer).
    """
    from fastai.callback.progress import ProgressCallback
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy

    from effilab.datasets import ArrayDataset

    if task not in TASK_KINDS:
        raise ValueError(f"task must be one of {TASK_KINDS}, got {task!r}")
    make_data = {"tabular": make_arrays, "image": make_images, "sequence": make_sequences}[task]
    x, y = make_data(n + n // 4, seed=seed)
    train, valid = ArrayDataset(x[:n], y[:n]), ArrayDataset(x[n:], y[n:])
    dls = DataLoaders(DataLoader(train, bs=bs, shuffle=shuffle, drop_last=True, num_workers=num_workers),
                      DataLoader(valid, bs=2 * bs), device="cpu")
    with torch.random.fork_rng():
        torch.manual_seed(model_seed)
        model = _model(task, batchnorm)
    learn = Learner(dls, model, loss_func=loss_func or CrossEntropyLossFlat(), metrics=accuracy,
                    cbs=list(cbs), **learner_kwargs)
    learn.remove_cb(ProgressCallback)
    learn.logger = lambda *a, **k: None
    return learn


def params_of(learn) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in learn.model.parameters()])


@pytest.fixture
def tiny_learner():
    return make_learner
