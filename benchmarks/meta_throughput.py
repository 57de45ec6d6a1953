"""Meta-train throughput and peak memory per algorithm, side by side with learn2learn's MAML and plain
supervised SGD over the same image passes. Each method in a fresh process of its own; prints a table (tasks/s
of the median timed meta-batch, with the slowest-fastest range) and, last, a RESULT line.

    python benchmarks/meta_throughput.py [--device cpu|cuda] [--iters 6] [--model tf_efficientnet_lite0]
        [--channels-last auto|on|off] [--compile auto|on|off] [--unroll] [--batched] [--only maml,l2l-maml,...]

Its defaults are the product's: `--channels-last auto` (`channels_last: auto`) and `--compile` as `meta.compile`
(`auto` decides as for a run of the default config's length, `meta.iterations`).

Episodes are real 5-way tasks from the source pool when PIPELINE_DATA_ROOT (or ../shared/data) holds it.
Memory: on CUDA, torch's peak allocated bytes; on CPU, the peak rise of the process's resident set above
its level before the method, sampled every 2 ms by a thread.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.backbone import create_backbone, head_prefix, resolve_data_info  # noqa: E402
from pipeline.config import PipelineConfig  # noqa: E402
from pipeline.device import use_channels_last, use_compile  # noqa: E402
from pipeline.meta import create_learner  # noqa: E402


METHODS = ("maml", "fomaml", "anil", "reptile", "metasgd", "supervised", "l2l-maml", "l2l-maml-fo")


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or sampled RSS rise on CPU."""

    def __init__(self, dev: torch.device):
        self.dev, self.peak = dev, 0

    def __enter__(self):
        gc.collect()
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back so the baseline is honest
        except OSError:
            pass
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.stop = False
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop = True
            self.thread.join()


def episodes(args, dev, mean, std):
    root = Path(os.environ.get("PIPELINE_DATA_ROOT") or Path(__file__).resolve().parents[2] / "shared" / "data")
    n_s, n_q = args.ways * args.shots, args.ways * args.queries
    from pipeline.config import SOURCE_POOL
    present = [n for n in SOURCE_POOL if (root / f"{n}.npz").is_file()]
    if present:
        from pipeline.config import load_config
        from pipeline.data import load_sources
        from pipeline.tasks import EpisodeSampler
        from pipeline.transforms import build_transform
        cfg = load_config(None, [f"data.root={root}", f"data.sources=[{','.join(present)}]"])
        pool = load_sources(cfg)
        s = EpisodeSampler(pool, "train", args.ways, args.shots, args.queries,
                           build_transform(args.size, mean, std, False), "across", seed=0)
        print(f"episodes: real {args.ways}-way {args.shots}-shot {args.queries}-query tasks from {root} "
              f"({', '.join(present)})")
        return [s.batch(i * args.tasks, args.tasks) for i in range(args.iters + 1)]
    print("episodes: random tensors (no source data found)")
    from pipeline.tasks import Episodes
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(args.iters + 1):
        ys = torch.arange(args.ways).repeat_interleave(args.shots).repeat(args.tasks, 1)
        yq = torch.arange(args.ways).repeat_interleave(args.queries).repeat(args.tasks, 1)
        out.append(Episodes(torch.randn(args.tasks, n_s, 3, args.size, args.size, generator=g), ys,
                            torch.randn(args.tasks, n_q, 3, args.size, args.size, generator=g), yq).to(
                                dev, args.channels_last))
    return out


def bench(name, step, batches, dev, tasks, results, cl):
    t0 = time.perf_counter()
    step(batches[0])  # warm-up (allocator, cuDNN autotune, torch.compile)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    times = []
    with PeakMemory(dev) as mem:
        for b in batches[1:]:
            t0 = time.perf_counter()
            step(b)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    # the median meta-batch: a slow spell of the machine (or a stray recompile) in one of them moves it little
    rate = tasks / statistics.median(times)
    results[name] = (rate, mem.peak)
    print("ROW " + json.dumps({"name": name, "rate": rate, "peak": mem.peak}), flush=True)
    print(f"{name:<22} {rate:8.3f} tasks/s ({tasks / max(times):.3f}-{tasks / min(times):.3f})   peak memory "
          f"{mem.peak / 2**20:9.1f} MiB   {'channels-last' if cl else 'contiguous   '}   warm-up meta-batch "
          f"{warm:6.1f} s", flush=True)


