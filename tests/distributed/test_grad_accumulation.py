"""Gradient accumulation under DDP is the large-batch step.

Two gloo ranks (torchrun, CPU) train a fastai Learner with fastai's `GradientAccumulation` under
`effilab.system.distrib_ctx`; each rank records the micro-batches it saw. The test replays the same
samples in one process, one plain SGD step per large batch (all ranks' micro-batches of that step, the
loss averaged over all their samples), and requires the same weights. Per rank each step accumulates
`n_acc / bs` micro-batches whose losses are scaled by `bs / n_acc`; DDP averages the ranks' gradients: the
step's gradient is the mean over every sample of every micro-batch on every rank.

This file is also the worker: `torchrun --nproc_per_node 2 test_grad_accumulation.py OUT_DIR`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2
N, BS, N_ACC, LR, MOM = 288, 16, 48, 0.1, 0.9  # 144 samples per rank: 9 micro-batches, 3 steps per epoch
EPOCHS = 2


def _data():
    g = torch.Generator().manual_seed(0)  # the same data on every rank
    centers = torch.randn(3, 8, generator=g) * 2.0
    y = torch.randint(0, 3, (N,), generator=g)
    return centers[y] + torch.randn(N, 8, generator=g), y


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))  # no BatchNorm: per-sample losses


def worker(out_dir: Path) -> None:
    from functools import partial

    from fastai.callback.core import Callback
    from fastai.callback.training import GradientAccumulation
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.optimizer import SGD
    from torch.utils.data import TensorDataset

    from effilab.system import distrib_ctx

    class Spy(Callback):
        order = 90

        def before_fit(self):
            self.batches, self.steps, self.grads = [], 0, []

        def before_batch(self):
            if self.training:
                self.batches.append((self.xb[0].clone(), self.yb[0].clone()))

        def after_step(self):
            self.steps += 1
            self.grads.append(torch.cat([p.grad.flatten() for p in self.model.parameters()]).clone())

    x, y = _data()
    train = DataLoader(TensorDataset(x, y), bs=BS, shuffle=True, device="cpu")
    valid = DataLoader(TensorDataset(x[:32], y[:32]), bs=32, device="cpu")
    spy = Spy()
    learn = Learner(DataLoaders(train, valid, device="cpu"), _model(), loss_func=CrossEntropyLossFlat(),
                    opt_func=partial(SGD, mom=MOM), lr=LR, cbs=[GradientAccumulation(n_acc=N_ACC), spy])
    with distrib_ctx(learn, cpu=True):
        learn.fit(EPOCHS, LR)
    rank = dist.get_rank()
    torch.save({"batches": spy.batches, "steps": spy.steps, "grads": spy.grads, "world": dist.get_world_size(),
                "params": {k: v.detach().clone() for k, v in learn.model.state_dict().items()}},
               out_dir / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    out = tmp_path_factory.mktemp("grad_accum")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    for attempt in range(2):  # a free port may be taken between choosing and binding it
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", f"--nproc_per_node={WORLD}",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", __file__, str(out)]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # own session: a timeout kills the whole tree
        try:
            log, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
            pytest.fail(f"torchrun timed out:\n{log[-6000:]}")
        if proc.returncode == 0 or attempt or "address already in use" not in log.lower():
            break
    assert proc.returncode == 0, f"torchrun failed (exit {proc.returncode}):\n{log[-6000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


pytestmark = pytest.mark.slow


def test_ranks_saw_disjoint_halves_and_agree(ranks):
    r0, r1 = ranks
    assert r0["world"] == r1["world"] == WORLD
    per_step = N_ACC // BS
    assert r0["steps"] == r1["steps"] == EPOCHS * (N // WORLD) // N_ACC
    assert len(r0["batches"]) == len(r1["batches"]) == r0["steps"] * per_step
    # Each epoch the two ranks see every sample once between them (N is a multiple of WORLD: no padding).
    x, _ = _data()
    for e in range(EPOCHS):
        seen = torch.cat([b[0] for r in ranks for b in r["batches"][e * len(r0["batches"]) // EPOCHS:
                                                                   (e + 1) * len(r0["batches"]) // EPOCHS]])
        assert torch.equal(seen[seen[:, 0].argsort()], x[x[:, 0].argsort()])
    for g0, g1 in zip(r0["grads"], r1["grads"]):
        torch.testing.assert_close(g0, g1)  # DDP all-reduced the accumulated gradients
    assert all(torch.equal(r0["params"][k], r1["params"][k]) for k in r0["params"])


def test_accumulated_ddp_step_is_the_large_batch_step(ranks):
    """SGD with momentum on the large batches (every rank's micro-batches of a step), in one process."""
    r0, r1 = ranks
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOM)
    per_step = N_ACC // BS
    for s in range(r0["steps"]):
        micro = [b for r in ranks for b in r["batches"][s * per_step:(s + 1) * per_step]]
        xb, yb = torch.cat([m[0] for m in micro]), torch.cat([m[1] for m in micro])
        assert len(xb) == WORLD * N_ACC
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()  # the mean over all samples of all micro-batches
        torch.testing.assert_close(torch.cat([p.grad.flatten() for p in model.parameters()]), r0["grads"][s],
                                   rtol=1e-4, atol=1e-6)
        opt.step()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(r0["params"][k], v, rtol=1e-4, atol=1e-6)
    # Not trivially equal: the weights moved.
    assert any(not torch.allclose(v, _model().state_dict()[k]) for k, v in model.state_dict().items())


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
