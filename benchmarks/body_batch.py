"""Would ANIL gain from one body pass over a whole meta-batch? ANIL's body is the same for every task of a meta-batch,
so the support (and query) images of all its tasks could go through it in one batch, with BatchNorm statistics per
task. This times the part that could get faster: a training-mode forward and backward of the meta stage's body over
`--tasks` tasks of 25 support and 75 query images at 64 px (the task shape of benchmarks/meta_throughput.py and
anil_floor.py), in per-task batches (what ANIL does now) against two batches of all tasks' images, alternating.

    python benchmarks/body_batch.py [--model tf_efficientnet_lite0] [--size 64] [--tasks 4] [--rounds 6]

Prints the median seconds of each and a RESULT line; `batched_vs_per_task` above 1 means one big batch is faster.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.backbone import create_backbone  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--support", type=int, default=25)
    ap.add_argument("--query", type=int, default=75)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    model = create_backbone(args.model, num_classes=5)[0].train()
    g = torch.Generator().manual_seed(0)
    shape = (3, args.size, args.size)
    xs = [torch.randn(args.support, *shape, generator=g) for _ in range(args.tasks)]
    xq = [torch.randn(args.query, *shape, generator=g) for _ in range(args.tasks)]
    per_task, batched = xs + xq, [torch.cat(xs), torch.cat(xq)]

    def passes(batches: list[torch.Tensor]) -> float:
        t0 = time.perf_counter()
        for x in batches:
            model.zero_grad(set_to_none=True)
            model.forward_features(x).mean().backward()
        return time.perf_counter() - t0

    passes(per_task), passes(batched)  # warm-up: allocator and oneDNN kernel choice
    a, b = [], []
    for _ in range(args.rounds):
        a.append(passes(per_task))
        b.append(passes(batched))
    ta, tb = statistics.median(a), statistics.median(b)
    n = args.tasks * (args.support + args.query)
    print(f"per-task batches ({2 * args.tasks} of {args.support}/{args.query}): {ta:.3f} s for {n} images "
          f"(median of {args.rounds}; {min(a):.3f}-{max(a):.3f})")
    print(f"two batches ({args.tasks * args.support}/{args.tasks * args.query}): {tb:.3f} s "
          f"(median of {args.rounds}; {min(b):.3f}-{max(b):.3f})")
    print(f"RESULT batched_vs_per_task={ta / tb:.2f}")


if __name__ == "__main__":
    main()