def add_task_args(ap: argparse.ArgumentParser) -> None:
    """The model and episode settings every meta-learning benchmark here shares."""
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--ways", type=int, default=5)
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--queries", type=int, default=15)
    ap.add_argument("--inner-steps", type=int, default=5)
    ap.add_argument("--inner-lr", type=float, default=0.01)
    ap.add_argument("--tasks", type=int, default=4, help="tasks per meta-batch")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_args(ap)
    ap.add_argument("--iters", type=int, default=6,
                    help="timed meta-batches per method (after one warm-up); the rate is the median one's")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batched", action="store_true",
                    help="vmap over the tasks of a meta-batch (meta.batched=true) instead of the default per-task loop")
    ap.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"],
                    help="memory format of models and images. on/off: every method alike; auto: each method as "
                         "the product's rule picks it (pipeline.device.use_channels_last): off only for "
                         "autograd double backward (unrolled or vmapped MAML/Meta-SGD, learn2learn's MAML)")
    ap.add_argument("--only", default="", help=f"comma list of methods to run in this process (default: each of "
                                                f"{','.join(METHODS)} in a fresh process of its own)")
    ap.add_argument("--same-process", action="store_true",
                    help="run all methods one after another in this process (measured: a method's rate then "
                         "depends on what ran before it, e.g. learn2learn MAML 0.13 vs 0.18 tasks/s)")
    ap.add_argument("--unroll", action="store_true",
                    help="MAML/Meta-SGD: backprop through the unrolled inner loop (meta.unroll=true) instead of the "
                         "reverse sweep of Hessian-vector products")
    ap.add_argument("--compile", default=PipelineConfig().meta.compile, choices=["auto", "on", "off"],
                    help="torch.compile our per-task functions, as meta.compile (auto: as for a default-length run); "
                         "the untimed warm-up compiles")
    args = ap.parse_args()
    args.compile = use_compile(args.compile, PipelineConfig().meta.iterations, torch.device(args.device))
    if not args.only and not args.same_process:
        return isolated(args)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device {dev} ({where}), "
          f"torch {torch.__version__}, timm {timm.__version__}, model {args.model} @ {args.size}px, "
          f"{args.tasks} tasks/meta-batch, {args.inner_steps} inner steps, "
          f"{'vmap over tasks' if args.batched else 'per-task loop'}"
          f", channels-last {args.channels_last}{', unrolled' if args.unroll else ''}"
          f"{', compiled' if args.compile else ''}")
    only = set(args.only.split(",")) if args.only else None
    base, _, _ = create_backbone(args.model, num_classes=args.ways)
    d = resolve_data_info(base)
    eps = episodes(args, dev, d["mean"], d["std"])
    batches = {cl: [b.to(dev, cl) for b in eps] for cl in (False, True)}

    def cl_for(double_backward: bool) -> bool:
        return use_channels_last(args.channels_last, dev, second_order=double_backward)
    results: dict[str, tuple[float, int]] = {}
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)

    def fresh(cl: bool):
        m, _, _ = create_backbone(args.model, num_classes=args.ways)
        return m.to(dev, memory_format=torch.channels_last if cl else torch.contiguous_format)

    for alg in ("maml", "fomaml", "anil", "reptile", "metasgd"):
        if only and alg not in only:
            continue
        learner = create_learner(fresh(False), alg, args.inner_lr, args.inner_steps, head=head_prefix(base),
                              unroll=args.unroll, compile=args.compile).to(dev)
        cl = cl_for(learner.double_backward(args.batched))
        learner.model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
        opt = torch.optim.Adam(learner.meta_parameters(), 1e-3)

        def step(b, learner=learner, opt=opt):
            opt.zero_grad(set_to_none=True)
            with amp:
                learner.meta_backward(b.xs, b.ys, b.xq, b.yq, batched=args.batched)
            opt.step()
        bench(alg, step, batches[cl], dev, args.tasks, results, cl)
        del learner, opt

    # plain supervised SGD over the same image passes as (FO)MAML: per task, inner_steps passes over the
    # support set, then one pass over the query set, each forward + backward + step.
    cl = cl_for(False)
    model = fresh(cl).train()
    sgd = torch.optim.SGD(model.parameters(), lr=args.inner_lr)
    net = torch.compile(model, dynamic=False) if args.compile else model  # like for like with --compile

    def sup_step(b):
        for t in range(args.tasks):
            for x, y in [(b.xs[t], b.ys[t])] * args.inner_steps + [(b.xq[t], b.yq[t])]:
                sgd.zero_grad(set_to_none=True)
                with amp:
                    F.cross_entropy(net(x), y).backward()
                sgd.step()
    if not only or "supervised" in only:
        bench("supervised", sup_step, batches[cl], dev, args.tasks, results, cl)

    l2l = None
    if not only or any(m.startswith("l2l") for m in only):
        try:
            import learn2learn as l2l
        except ImportError:
            print("learn2learn not installed: skipping it (bash ../shared/tools/install-learn2learn.sh installs it)")
    if l2l is not None:
        for first_order in (False, True):
            if only and f"l2l-maml{'-fo' if first_order else ''}" not in only:
                continue
            cl = cl_for(not first_order)
            maml = l2l.algorithms.MAML(fresh(cl).train(), lr=args.inner_lr, first_order=first_order)
            opt = torch.optim.Adam(maml.parameters(), 1e-3)

            def l2l_step(b, maml=maml, opt=opt):  # learn2learn's documented loop, per-task backward
                opt.zero_grad(set_to_none=True)
                for t in range(args.tasks):
                    learner = maml.clone()
                    with amp:
                        for _ in range(args.inner_steps):
                            learner.adapt(F.cross_entropy(learner(b.xs[t]), b.ys[t]))
                        (F.cross_entropy(learner(b.xq[t]), b.yq[t]) / args.tasks).backward()
                opt.step()
            bench(f"l2l-maml{'-fo' if first_order else ''}", l2l_step, batches[cl], dev, args.tasks, results, cl)
            del maml, opt

    print_result(results)


