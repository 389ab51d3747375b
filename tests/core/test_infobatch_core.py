"""InfoBatch's core on tensors: plans, weights, annealing, randomness, sampler, state."""

from __future__ import annotations

import math
import pickle
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from effilab.core.infobatch import (
    IndexedDataset,
    InfoBatchPruner,
    InfoBatchSampler,
    ScoreTable,
    plan_epoch,
    random_plan,
)


def _scores(n=1000, seed=0):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) ** 3  # long right tail, like losses


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 400), ratio=st.floats(0.0, 0.95), seed=st.integers(0, 2**31), epoch=st.integers(0, 50))
def test_plan_invariants(n, ratio, seed, epoch):
    scores = torch.rand(n, generator=torch.Generator().manual_seed(seed))
    plan = plan_epoch(scores, ratio, epoch, seed)
    idx = plan.indices
    assert idx.dtype == torch.int64 and idx.unique().numel() == idx.numel()
    keep = torch.zeros(n, dtype=torch.bool)
    keep[idx] = True
    below = scores < scores.mean()
    assert not (~keep & ~below).any(), "a sample at or above the threshold was pruned"
    expected_w = torch.where(keep & below, 1 / (1 - ratio), 1.0)
    assert torch.allclose(plan.weights, expected_w)
    kept, pruned, rescaled = plan.counts.tolist()
    assert kept == idx.numel() and kept + pruned == n
    assert rescaled == (int((keep & below).sum()) if ratio > 0 else 0)
    assert plan.hist.sum() == n and plan.hist[0].sum() == kept


def test_plan_is_unbiased():
    """Averaged over many plans, the weighted gradient sum equals the full-data gradient sum."""
    torch.manual_seed(0)
    n, dim = 300, 5
    x, y = torch.randn(n, dim), torch.randint(0, 3, (n,))
    model = torch.nn.Linear(dim, 3)
    per_sample = []
    for i in range(n):  # per-sample gradients: the estimator is linear in them
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        per_sample.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    grads = torch.stack(per_sample)
    with torch.no_grad():
        scores = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
    full = grads.sum(0)
    total = torch.zeros_like(full)
    plans = 1000
    for epoch in range(plans):
        plan = plan_epoch(scores, 0.5, epoch, seed=1)
        total += (plan.weights[plan.indices, None] * grads[plan.indices]).sum(0)
    estimate = total / plans
    rel = (estimate - full).norm() / full.norm()
    assert rel < 0.02, f"relative error of the mean weighted gradient {rel:.4f}"
    # ... and pruning really happened, so the test could fail without the 1/(1-r) rescaling.
    unweighted = grads[plan.indices].sum(0)
    assert (unweighted - full).norm() / full.norm() > 0.1


@pytest.mark.parametrize("epochs,delta,anneal", [(8, 0.875, 7), (10, 0.875, 8), (7, 0.875, 6), (4, 0.3, 1),
                                                 (5, 1.0, 5)])
def test_annealing_resets_every_weight(epochs, delta, anneal):
    pruner = InfoBatchPruner(500, epochs, ratio=0.5, delta=delta, seed=3)
    assert pruner.anneal_epoch == anneal == math.floor(delta * epochs)
    scores = _scores(500)
    for epoch in range(epochs):
        pruner.table.scores = scores.clone()  # a spread of scores every epoch, so pruning is possible
        plan = pruner.start_epoch(epoch)
        if epoch >= anneal:
            assert plan.annealing and len(plan) == 500
            assert torch.equal(plan.weights, torch.ones(500)), f"weight != 1 in annealing epoch {epoch}"
        else:
            assert not plan.annealing and len(plan) < 500
            assert (plan.weights > 1).any()


def test_first_epoch_keeps_everything():
    plan = InfoBatchPruner(100, 10).start_epoch()
    assert len(plan) == 100 and torch.equal(plan.weights, torch.ones(100))


def test_global_rng_untouched():
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    pruner = InfoBatchPruner(1000, 10, seed=5)
    for epoch in range(8):
        pruner.start_epoch(epoch)
        pruner.weighted_loss(torch.rand(32, generator=torch.Generator().manual_seed(epoch)), torch.arange(32))
    random_plan(1000, 0.3, 2, seed=1)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert random.getstate() == states[2]


def test_plans_depend_on_seed_and_epoch_only():
    s = _scores()
    a, b = plan_epoch(s, 0.5, 4, seed=9), plan_epoch(s.clone(), 0.5, 4, seed=9)
    assert torch.equal(a.indices, b.indices)
    assert not torch.equal(a.indices, plan_epoch(s, 0.5, 5, seed=9).indices)
    assert not torch.equal(a.indices, plan_epoch(s, 0.5, 4, seed=10).indices)


def test_score_table_latest_ema_and_nonfinite():
    t = ScoreTable(5)
    t.update(torch.tensor([0, 2]), torch.tensor([3.0, 4.0]))
    t.update(torch.tensor([2, 3]), torch.tensor([5.0, float("nan")]))
    assert t.scores.tolist() == [3.0, 1.0, 5.0, 1.0, 1.0]
    t.sync()
    t.sync()  # nothing new: counted once
    assert int(t.nonfinite) == 1
    ema = ScoreTable(3, momentum=0.5)
    ema.update(torch.tensor([0]), torch.tensor([4.0]))  # first loss taken as is
    ema.update(torch.tensor([0]), torch.tensor([2.0]))
    ema.update(torch.tensor([1]), torch.tensor([float("inf")]))
    assert ema.scores.tolist() == [3.0, 1.0, 1.0]
    assert ema.seen.tolist() == [True, False, False]
    ema.update(torch.tensor([1]), torch.tensor([6.0]))  # its first finite loss is taken as is
    assert ema.scores.tolist() == [3.0, 6.0, 1.0]


