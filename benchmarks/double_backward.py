"""Seconds per forward + backward and per MAML-style double backward of a timm model, with torch's depthwise
double backward or `pipeline.meta`'s `_DepthwiseConv2d`, and per forward-over-reverse Hessian-vector product (the
reverse sweep's unit of work), contiguous or channels-last; profiler op counts.

    python benchmarks/double_backward.py [--device cpu] [--size 64] [--batch 100] [--reps 2]

The figures behind `channels_last: auto` and the depthwise change in docs/benchmarks.md and docs/gpu.md.
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
from torch.func import functional_call, grad, jvp
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.meta import batch_stats_only, depthwise_double_backward  # noqa: E402


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

    def hvp():  # the reverse sweep's product (pipeline.meta.adapt_vjp): forward-over-reverse, no double backward
        params = {k: v.detach() for k, v in model.named_parameters()}
        u = {k: torch.ones_like(v) for k, v in params.items()}
        with batch_stats_only(model, composite_bn=False):
            jvp(grad(lambda p: F.cross_entropy(functional_call(model, p, (x_in,)), y)), (params,), (u,))

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
              f"_DepthwiseConv2d {timed(second, lambda: depthwise_double_backward(model)):.2f} s; "
              f"forward-over-reverse Hessian-vector product {timed(hvp, nullcontext):.2f} s", flush=True)
    model.to(memory_format=torch.contiguous_format)
    x_in = x
    for label, fn, ctx in (("double backward, torch", second, nullcontext),
                           ("double backward, _DepthwiseConv2d", second, lambda: depthwise_double_backward(model)),
                           ("forward-over-reverse Hessian-vector product", hvp, nullcontext)):
        with ctx(), profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        counts = {e.key: e.count for e in prof.key_averages()}
        print(f"ops in one {label}: " + ", ".join(
            f"{k} {counts.get(k, 0)}" for k in ("aten::_convolution", "aten::convolution_backward", "aten::slice",
                                                 "aten::copy_")))


if __name__ == "__main__":
    main()
