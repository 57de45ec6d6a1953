"""What saving a fine-tune job's progress costs (`finetune.checkpoint_seconds`, pipeline/job_state.py): the time to
write one mid-fit state (weights, AdamW state, best weights so far, random streams) and its size, for each body,
next to the time of one training epoch of the default recipe at k=20 on this machine.

    python benchmarks/job_state_cost.py [--models tf_efficientnet_lite0 tf_efficientnet_lite2] [--repeats 5]

Prints one line per model and a RESULT line; the default writes at most one state a minute, so the overhead is
about (write seconds) / 60 of a job's time.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.backbone import create_backbone, resolve_data_info  # noqa: E402
from pipeline.config import FinetuneConfig  # noqa: E402
from pipeline.job_state import JobState  # noqa: E402
from pipeline.train import FitResult  # noqa: E402
from pipeline.transforms import build_transform  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tf_efficientnet_lite0", "tf_efficientnet_lite2"])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    ft = FinetuneConfig()
    out = []
    for name in args.models:
        model, _, _ = create_backbone(name, num_classes=2)
        d = resolve_data_info(model)
        opt = torch.optim.AdamW(model.parameters(), lr=ft.lr_body, weight_decay=ft.weight_decay)
        # one epoch of the recipe at k=20 (40 images at 128 px, batch 32), which also fills AdamW's state
        x, y = torch.randn(40, 3, ft.image_size or 128, ft.image_size or 128), torch.arange(40) % 2
        t0 = time.perf_counter()
        model.train()
        for i in range(0, 40, ft.batch_size):
            opt.zero_grad()
            F.cross_entropy(model(x[i:i + ft.batch_size]), y[i:i + ft.batch_size]).backward()
            opt.step()
        epoch_s = time.perf_counter() - t0
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        with tempfile.TemporaryDirectory() as tmp:
            state = JobState(Path(tmp) / "job.pt", every_s=0)
            state.track(build_transform(128, d["mean"], d["std"], train=True, seed=0),
                        build_transform(128, d["mean"], d["std"], train=True, seed=0, strong=True))
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                state.save_fit(0, {"epoch": 1, "model": model.state_dict(), "opt": opt.state_dict(),
                                   "g": torch.Generator().get_state(), "best": FitResult(0, 0.5),
                                   "best_key": (0.5, -0.7), "best_state": best_state, "since": 0})
                times.append(time.perf_counter() - t0)
            mib = state.path.stat().st_size / 2**20
        write_s = statistics.median(times)
        out.append((name, write_s, mib, epoch_s))
        print(f"{name}: one state {mib:.1f} MiB written in {write_s:.3f} s (median of {args.repeats}); "
              f"one k=20 training epoch {epoch_s:.2f} s", flush=True)
    print("RESULT " + " ".join(f"{n}_write_s={w:.3f} {n}_mib={m:.1f}" for n, w, m, _ in out))


if __name__ == "__main__":
    main()
