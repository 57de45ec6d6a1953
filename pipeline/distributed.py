"""torchrun support: one process per device; meta-batch tasks split across ranks, meta-gradients all-reduced;
fine-tuning jobs shared as a work queue (`share_work`).

Only rank 0 writes to the project's MLflow store; other ranks read it (upstream runs, resume state) and send
their own tracking calls to a throwaway store, so stage code needs no rank checks around every log call.
"""
from __future__ import annotations

import os
import pickle
import queue
import signal
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

from .scratch import scratch_dir

T = TypeVar("T")
R = TypeVar("R")
_watcher: threading.Thread | None = None  # watch_launcher's thread, once started


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) for a plain run."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return world()[0] == 0


def _local() -> tuple[int, int]:
    return int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", world()[1]))


def backend(device: torch.device) -> str:
    """NCCL for CUDA tensors when every local process has a GPU of its own, gloo for CPU tensors (the small
    loss/accuracy sums, object broadcasts, the fine-tune queue's messages); gloo alone otherwise (CPU, or several
    processes per GPU: NCCL refuses two ranks on one device, and small fine-tuning jobs gain from sharing a GPU)."""
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


def watch_launcher(grace_s: float = 30.0, poll_s: float = 1.0) -> threading.Thread | None:
    """Under torchrun, end this process when its launcher dies; None (no thread) in a plain run.

    torchrun starts its workers in sessions of their own, so a SIGKILL of the launcher (or of its process group)
    leaves them training, and the same command run again would train beside them instead of resuming. A daemon
    thread sees the launcher go (the parent pid changes) and sends this process SIGTERM, which ends its runs
    KILLED; a process still alive `grace_s` later (stuck in a collective) gets SIGKILL, and the next pipeline
    process closes what it left RUNNING."""
    global _watcher
    if world()[1] == 1:
        return None
    if _watcher is not None:  # one per process, however many pipelines it chains
        return _watcher
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(poll_s)
        print(f"[rank {world()[0]}] the torchrun launcher (pid {launcher}) is gone; stopping", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os.kill(os.getpid(), signal.SIGKILL)

    _watcher = threading.Thread(target=watch, name="launcher-watch", daemon=True)
    _watcher.start()
    return _watcher


def local_device(device: torch.device) -> torch.device:
    """This process's device: GPUs are dealt out by local rank (several processes may share one)."""
    if device.type == "cuda" and world()[1] > 1:
        return torch.device("cuda", _local()[0] % max(torch.cuda.device_count(), 1))
    return device


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


_SIZE, _DATA = 7, 8  # tags of `share_work`'s messages: gloo pairs a send with a receive by source rank and tag


def _send(obj: Any, dst: int) -> None:
    """`obj` to rank `dst` as pickled CPU tensors (`send_object_list` cannot pair with a receive from any rank)."""
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    dist.send(torch.tensor([data.numel()]), dst, tag=_SIZE)
    dist.send(data, dst, tag=_DATA)


def _recv(src: int | None = None) -> tuple[int, Any]:
    """(sender, object) of the next `_send` to this rank from `src`, or from any rank."""
    size = torch.zeros(1, dtype=torch.long)
    src = dist.recv(size, src, tag=_SIZE)
    data = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.recv(data, src, tag=_DATA)
    return src, pickle.loads(data.numpy().tobytes())


_END = object()  # the end of `_Dealer.results`


class _Dealer:
    """Rank 0's side of `share_work`: hands out item numbers in order (to its own main thread and, from a thread,
    to the other ranks as they ask) and passes every result to `on_result` in one thread of its own."""

    def __init__(self, n_items: int, on_result: Callable[[Any], None], world_size: int):
        self.n_items, self.on_result, self.world_size = n_items, on_result, world_size
        self.next, self.lock = 0, threading.Lock()
        self.results: queue.Queue = queue.Queue()
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._answer, daemon=True, name="share_work-dealer"),
                        threading.Thread(target=self._hand_on, daemon=True, name="share_work-results")]

    def take(self) -> int | None:
        """The next item's number, None when every item is taken."""
        with self.lock:
            if self.errors or self.next >= self.n_items:  # after a failure every rank stops at its next ask
                return None
            self.next += 1
            return self.next - 1

    def _answer(self) -> None:
        """Each message of another rank carries its last result (nothing at first) and asks for the next item; the
        answer goes first, so that rank trains on while the result is logged. Ends when every rank was told None."""
        try:
            done = 0
            while done < self.world_size - 1:
                src, result = _recv()  # () on a rank's first ask, else (its last result,)
                i = self.take()
                _send(i, src)
                done += i is None
                if result:
                    self.results.put(result[0])
        except BaseException as e:  # re-raised by `finish` in the main thread
            self.errors.append(e)

    def _hand_on(self) -> None:
        while (item := self.results.get()) is not _END:
            if not self.errors:  # after a failure, drain without calling on_result
                try:
                    self.on_result(item)
                except BaseException as e:
                    self.errors.append(e)

    def finish(self) -> None:
        """Wait for the other ranks' last results and for `on_result` on every result; raise the first error."""
        self.threads[0].join()
        self.results.put(_END)
        self.threads[1].join()
        if self.errors:
            raise self.errors[0]


def share_work(items: Sequence[T], work: Callable[[T], R], on_result: Callable[[R], None]) -> int:
    """Work through `items` on every torchrun rank as a queue: each rank takes the next item as soon as it is free,
    so a slow item holds up its own rank only (rounds of one item per rank left the others idle behind it). Rank 0
    deals the items in order and calls `on_result(work(item))` for every item, its own and those the other
    ranks send it, each as soon as it arrives, one at a time, in a thread of its own; other ranks never call it.
    `work` must not depend on which rank runs it. Every rank must call this with the same items. Returns how many
    items this rank worked; alone (no torchrun) it works and hands on every item in order."""
    rank, size = world()
    if size == 1 or not dist.is_initialized():
        for item in items:
            on_result(work(item))
        return len(items)
    done = 0
    if rank > 0:
        last: tuple = ()
        while True:
            _send(last, 0)
            i = _recv(0)[1]
            if i is None:
                return done
            last, done = (work(items[i]),), done + 1
    dealer = _Dealer(len(items), on_result, size)
    for t in dealer.threads:
        t.start()
    while not dealer.errors and (i := dealer.take()) is not None:
        dealer.results.put(work(items[i]))
        done += 1
    dealer.finish()
    return done
