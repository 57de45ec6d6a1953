"""ANIL against first-order MAML and against its own floor, timed in turns in one process.

    python benchmarks/anil_floor.py [--rounds 12] [--device cpu|cuda] [--compile auto|on|off]

ANIL's body is meta-learned, so every task needs at least one forward and one backward of the body over its
support and query images; `floor` times exactly that (plain autograd on the same images, compiled like the
others). First-order MAML passes the support set `inner_steps` times and the query set once, so with the
defaults (25 support, 75 query images, 5 steps) it does 200 image passes per task to ANIL's floor of 100.
The three take turns, one meta-batch each per round, so a slow spell of the machine hits all of them alike
(`meta_throughput.py` times each method in a process of its own, minutes apart); rates come from the median
meta-batch. Same episodes and settings as `meta_throughput.py`. Last line:

    RESULT anil_vs_fomaml=<rate ratio> anil_vs_floor=<rate ratio> fomaml_vs_floor=<rate ratio>
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from meta_throughput import add_task_args, episodes  # noqa: E402
from pipeline.backbone import create_backbone, head_prefix, resolve_data_info  # noqa: E402
from pipeline.config import PipelineConfig  # noqa: E402
from pipeline.device import use_channels_last, use_compile  # noqa: E402
from pipeline.meta import create_learner  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_args(ap)
    ap.add_argument("--rounds", type=int, default=12, help="timed meta-batches per method, taken in turns")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--compile", default=PipelineConfig().meta.compile, choices=["auto", "on", "off"])
    args = ap.parse_args()
    dev = torch.device(args.device)
    compiled = use_compile(args.compile, PipelineConfig().meta.iterations, dev)
    cl = use_channels_last(args.channels_last, dev, second_order=False)  # neither needs autograd double backward
    fmt = torch.channels_last if cl else torch.contiguous_format
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    torch.manual_seed(0)

    def fresh() -> torch.nn.Module:
        return create_backbone(args.model, num_classes=args.ways)[0].to(dev, memory_format=fmt)

    base = fresh()
    d = resolve_data_info(base)
    args.iters = args.rounds  # episodes() draws iters + 1 meta-batches; the first is the warm-up
    batches = [b.to(dev, cl) for b in episodes(args, dev, d["mean"], d["std"])]

    steps = {}
    for alg in ("anil", "fomaml"):
        learner = create_learner(fresh(), alg, args.inner_lr, args.inner_steps, head=head_prefix(base),
                                 compile=compiled).to(dev)
        opt = torch.optim.Adam(learner.meta_parameters(), 1e-3)

        def step(b, learner=learner, opt=opt):
            opt.zero_grad(set_to_none=True)
            with amp:
                learner.meta_backward(b.xs, b.ys, b.xq, b.yq, batched=False)
            opt.step()
        steps[alg] = step

    model = fresh().train()
    net = torch.compile(model, dynamic=False) if compiled else model
    opt = torch.optim.Adam(model.parameters(), 1e-3)

    def floor(b):  # one forward and one backward of the body over each task's support and query images
        opt.zero_grad(set_to_none=True)
        for t in range(args.tasks):
            with amp:
                loss = F.cross_entropy(net(b.xs[t]), b.ys[t]) + F.cross_entropy(net(b.xq[t]), b.yq[t])
            loss.backward()
        opt.step()
    steps["floor"] = floor

    print(f"device {dev}, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.model} @ {args.size}px, "
          f"{args.tasks} tasks/meta-batch, {args.inner_steps} inner steps, channels-last {cl}, "
          f"{'compiled' if compiled else 'eager'}, {args.rounds} rounds")
    for name, step in steps.items():
        t0 = time.perf_counter()
        step(batches[0])  # warm-up: allocator, torch.compile
        print(f"{name:<7} warm-up {time.perf_counter() - t0:6.1f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.rounds):
        for name, step in steps.items():
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(batches[1 + r])
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    rate = {name: args.tasks / statistics.median(ts) for name, ts in times.items()}
    for name, ts in times.items():
        print(f"{name:<7} {rate[name]:7.3f} tasks/s (median of {len(ts)} meta-batches; "
              f"fastest {args.tasks / min(ts):.3f}, slowest {args.tasks / max(ts):.3f})")
    print(f"RESULT anil_vs_fomaml={rate['anil'] / rate['fomaml']:.2f} anil_vs_floor={rate['anil'] / rate['floor']:.2f} "
          f"fomaml_vs_floor={rate['fomaml'] / rate['floor']:.2f}")


if __name__ == "__main__":
    main()
