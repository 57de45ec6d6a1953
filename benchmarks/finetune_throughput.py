"""Fine-tune throughput of the real recipe (`pipeline.train.fit`: augmentation, per-epoch validation, early
stopping off) on k labelled target images per class, for eager / channels-last / torch.compile variants.
Each variant fine-tunes two fresh models one after the other, so a compile's cost shows up in the first.

    python benchmarks/finetune_throughput.py [--device cuda] [--size 128] [--k 100] [--epochs 10] [--variants ...]
        [--cudnn-benchmark on|off]

Prints one line per variant and, last, `RESULT <variant>=<training images/s of the second model> ...`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.backbone import create_backbone, head_prefix, resolve_data_info  # noqa: E402
from pipeline.config import FinetuneConfig, load_config  # noqa: E402
from pipeline.data import ImageDataset, load_target, sample_kshot  # noqa: E402
from pipeline.device import configure  # noqa: E402
from pipeline.train import fit, stack_inputs  # noqa: E402
from pipeline.transforms import build_transform  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--k", type=int, default=100, help="labelled images per class")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--variants", default="eager,channels_last,compile+channels_last")
    ap.add_argument("--cudnn-benchmark", default="on", choices=["on", "off"], help="cuDNN autotuning on CUDA")
    args = ap.parse_args()
    dev = torch.device(args.device)
    configure(dev, args.cudnn_benchmark == "on")
    root = os.environ.get("PIPELINE_DATA_ROOT") or str(Path(__file__).resolve().parents[2] / "shared" / "data")
    cfg = load_config(None, [f"data.root={root}"])
    target = load_target(cfg)
    tr, va = target.splits["train"], target.splits["val"]
    base, _, _ = create_backbone(cfg.backbone.model, num_classes=2)
    d = resolve_data_info(base)
    idx = sample_kshot(tr.labels, args.k, 0, "train")
    va_idx = sample_kshot(va.labels, 50, 0, "val")
    train_ds = ImageDataset([tr.images[i] for i in idx], tr.labels[idx],
                            build_transform(args.size, d["mean"], d["std"], train=True, seed=0))
    x_val = stack_inputs(ImageDataset([va.images[i] for i in va_idx], va.labels[va_idx],
                                      build_transform(args.size, d["mean"], d["std"], train=False)))
    ft = dataclasses.replace(FinetuneConfig(), epochs=args.epochs, warmup_epochs=1, patience=10**6,
                             batch_size=args.batch_size)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device {dev} ({name}), torch {torch.__version__}, {cfg.backbone.model} @ {args.size}px, "
          f"{len(idx)} training images, batch {args.batch_size}, {args.epochs} epochs, val {len(va_idx)} images")
    result = {}
    for variant in args.variants.split(","):
        cl, comp = "channels_last" in variant, variant.startswith("compile")
        rates = []
        for rep in range(2):
            model, _, _ = create_backbone(cfg.backbone.model, num_classes=2)
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            res = fit(model, train_ds, x_val, va.labels[va_idx], ft, dev, seed=rep, head=head_prefix(model),
                      n_classes=2, num_workers=args.workers, channels_last=cl, compile=comp)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            rates.append(res.images_seen / dt)
            mem = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if dev.type == "cuda" else ""
            print(f"{variant:<24} model {rep + 1}: {dt:7.2f} s for {res.images_seen} training images "
                  f"(+{len(va_idx)} val images per epoch) -> {rates[-1]:8.1f} images/s{mem}", flush=True)
        result[variant] = rates[-1]
    print("RESULT " + " ".join(f"{k}={v:.1f}" for k, v in result.items()))


if __name__ == "__main__":
    main()
