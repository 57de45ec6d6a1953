"""Logits of a freshly built 2-class ImageNet model before any fine-tuning (the `finetune.zero_head` question):
timm's init of a new head against a zero head, on the first 32 images of each class of the target's
validation split.

    python benchmarks/head_init.py [--size 128] [--seed 0]

Prints the logits' standard deviation, the mean |logit difference| between the classes, and the cross-entropy (balanced: log 2 = 0.693 for zero logits).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.backbone import create_backbone, resolve_data_info, zero_head  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data import ImageDataset, load_target  # noqa: E402
from pipeline.train import stack_inputs  # noqa: E402
from pipeline.transforms import build_transform  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    root = os.environ.get("PIPELINE_DATA_ROOT") or str(Path(__file__).resolve().parents[2] / "shared" / "data")
    cfg = load_config(None, [f"data.root={root}"])
    va = load_target(cfg).splits["val"]
    model, _, _ = create_backbone(cfg.backbone.model, num_classes=2, seed=args.seed)
    d = resolve_data_info(model)
    idx = np.concatenate([np.flatnonzero(va.labels == c)[:32] for c in (0, 1)])
    x = stack_inputs(ImageDataset([va.images[i] for i in idx], va.labels[idx],
                                  build_transform(args.size, d["mean"], d["std"], train=False)))
    y = torch.as_tensor(va.labels[idx])
    for name in ("timm init", "zero head"):
        if name == "zero head":
            zero_head(model)
        with torch.no_grad():
            z = model.eval()(x)
        print(f"{name:<10} logit std {z.std().item():7.3f}  mean |z1 - z0| {(z[:, 1] - z[:, 0]).abs().mean().item():7.3f}"
              f"  cross-entropy {F.cross_entropy(z, y).item():.3f}")


if __name__ == "__main__":
    main()