def test_bad_parameters():
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\)"):
        InfoBatchPruner(10, 5, ratio=1.0)
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\]"):
        InfoBatchPruner(10, 5, delta=0.0)
    with pytest.raises(ValueError, match="momentum"):
        ScoreTable(10, momentum=1.0)
    pruner = InfoBatchPruner(10, 5)
    with pytest.raises(RuntimeError, match="no epoch is planned"):
        pruner.weighted_loss(torch.ones(2), torch.arange(2))
    pruner.start_epoch()
    with pytest.raises(ValueError, match="reduction='none'"):
        pruner.weighted_loss(torch.ones(()), torch.arange(2))
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from range(3)

    with pytest.raises(TypeError, match="indexable"):
        IndexedDataset(Stream())


def _loop(pruner, loader, epochs, set_epoch=False):
    """A plain-PyTorch epoch loop with a deterministic 'loss' per sample; returns what each epoch saw."""
    seen = []
    for epoch in epochs:
        if set_epoch:
            loader.sampler.set_epoch(epoch)
        n_batches = len(loader)
        batches = [idx for idx, _ in loader]
        assert len(batches) == n_batches, "len(loader) at epoch start differs from the batches it yields"
        assert pruner.plan.epoch == epoch and sum(b.numel() for b in batches) == len(pruner.plan)
        for idx in batches:
            pruner.weighted_loss(((idx * 7919 + epoch) % 97).float() / 97, idx)
        seen.append(torch.cat(batches))
    return seen


def _dataset(n=200):
    # torch's own TensorDataset: spawn-based workers import nothing heavy to unpickle it
    return IndexedDataset(TensorDataset(torch.randn(n, 3), torch.zeros(n, dtype=torch.long)))


def test_sampler_true_epoch_length_and_plain_loop():
    pruner = InfoBatchPruner(200, 6, ratio=0.6, seed=0)
    loader = DataLoader(_dataset(), batch_size=16, sampler=InfoBatchSampler(pruner))
    seen = _loop(pruner, loader, range(6))
    lengths = [s.numel() for s in seen]
    assert lengths[0] == 200 and max(lengths[1:5]) < 170 and lengths[5] == 200
    assert all(s.unique().numel() == s.numel() for s in seen)


@pytest.mark.parametrize("ctx", ["fork", "spawn"])
def test_sampler_with_workers(ctx):
    pruner = InfoBatchPruner(200, 4, ratio=0.5, seed=0)
    loader = DataLoader(_dataset(), batch_size=16, sampler=InfoBatchSampler(pruner), num_workers=2,
                        multiprocessing_context=ctx, persistent_workers=True)
    ref_pruner = InfoBatchPruner(200, 4, ratio=0.5, seed=0)
    ref = DataLoader(_dataset(), batch_size=16, sampler=InfoBatchSampler(ref_pruner))
    with_workers, in_process = _loop(pruner, loader, range(3)), _loop(ref_pruner, ref, range(3))
    assert [s.tolist() for s in with_workers] == [s.tolist() for s in in_process]


def test_everything_pickles():
    pruner = InfoBatchPruner(50, 3)
    pruner.start_epoch()
    for obj in (pruner, InfoBatchSampler(pruner), _dataset(50)):
        clone = pickle.loads(pickle.dumps(obj))
        assert type(clone) is type(obj)
    assert len(pickle.loads(pickle.dumps(_dataset(50)))) == 50  # no __getattr__ recursion on unpickling


def test_set_epoch_is_idempotent():
    pruner = InfoBatchPruner(100, 5, seed=0)
    sampler = InfoBatchSampler(pruner)
    pruner.table.scores = _scores(100)
    sampler.set_epoch(2)
    first = list(sampler)
    pruner.weighted_loss(torch.zeros(4), torch.arange(4))  # scores move; the epoch's plan must not
    sampler.set_epoch(2)
    assert list(sampler) == first


def test_sharding_is_disjoint_and_covers_the_plan():
    pruner = InfoBatchPruner(101, 5, seed=0)
    pruner.table.scores = _scores(101)
    pruner.start_epoch(1)
    shards = [list(InfoBatchSampler(pruner, rank=r, world_size=3)) for r in range(3)]
    assert len({len(s) for s in shards}) == 1
    flat = sum(shards, [])
    plan = pruner.plan.indices.tolist()
    assert set(flat) == set(plan)
    assert len(flat) - len(set(flat)) == len(flat) - len(plan)  # only the padding repeats
    with pytest.raises(ValueError, match="rank"):
        InfoBatchSampler(pruner, rank=3, world_size=3)


def test_resume_mid_run_continues_identically():
    def run(epochs, state=None):
        pruner = InfoBatchPruner(300, 8, ratio=0.5, seed=11)
        if state is not None:
            pruner.load_state_dict(state)
        loader = DataLoader(_dataset(300), batch_size=32, sampler=InfoBatchSampler(pruner))
        return _loop(pruner, loader, epochs, set_epoch=True), pickle.loads(pickle.dumps(pruner.state_dict()))

    full, _ = run(range(8))
    head, state = run(range(3))
    tail, _ = run(range(3, 8), state)
    assert len(head + tail) == 8
    assert all(torch.equal(a, b) for a, b in zip(full, head + tail)), "the resumed run trained on other samples"
    assert not all(torch.equal(full[1], s) for s in full[2:5])  # plans really change between epochs
