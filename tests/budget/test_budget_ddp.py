"""Two-process DDP (gloo, CPU): every rank stops on the same step, and the budget is the global spend."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ddp_budget_worker.py")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs the gloo backend"),
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_rank_stops_on_the_same_step(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(WORKER), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    # DDP: 2 ranks x 32 samples a step, 1000 samples -> 16 steps on each rank
    assert r0["ddp"] == r1["ddp"] == (16, 1024.0, 2)
    # batches of 16 and 32: 48 samples a step, 960 -> 20 steps on both (alone: 60 and 30)
    assert r0["uneven"] == r1["uneven"] == (20, 960.0)
    # 0.1 and 0.3 s a step, 6 s: the slower rank's clock ends both after 20 charged steps + the warm-up step
    assert r0["seconds"][0] == r1["seconds"][0] == 21
    assert r0["seconds"][1] == r1["seconds"][1] == pytest.approx(6.0)
