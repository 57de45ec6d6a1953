"""Seconds per forward + backward and per MAML-style double backward of a timm model, with torch's depthwise
double backward or `pipeline.meta`'s `_DepthwiseConv2d`, contiguous or channels-last; profiler op counts.

    python benchmarks/double_backward.py [--device cpu] [--size 64] [--batch 100] [--reps 2]

The figures behind `channels_last: auto` and the depthwise change in the README.
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.meta import depthwise_double_backward  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=5).to(dev).train()
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev)
    y = torch.randint(0, 5, (args.batch,), device=dev)

    def first():
        F.cross_entropy(model(x_in), y).backward()

    def second():
        g = torch.autograd.grad(F.cross_entropy(model(x_in), y), list(model.parameters()), create_graph=True)
        sum((gi * gi).sum() for gi in g).backward()

    def timed(fn, ctx):
        with ctx():
            fn()  # warm-up
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.reps):
                model.zero_grad(set_to_none=True)
                fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
        return (time.perf_counter() - t0) / args.reps

    print(f"{args.model} @ {args.size}px, batch {args.batch}, {dev}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for fmt in (torch.contiguous_format, torch.channels_last):
        model.to(memory_format=fmt)
        x_in = x.contiguous(memory_format=fmt)
        name = "channels-last" if fmt == torch.channels_last else "contiguous"
        print(f"{name:<14} forward+backward {timed(first, nullcontext):.2f} s   "
              f"double backward: torch {timed(second, nullcontext):.2f} s, "
              f"_DepthwiseConv2d {timed(second, depthwise_double_backward):.2f} s", flush=True)
    model.to(memory_format=torch.contiguous_format)
    x_in = x
    for label, ctx in (("torch", nullcontext), ("_DepthwiseConv2d", depthwise_double_backward)):
        with ctx(), profile(activities=[ProfilerActivity.CPU]) as prof:
            second()
        counts = {e.key: e.count for e in prof.key_averages()}
        print(f"ops in one double backward ({label}): "
              + ", ".join(f"{k} {counts.get(k, 0)}" for k in ("aten::_convolution", "aten::slice", "aten::copy_")))


if __name__ == "__main__":
    main()
