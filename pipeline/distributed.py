"""torchrun support: one process per device; meta-batch tasks split across ranks, meta-gradients all-reduced.

Only rank 0 writes to the project's MLflow store; other ranks read it (upstream runs, resume state) and send
their own tracking calls to a throwaway store, so stage code needs no rank checks around every log call.
"""
from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .scratch import scratch_dir


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) for a plain run."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return world()[0] == 0


def _local() -> tuple[int, int]:
    return int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", world()[1]))


def backend(device: torch.device) -> str:
    """NCCL for CUDA tensors when every local process has a GPU of its own, gloo for CPU tensors (the small
    loss/accuracy sums, object gathers); gloo alone otherwise (CPU, or several processes per GPU: NCCL refuses two
    ranks on one device, and small fine-tuning jobs gain from sharing a GPU)."""
    if device.type == "cuda" and _local()[1] <= torch.cuda.device_count():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def init(device: torch.device) -> None:
    """Join the process group when started by torchrun (long timeout: ranks meet only between jobs)."""
    rank, size = world()
    if size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(local_device(device))
        dist.init_process_group(backend(device), rank=rank, world_size=size, timeout=timedelta(hours=6))


def local_device(device: torch.device) -> torch.device:
    """This process's device: GPUs are dealt out by local rank (several processes may share one)."""
    if device.type == "cuda" and world()[1] > 1:
        return torch.device("cuda", _local()[0] % max(torch.cuda.device_count(), 1))
    return device


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's `obj` on rank 0 (in rank order), None elsewhere; [obj] for a plain run."""
    rank, size = world()
    if size == 1 or not dist.is_initialized():
        return [obj]
    out = [None] * size if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def from_main(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (e.g. the outputs of a stage only rank 0 ran); `obj` itself for a plain run."""
    if world()[1] == 1 or not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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
    return scratch_dir(f"rank{world()[0]}-mlruns-")
