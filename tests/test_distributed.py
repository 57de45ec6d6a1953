"""`distributed.share_work`, the torchrun work queue, in real processes joined by a real gloo process group."""
from __future__ import annotations

import os
import socket
import threading
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline import distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sleep_for(seconds: float) -> tuple[float, int]:
    """Work of `seconds` (the queue is what is tested, not training), returning the rank that did it."""
    time.sleep(seconds)
    return seconds, dist.get_rank()


class Collect:
    """`on_result` that records each result and the thread it ran in; raises on the `fail_at`-th result."""

    def __init__(self, fail_at: int = 0):
        self.results: list = []
        self.threads: set[str] = set()
        self.fail_at = fail_at

    def __call__(self, result) -> None:
        self.results.append(result)
        self.threads.add(threading.current_thread().name)
        if len(self.results) == self.fail_at:
            raise RuntimeError("logging failed")


def worker(rank: int, size: int, port: int, items: list[float], fail_at: int, out) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    collect = Collect(fail_at)
    try:
        n = distributed.share_work(items, sleep_for, collect)
        out.put((rank, n, collect.results, sorted(collect.threads), ""))
    except RuntimeError as e:
        out.put((rank, -1, collect.results, sorted(collect.threads), str(e)))
    dist.destroy_process_group()


def run_ranks(size: int, items: list[float], fail_at: int = 0) -> dict[int, tuple]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, size, port, items, fail_at, out))
             for port in [free_port()] for r in range(size)]
    for p in procs:
        p.start()
    got = dict((r, rest) for r, *rest in (out.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return got


def test_a_free_rank_takes_the_next_item_and_rank_0_gets_every_result_in_its_own_thread():
    """One slow item and six fast ones on 2 ranks: the rank that takes the slow item works that one alone while the
    other works all six (rounds of one item per rank would give 4 and 3); rank 0 hands on all 7 results, the other
    rank's among them, never from its main thread, and rank 1 none."""
    items = [2.0] + [0.02] * 6
    got = run_ranks(2, items)
    counts = {r: got[r][0] for r in got}
    assert sorted(counts.values()) == [1, 6]
    results = got[0][1]
    assert sorted(s for s, _ in results) == sorted(items)
    slow_rank = next(r for s, r in results if s == 2.0)
    assert counts[slow_rank] == 1 and {r for s, r in results if s < 1} == {1 - slow_rank}
    assert got[0][2] == ["share_work-results"] and got[1][1] == []


def test_three_ranks_work_each_item_exactly_once():
    items = [0.05 * (i % 3) for i in range(10)]
    got = run_ranks(3, items)
    assert sum(got[r][0] for r in got) == 10 and all(got[r][0] >= 1 for r in got)
    assert sorted(s for s, _ in got[0][1]) == sorted(items)
    assert {r for _, r in got[0][1]} == {0, 1, 2}


def test_a_failing_on_result_stops_every_rank_and_raises_on_rank_0():
    """The second result's handling fails: rank 0 raises that error once the others stop at their next ask (no
    rank left waiting), and the remaining items are not worked."""
    items = [0.2] * 12
    got = run_ranks(2, items, fail_at=2)
    assert got[0][3] == "logging failed" and got[1][3] == ""
    assert got[1][0] <= 3  # rank 1 stopped at its next ask instead of working its 6 of the 12


def test_alone_works_every_item_in_order():
    seen = []
    assert distributed.share_work([3, 1, 2], lambda x: x * 10, seen.append) == 3
    assert seen == [30, 10, 20]