def isolated(args) -> None:
    """Each method in a fresh process (same arguments plus --only), so none inherits another's heap,
    thread pools or compiled kernels; rows are collected from the children's ROW lines."""
    results: dict[str, tuple[float, int]] = {}
    argv = [a for a in sys.argv[1:]]
    for i, m in enumerate(METHODS):
        p = subprocess.run([sys.executable, __file__, *argv, "--only", m], capture_output=True, text=True)
        for line in p.stdout.splitlines():
            if line.startswith("ROW "):
                r = json.loads(line[4:])
                results[r["name"]] = (r["rate"], r["peak"])
            elif not line.startswith("RESULT") and (i == 0 or not line.startswith(("device ", "episodes: "))):
                print(line, flush=True)
        if p.returncode != 0:
            print(f"{m}: failed (exit {p.returncode})\n{p.stderr[-2000:]}", flush=True)
    print_result(results)


def print_result(results: dict[str, tuple[float, int]]) -> None:
    def ratio(a, b, i=0):
        return f"{results[a][i] / results[b][i]:.2f}" if a in results and b in results and results[b][i] else "nan"
    print(f"RESULT maml_vs_l2l={ratio('maml', 'l2l-maml')} maml_mem_vs_l2l={ratio('maml', 'l2l-maml', 1)} "
          f"fomaml_vs_supervised={ratio('fomaml', 'supervised')} anil_vs_fomaml={ratio('anil', 'fomaml')}")


if __name__ == "__main__":
    main()
