"""Curriculum schedules on tensors: sizes, lengths, pacing and the easy-to-hard plan."""

from __future__ import annotations

import pytest
import torch

from effilab.core.curriculum import (
    easy_plan,
    pacing_fraction,
    planned_curve,
    resize_batch,
    resized_shape,
    seq_len_at,
    truncate_batch,
)

PCTS = [i / 400 for i in range(401)]


def test_resized_shape_ramps_from_start_to_full_and_stays_full():
    full = (32, 48)
    shapes = [resized_shape(full, p, 0.5, 0.2, 4) for p in PCTS]
    assert shapes[0] == (16, 24)
    heights = [h for h, _ in shapes]
    assert heights == sorted(heights)  # never shrinks
    assert all(s == full for p, s in zip(PCTS, shapes) if p >= 0.8)  # the fine-tuning part is full size
    assert all(s != full for p, s in zip(PCTS, shapes) if p < 0.7)
    assert all(h % 4 == 0 and w % 4 == 0 for h, w in shapes)


def test_resized_shape_reaches_full_sizes_that_are_not_multiples():
    assert resized_shape((30, 30), 1.0, 0.5, 0.2, 8) == (30, 30)
    assert resized_shape((30, 30), 0.0, 0.5, 0.2, 8) == (16, 16)
    assert resized_shape((6, 6), 0.0, 0.1, 0.0, 4) == (4, 4)  # never below one multiple


def test_resize_batch_is_identity_at_full_size_and_resizes_otherwise():
    x = torch.randn(2, 3, 16, 16)
    assert resize_batch(x, (16, 16)) is x
    assert resize_batch(x, (8, 12)).shape == (2, 3, 8, 12)
    area = resize_batch(x, (8, 8), mode="area")
    assert torch.allclose(area, torch.nn.functional.avg_pool2d(x, 2), atol=1e-6)


def test_seq_len_grows_in_multiples_and_is_full_from_warmup_frac_on():
    lengths = [seq_len_at(p, 128, 8, 0.5, 8) for p in PCTS]
    assert lengths[0] == 8 and lengths == sorted(lengths)
    assert all(n == 128 for p, n in zip(PCTS, lengths) if p >= 0.5)
    assert all(n < 128 and n % 8 == 0 for p, n in zip(PCTS, lengths) if p < 0.5 - 8 / 120 * 0.5)
    assert seq_len_at(0.0, 5, 8, 0.5) == 5  # a start longer than the sequences: the full length


def test_truncate_batch_is_a_view():
    t = torch.arange(24).view(2, 12)
    cut = truncate_batch(t, 4)
    assert cut.shape == (2, 4) and cut.data_ptr() == t.data_ptr()
    assert truncate_batch(t, 20) is t


def test_pacing_fraction():
    assert pacing_fraction(0.0, 0.3, 0.5) == pytest.approx(0.3)
    assert pacing_fraction(0.25, 0.3, 0.5) == pytest.approx(0.65)
    assert pacing_fraction(0.5, 0.3, 0.5) == 1.0 and pacing_fraction(0.9, 0.3, 0.5) == 1.0
    assert pacing_fraction(0.0, 0.3, 0.0) == 1.0


def test_easy_plan_keeps_the_lowest_scores_shuffled_by_its_own_generator():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(100, generator=g)
    state = torch.random.get_rng_state()
    plan = easy_plan(scores, 0.3, epoch=2, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    assert len(plan) == 30
    assert set(plan.indices.tolist()) == set(scores.argsort()[:30].tolist())
    assert plan.indices.tolist() != sorted(plan.indices.tolist())  # shuffled
    assert float(plan.threshold) == pytest.approx(float(scores.sort().values[29]))
    assert plan.counts.tolist() == [30, 70, 0]
    assert torch.equal(plan.indices, easy_plan(scores, 0.3, epoch=2, seed=5).indices)  # a pure function
    assert not torch.equal(plan.indices, easy_plan(scores, 0.3, epoch=3, seed=5).indices)
    assert len(easy_plan(scores, 1.0, 0, 0)) == 100 and len(easy_plan(scores, 0.001, 0, 0)) == 1


def test_planned_curve_samples_the_schedule():
    curve = planned_curve(lambda p: 2 * p, n_points=5)
    assert curve == {"pct": [0, 0.25, 0.5, 0.75, 1.0], "value": [0, 0.5, 1.0, 1.5, 2.0]}
