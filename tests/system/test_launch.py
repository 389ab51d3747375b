"""effilab.system.launch: two CPU processes from one call (as from a notebook cell), and its refusals."""

from __future__ import annotations

import pytest
import torch

from effilab.system import launch
from effilab.system import launcher as launch_mod

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


def _train_with_infobatch(n: int) -> dict:
    """What each process runs: a tiny Learner with InfoBatch inside distrib_ctx."""
    import torch.distributed as dist
    from fastai.callback.core import Callback

    from effilab import InfoBatch
    from effilab.system import distrib_ctx

    from ..conftest import make_learner

    torch.manual_seed(100 + int(__import__("os").environ["RANK"]))  # InfoBatch(seed=None) differs per rank
    ib = InfoBatch(0.5)
    plans = []

    class Plans(Callback):
        def before_train(self):
            plans.append(ib.plan.indices.tolist())

    learn = make_learner([ib, Plans()], n=n)
    seed_before = ib.seed
    with distrib_ctx(learn):
        learn.fit(3, 1e-2)
    return {"rank": dist.get_rank(), "world": dist.get_world_size(), "backend": dist.get_backend(),
            "plans": plans, "seed_before": seed_before, "seed": ib.seed,
            "values": [list(map(float, v)) for v in learn.recorder.values],
            "params": {k: v.detach().clone() for k, v in learn.model.state_dict().items()}}


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU launch: on a GPU machine launch() uses the GPUs")
def test_two_cpu_processes_train_with_the_same_infobatch_plans():
    if launch_mod.available_devices()[0] < 2:
        pytest.skip("needs 2 CPU cores")
    r0, r1 = launch(_train_with_infobatch, 192, num_processes=2)
    assert (r0["rank"], r1["rank"]) == (0, 1) and r0["world"] == r1["world"] == 2
    assert r0["backend"] == r1["backend"] == "gloo"
    assert r0["seed_before"] != r1["seed_before"] and r0["seed"] == r1["seed"] == r0["seed_before"]
    assert r0["plans"] == r1["plans"] and len(r0["plans"]) == 3
    assert len(r0["plans"][0]) == 192 and len(r0["plans"][1]) < 192  # the second epoch pruned
    assert r0["values"] == r1["values"]
    assert all(torch.equal(r0["params"][k], r1["params"][k]) for k in r0["params"])


def test_one_process_runs_here():
    assert launch(lambda a, b: a + b, 2, 3, num_processes=1) == [5]


def test_refuses_after_cuda_was_initialised(monkeypatch):
    import accelerate

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(accelerate, "notebook_launcher", lambda *a, **k: pytest.fail("launched anyway"))
    with pytest.raises(RuntimeError, match="CUDA is already initialised") as e:
        launch(print, num_processes=2)
    assert "Restart the kernel" in str(e.value) and "torchrun" in str(e.value)


def test_refuses_more_processes_than_devices(monkeypatch):
    available, what = launch_mod.available_devices()
    with pytest.raises(ValueError, match=f"more than the {available} {what}"):
        launch(print, num_processes=available + 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="more than the 1 GPUs this machine has: use num_processes <= 1"):
        launch(print, num_processes=2)


@pytest.mark.parametrize("kwargs", [{"num_processes": 0}, {"num_processes": True}, {"num_processes": 2.0},
                                    {"num_processes": "2"}, {"port": "29500"}, {"port": 70000}])
def test_refuses_bad_arguments(kwargs):
    with pytest.raises(TypeError):
        launch(print, **kwargs)
    with pytest.raises(TypeError, match="fn must be"):
        launch(3)
