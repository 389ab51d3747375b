"""The few `torch.distributed` facts effilab's state needs, with no-ops in a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_reduce_sum", "broadcast_from_rank0", "collective_device", "end_worker_process", "is_distributed",
           "rank"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def collective_device() -> torch.device:
    """Where the default process group's collectives take their tensors: the current CUDA device for
    NCCL, the CPU for gloo and MPI (and for mixed backends such as "cuda:nccl,cpu:gloo")."""
    backend = str(dist.get_backend()).lower()
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_from_rank0(values: list[int]) -> list[int]:
    """Rank 0's integers on every rank (exact: int64). Collective; identity in a single process."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.int64, device=collective_device())
    dist.broadcast(t, 0)
    return t.tolist()  # sync-ok: a collective's result, once per fit or epoch


def all_reduce_sum(values: list[int]) -> list[int]:
    """Integers summed over ranks (exact: int64). Collective; identity in a single process."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.int64, device=collective_device())
    dist.all_reduce(t)
    return t.tolist()  # sync-ok: a collective's result, once per epoch


def end_worker_process() -> None:
    """End a worker process whose results are written: the process group closed after a barrier, then exit
    without the interpreter's teardown, where gloo's threads now and then abort it ("terminate called without an
    active exception")."""
    import os
    import sys

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
