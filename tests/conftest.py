"""Shared fixtures: a tiny, fast, deterministic fastai task for technique tests."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

# Tiny models run fastest on one thread, and a second thread only fights the loader workers and the
# notebook kernels the suite starts on a 2-core machine.
torch.set_num_threads(1)

warnings.filterwarnings("ignore", message=".*torch.jit.script.*")
warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
warnings.filterwarnings("ignore", message=".*device_type of 'cuda'.*")


def make_arrays(n: int = 512, dim: int = 12, classes: int = 4, seed: int = 0):
    """A separable-but-not-trivial classification problem with per-sample difficulty spread."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, classes, generator=g)
    logits = x @ w + 0.8 * torch.randn(n, classes, generator=g)
    return x, logits.argmax(1)


def make_learner(cbs=(), n: int = 512, bs: int = 32, num_workers: int = 0, shuffle: bool = False,
                 loss_func=None, seed: int = 0, model_seed: int = 0, batchnorm: bool = True, **learner_kwargs):
    """A Learner on `make_arrays(seed)` data with a small MLP whose weights depend on `model_seed` only."""
    from fastai.callback.progress import ProgressCallback
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy

    from effilab.datasets import ArrayDataset

    x, y = make_arrays(n + n // 4, seed=seed)
    train, valid = ArrayDataset(x[:n], y[:n]), ArrayDataset(x[n:], y[n:])
    dls = DataLoaders(DataLoader(train, bs=bs, shuffle=shuffle, drop_last=True, num_workers=num_workers),
                      DataLoader(valid, bs=2 * bs), device="cpu")
    with torch.random.fork_rng():
        torch.manual_seed(model_seed)
        layers = [nn.Linear(x.shape[1], 32)] + ([nn.BatchNorm1d(32)] if batchnorm else []) + [
            nn.ReLU(), nn.Linear(32, 4)]
        model = nn.Sequential(*layers)
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
