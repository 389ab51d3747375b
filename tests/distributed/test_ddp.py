"""Two-process DDP (gloo, CPU) for InfoBatch: the plain-PyTorch core, the fastai callback under
`effilab.system.distrib_ctx`, and exact indices beyond 2**24.

Each scenario runs once under `torchrun --nproc_per_node 2` (tests/distributed/ddp_worker.py); every
rank saves what it saw and the tests compare the ranks.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ddp_worker.py")
BIG = 2**24
WORLD = 2

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="torch.distributed with the gloo backend is not available in this torch build"),
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(scenario: str, out: Path, timeout: float = 240) -> list[dict]:
    """Run `scenario` on WORLD ranks; return each rank's saved results (rank order)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")  # two ranks share the cores; silences torchrun's notice
    for attempt in range(2):  # a free port may be taken between choosing and binding it
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", f"--nproc_per_node={WORLD}",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(WORKER), scenario, str(out)]
        # Own session: on timeout the whole launcher tree is killed, not just torchrun.
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            log, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
            pytest.fail(f"torchrun {scenario} timed out after {timeout}s:\n{log[-6000:]}")
        if proc.returncode == 0 or attempt or "address already in use" not in log.lower():
            break
    assert proc.returncode == 0, f"torchrun {scenario} failed (exit {proc.returncode}):\n{log[-6000:]}"
    return [torch.load(out / f"{scenario}_rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _shard_check(plan: list[int], shards: list[list[int]]) -> None:
    """The ranks' shards partition the plan, apart from the padding that evens them out."""
    per = math.ceil(len(plan) / WORLD)
    pad = per * WORLD - len(plan)
    assert all(len(s) == per for s in shards), [len(s) for s in shards]
    assert set().union(*map(set, shards)) == set(plan)
    overlap = set(shards[0]) & set(shards[1])
    assert len(overlap) == pad and overlap <= set(plan[:pad])
    assert all(len(set(s)) == len(s) for s in shards)  # no sample twice on one rank


# --------------------------------------------------------------------------------------------- plain


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return _launch("plain", tmp_path_factory.mktemp("ddp_plain"))


def test_plain_plans_and_scores_agree(plain):
    r0, r1 = plain
    assert r0["backend"] == r1["backend"] == "gloo"
    n = r0["epochs"][0]["scores_start"].numel()
    for e0, e1 in zip(r0["epochs"], r1["epochs"]):
        assert e0["plan"] == e1["plan"] and e0["threshold"] == e1["threshold"]
        assert torch.equal(e0["weights"], e1["weights"])
        assert torch.equal(e0["scores_start"], e1["scores_start"])
    assert torch.equal(r0["scores_end"], r1["scores_end"])
    assert all(torch.equal(r0["params"][k], r1["params"][k]) for k in r0["params"])
    kept = [len(e["plan"]) for e in r0["epochs"]]
    assert kept[0] == n and sorted(r0["epochs"][0]["plan"]) == list(range(n))
    assert kept[1] < n and kept[2] < n  # the merged scores did prune
    assert kept[3] == n and torch.all(r0["epochs"][3]["weights"] == 1)  # annealing: floor(0.75 * 4)


def test_plain_shards_partition_the_plan(plain):
    for e0, e1 in zip(*(r["epochs"] for r in plain)):
        _shard_check(e0["plan"], [e0["shard"], e1["shard"]])
        # The sampler's shards are strided slices of the padded plan, in plan order.
        padded = (e0["plan"] * 2)[:math.ceil(len(e0["plan"]) / WORLD) * WORLD]
        assert e0["shard"] == padded[0::WORLD] and e1["shard"] == padded[1::WORLD]
        assert e0["n_batches"] == e1["n_batches"] == math.ceil(len(e0["shard"]) / 32)
        # Before the merge each rank's table holds only what that rank trained on.
        assert e0["touched"] == sorted(set(e0["shard"])) and e1["touched"] == sorted(set(e1["shard"]))


def test_plain_merge_is_the_mean_of_the_ranks_losses(plain):
    r0, r1 = plain
    after = [e["scores_start"] for e in r0["epochs"][1:]] + [r0["scores_end"]]
    for e0, e1, merged in zip(r0["epochs"], r1["epochs"], after):
        total, count = torch.zeros_like(merged), torch.zeros_like(merged)
        for e in (e0, e1):
            idx = torch.tensor(e["shard"])
            total.index_add_(0, idx, e["losses"])
            count.index_add_(0, idx, torch.ones_like(e["losses"]))
        expected = torch.where(count > 0, total / count.clamp_min(1), e0["scores_start"])
        torch.testing.assert_close(merged, expected)
        assert not torch.equal(merged, e0["scores_start"])
    mean_loss = [torch.cat([e0["losses"], e1["losses"]]).mean() for e0, e1 in zip(r0["epochs"], r1["epochs"])]
    assert mean_loss[-1] < 0.5 * mean_loss[0], mean_loss


# --------------------------------------------------------------------------------------------- fastai


@pytest.fixture(scope="module")
def fastai_run(tmp_path_factory):
    return _launch("fastai", tmp_path_factory.mktemp("ddp_fastai"))


def test_fastai_context_installs_and_removes_the_trainer(fastai_run):
    for r in fastai_run:
        assert r["backend"] == "gloo"
        assert "CPUSafeDistributedTrainer" in r["in_ctx"]
        assert "CPUSafeDistributedTrainer" not in r["cbs_after"]
        assert r["loader_types"] == ["CPUSafeDistributedDL"] * 4
        assert r["model_after"] == "Sequential" and r["loaders_after"] == ["DataLoader", "DataLoader"]
        # Even after an exception inside fit, the model and loaders come back unwrapped.
        assert r.get("crash", "").endswith("boom")
        assert r["crash_model"] == "Sequential" and r["crash_loaders"] == ["DataLoader", "DataLoader"]
        assert "CPUSafeDistributedTrainer" not in r["crash_cbs"]
    # Progress bars: only rank 0 shows one inside the context; rank 1 gets it back afterwards.
    assert "ProgressCallback" in fastai_run[0]["in_ctx"] and "ProgressCallback" not in fastai_run[1]["in_ctx"]
    assert "ProgressCallback" in fastai_run[1]["cbs_after"]


def test_fastai_ranks_share_seed_plans_and_scores(fastai_run):
    r0, r1 = fastai_run
    # The worker seeded each rank differently, so InfoBatch(seed=None) drew different seeds.
    assert r0["seed_before"] != r1["seed_before"]
    assert r0["seed_after"] == r1["seed_after"] == r0["seed_before"]
    assert r0["epoch_records"] == r1["epoch_records"] and len(r0["epoch_records"]) == 4
    assert r0["plans"] == r1["plans"]
    assert torch.equal(r0["scores"], r1["scores"]) and not torch.all(r0["scores"] == 1)
    assert all(torch.equal(r0["params"][k], r1["params"][k]) for k in r0["params"])
    kept = [rec["kept"] for rec in r0["epoch_records"]]
    assert kept[0] == 800 and kept[3] == 800 and r0["epoch_records"][3]["annealing"]
    assert kept[1] < 800 and kept[2] < 800
    assert r0["epoch_records"][1]["threshold"] < r0["epoch_records"][0]["threshold"]
    assert [len(p) for p in r0["plans"]] == kept


def test_fastai_each_rank_forwards_its_half_of_the_plan(fastai_run):
    r0, r1 = fastai_run
    for e, plan in enumerate(r0["plans"]):
        _shard_check(plan, [r0["shards"][e], r1["shards"][e]])
        for r in fastai_run:  # telemetry counts the whole run: the ranks' shards, padding included
            assert len(r["shards"][e]) == math.ceil(len(plan) / WORLD)
            assert r["sample_records"][e]["forwarded"] == WORLD * math.ceil(len(plan) / WORLD)


def test_fastai_training_loss_falls(fastai_run):
    train_loss = [v[0] for v in fastai_run[0]["recorder"]]
    assert fastai_run[0]["recorder"] == fastai_run[1]["recorder"]  # losses are gathered over ranks
    assert train_loss[-1] < 0.75 * train_loss[0], train_loss


# --------------------------------------------------------------------------------------------- 2**24


@pytest.fixture(scope="module")
def bigindex(tmp_path_factory):
    return _launch("bigindex", tmp_path_factory.mktemp("ddp_bigindex"))


def test_indices_beyond_2_24_are_exact(bigindex):
    # float32 would round BIG + 3 -> BIG + 4 and BIG + 7 -> BIG + 8: exact positions prove int indices.
    for r in bigindex:
        assert r["n"] == BIG + 10
        assert r["changed"] == [BIG + 3, BIG + 7, BIG + 9]
        assert r["values"] == [3.25, 7.5, 2.0]  # BIG + 9 was written by both ranks: their mean
        assert r["seen"] == [BIG + 3, BIG + 7, BIG + 9]
        assert r["broadcast"] == [BIG + 7, BIG + 3, BIG + 9, 5]  # rank 0's list, on every rank


# --------------------------------------------------------------------------------------------- one process


@pytest.mark.parametrize("world_size", [None, "1"])
def test_distrib_ctx_is_a_no_op_in_one_process(monkeypatch, world_size):
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from torch.utils.data import TensorDataset

    from effilab.system import distrib_ctx

    if world_size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    ds = TensorDataset(torch.randn(16, 3), torch.randint(0, 2, (16,)))
    model = torch.nn.Linear(3, 2)
    learn = Learner(DataLoaders(DataLoader(ds, bs=8), DataLoader(ds, bs=8), device="cpu"), model,
                    loss_func=CrossEntropyLossFlat())
    cbs = list(learn.cbs)
    with distrib_ctx(learn, cpu=True) as ctx:
        assert ctx is learn and list(learn.cbs) == cbs
    assert learn.model is model and list(learn.cbs) == cbs


# --------------------------------------------------------------------------------------- every technique


@pytest.fixture(scope="module")
def technique_runs(tmp_path_factory):
    return _launch("techniques", tmp_path_factory.mktemp("ddp_techniques"))


def test_every_stateful_technique_agrees_across_ranks(technique_runs):
    from effilab.registry import all_techniques

    stateful = sorted(n for n, t in all_techniques().items() if t.stateful)
    r0, r1 = technique_runs
    assert sorted(set(r0) - {"backend"}) == stateful and "infobatch" in stateful
    for name in stateful:
        assert r0[name]["telemetry"] == r1[name]["telemetry"], name
        assert any(recs for recs in r0[name]["telemetry"].values()), f"{name} wrote no epoch telemetry"
        for key, value in r0[name]["params"].items():
            assert torch.equal(value, r1[name]["params"][key]), f"{name}: {key} differs between ranks"
        _assert_same_state(r0[name]["state"], r1[name]["state"], name)


def _assert_same_state(a, b, where):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_state(a[k], b[k], f"{where}.{k}")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), where
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# --------------------------------------------------------------------------------------------- FSDP2


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    return _launch("fsdp", tmp_path_factory.mktemp("ddp_fsdp"))


def test_fsdp_shards_the_model_inside_the_context_and_gives_a_plain_one_back(fsdp_run):
    for r in fsdp_run:
        assert r["ddp"]["inside"] == {"model": "DistributedDataParallel", "param": "Parameter", "units": 0,
                                      "local_shape": (32, 12)}
        # Each rank holds half of every parameter (dim 0) inside the context.
        assert r["fsdp"]["inside"] == {"model": "FSDPSequential", "param": "DTensor", "units": 1,
                                       "local_shape": (16, 12)}
        assert r["fsdp_blocks"]["inside"]["units"] == 3  # the two Linear layers and the root
        for kind in ("fsdp", "fsdp_blocks"):
            assert r[kind]["model_after"] == "Sequential" and r[kind]["param_after"] == "Parameter"
        assert r["fsdp"]["fit_after"] == 1  # the plain model trains on after the context


def test_fsdp_trains_as_ddp_does(fsdp_run):
    """Averaged gradients, reduce-scattered instead of all-reduced: the same InfoBatch plans, losses and weights."""
    r0, r1 = fsdp_run
    for kind in ("fsdp", "fsdp_blocks"):
        for r in fsdp_run:
            assert r[kind]["epochs"] == r["ddp"]["epochs"] and r[kind]["values"] == r["ddp"]["values"]
            for k, v in r["ddp"]["params"].items():
                torch.testing.assert_close(r[kind]["params"][k], v, rtol=1e-5, atol=1e-6)
        assert r0[kind]["params"].keys() == r1[kind]["params"].keys()
        assert all(torch.equal(r0[kind]["params"][k], r1[kind]["params"][k]) for k in r0[kind]["params"])
    kept = [e["kept"] for e in r0["fsdp"]["epochs"]]
    assert kept[1] < kept[0]  # InfoBatch pruned under FSDP too
    train_loss = [v[0] for v in r0["fsdp"]["values"]]
    assert train_loss[-1] < train_loss[0]


def test_fsdp_refuses_whole_parameter_state_and_unshards_after_a_crash(fsdp_run):
    for r in fsdp_run:
        assert "EMA: its averaged copy" in r["refused"] and "fsdp=False" in r["refused"]
        assert r["crash"].endswith("boom")
        assert r["crash_model"] == "Sequential" and r["crash_loaders"] == ["DataLoader", "DataLoader"]


@pytest.mark.parametrize("name", ["sam", "looksam", "ema", "swa", "lawa", "lamb", "lars"])
def test_fsdp_refusal_names_the_technique_before_anything_starts(name):
    from effilab.registry import all_techniques
    from effilab.system import distrib_ctx
    from tests.conftest import make_learner

    cb = all_techniques()[name].make()
    learn = make_learner([cb])
    with pytest.raises(ValueError, match=f"{type(cb).__name__}: .*whole|{type(cb).__name__}: .*norm"):
        with distrib_ctx(learn, fsdp=True):
            pytest.fail("the context was entered")


@pytest.mark.parametrize("fsdp", ["yes", (), (3,), (torch.Tensor,)])
def test_fsdp_option_must_be_a_bool_or_module_classes(fsdp):
    from effilab.system import distrib_ctx
    from tests.conftest import make_learner

    with pytest.raises(TypeError, match="fsdp must be"):
        with distrib_ctx(make_learner([]), fsdp=fsdp):
            pass


@pytest.fixture(scope="module")
def fsdp_technique_runs(tmp_path_factory):
    return _launch("fsdp_techniques", tmp_path_factory.mktemp("ddp_fsdp_techniques"))


def test_every_technique_trains_under_fsdp_or_is_refused_by_name(fsdp_technique_runs):
    from effilab.registry import all_techniques
    from effilab.system.distributed import FSDP_REFUSED

    r0, r1 = fsdp_technique_runs
    techniques = all_techniques()
    assert sorted(set(r0) - {"backend"}) == sorted(techniques)
    for name in techniques:
        cls = type(techniques[name].make()).__name__
        if cls in FSDP_REFUSED:
            assert f"{cls}: {FSDP_REFUSED[cls]}" in r0[name]["refused"], name
            continue
        assert "refused" not in r0[name], r0[name].get("refused")
        assert r0[name]["model_after"] == r1[name]["model_after"] != "FSDPSequential"
        assert r0[name]["values"] == r1[name]["values"], name
        for key, value in r0[name]["params"].items():
            assert torch.equal(value, r1[name]["params"][key]), f"{name}: {key} differs between ranks"
        # Timings (seconds, and what is derived from them) differ between ranks; every technique's other records agree.
        def untimed(tele):
            return {s: [{k: v for k, v in rec.items() if not k.endswith("_s") and k != "break_even_step"}
                        for rec in recs] for s, recs in tele.items() if s != "fit"}

        assert untimed(r0[name]["telemetry"]) == untimed(r1[name]["telemetry"]), name
    assert {n for n in techniques if "refused" in r0[n]} == {"sam", "looksam", "ema", "swa", "lawa", "lamb", "lars",
                                                                 "fp8", "model_growth", "model_widening",
                                                                 "sparse_rigl", "sparse_set", "whiten_first_conv",
                                                                 "rezero"}
