"""The averagers of effilab.core.averaging against hand-computed averages."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from effilab.core.averaging import (
    EmaAverage,
    LawaAverage,
    SwaAverage,
    check_decay,
    check_start_frac,
    ema_decay,
    model_tensors,
    recompute_bn,
)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def _snapshots(net, n):
    """Set the model to n random weight/buffer states in turn, yielding a copy of each."""
    g = torch.Generator().manual_seed(1)
    for i in range(n):
        with torch.no_grad():
            for t in model_tensors(net):
                if t.is_floating_point():
                    t.copy_(torch.randn(t.shape, generator=g))
                else:
                    t.fill_(i + 1)
        yield [t.clone() for t in model_tensors(net)]


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_matches_the_documented_formula(warmup):
    net = _net()
    ema = EmaAverage(net, decay=0.7, warmup=warmup)
    expected = None
    for t, snap in enumerate(_snapshots(net, 6)):
        ema.update(net)
        if expected is None:
            expected = snap
        else:
            d = min(0.7, (1 + t) / (10 + t)) if warmup else 0.7
            expected = [e * d + s * (1 - d) if s.is_floating_point() else s for e, s in zip(expected, snap)]
    assert ema.n_averaged == 6 and int(ema.averaged.n_averaged) == 6
    for got, want in zip(ema.tensors(), expected):
        assert torch.allclose(got, want, atol=1e-6)


def test_ema_decay_warms_up_and_is_capped():
    assert ema_decay(0.999, 1) == pytest.approx(2 / 11)
    assert ema_decay(0.999, 8) == pytest.approx(0.5)
    assert ema_decay(0.9, 10_000) == 0.9
    assert ema_decay(0.9, 1, warmup=False) == 0.9


def test_swa_is_the_equal_weight_mean_and_copies_buffers():
    net = _net()
    swa = SwaAverage(net)
    snaps = list(_snapshots_into(swa, net, 4))
    n_params = len(list(net.parameters()))
    for i, got in enumerate(swa.tensors()):
        if i < n_params:
            assert torch.allclose(got, torch.stack([s[i] for s in snaps]).mean(0), atol=1e-6)
        else:  # buffers: the latest model's
            assert torch.equal(got, snaps[-1][i])


def _snapshots_into(avg, net, n):
    for snap in _snapshots(net, n):
        avg.update(net)
        yield snap


def test_lawa_averages_the_latest_k():
    net = _net()
    lawa = LawaAverage(net, k=2)
    snaps = list(_snapshots_into(lawa, net, 5))
    assert lawa.n_averaged == 2 and len(lawa.ring) == 2
    for i, got in enumerate(lawa.tensors()):
        if got.is_floating_point():
            assert torch.allclose(got, (snaps[-1][i] + snaps[-2][i]) / 2, atol=1e-6)
        else:
            assert torch.equal(got, snaps[-1][i])


def test_state_dict_round_trip():
    net = _net()
    lawa = LawaAverage(net, k=3)
    list(_snapshots_into(lawa, net, 4))
    other = LawaAverage(_net(), k=3)
    other.load_state_dict(lawa.state_dict())
    assert other.n_averaged == 3
    assert all(torch.equal(a, b) for a, b in zip(other.tensors(), lawa.tensors()))
    next(_snapshots(net, 1))  # new weights: both continue alike
    lawa.update(net)
    other.update(net)
    assert all(torch.equal(a, b) for a, b in zip(other.tensors(), lawa.tensors()))


def test_recompute_bn_matches_a_manual_pass():
    net = _net()
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(2)) * 3 + 1
    batches = list(x.split(16))
    assert recompute_bn(net, batches)
    feats = [net[0](b).detach() for b in batches]
    bn = net[1]
    assert torch.allclose(bn.running_mean, torch.stack([f.mean(0) for f in feats]).mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var, torch.stack([f.var(0) for f in feats]).mean(0), atol=1e-5)
    assert not recompute_bn(nn.Linear(3, 2), batches)  # no BatchNorm: nothing to do


def test_bad_parameters():
    for d in (0.0, 1.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="decay"):
            check_decay(d)
    for s in (1.0, -0.1):
        with pytest.raises(ValueError, match="start_frac"):
            check_start_frac(s)
    with pytest.raises(ValueError, match="k must be"):
        LawaAverage(_net(), k=0)
    with pytest.raises(ValueError, match="decay"):
        EmaAverage(_net(), decay=1.0)
