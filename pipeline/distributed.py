"""torchrun support: one process per device; meta-batch tasks split across ranks, meta-gradients all-reduced.

Only rank 0 writes to the project's MLflow store; other ranks read it (upstream runs, resume state) and send
their own tracking calls to a throwaway store, so stage code needs no rank checks around every log call.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) for a plain run."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return world()[0] == 0


def init(device: torch.device) -> None:
    """Join the process group (NCCL on CUDA, gloo on CPU) when started by torchrun."""
    rank, size = world()
    if size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=size)


def local_device(device: torch.device) -> torch.device:
    if device.type == "cuda" and world()[1] > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def task_share(n_tasks: int) -> range:
    """This rank's tasks of a meta-batch of n_tasks (contiguous blocks, as even as possible)."""
    rank, size = world()
    per, extra = divmod(n_tasks, size)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (rank < extra))


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    if world()[1] > 1 and dist.is_initialized():
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def side_store() -> Path:
    """Folder of a private throwaway MLflow store for ranks other than 0."""
    return Path(tempfile.mkdtemp(prefix=f"rank{world()[0]}-mlruns-"))
