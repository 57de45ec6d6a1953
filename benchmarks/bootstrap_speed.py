"""Seconds per run for evaluate's bootstrap CIs (AUC and accuracy, 1000 stratified resamples of the 624 test
images), `pipeline.metrics.bootstrap_ci` against the same resamples scored one at a time with scikit-learn,
and the largest difference between their interval ends.

    python benchmarks/bootstrap_speed.py [--predictions DIR_OR_CSV] [--boot 1000] [--repeat 3]

Without --predictions: one seeded synthetic binary run of 624 images with tied scores.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.metrics import bootstrap_ci  # noqa: E402


def loop_ci(y: np.ndarray, prob: np.ndarray, n_boot: int, seed: int) -> dict[str, tuple[float, float]]:
    """The per-resample scikit-learn loop bootstrap_ci replaced (same draws, same quantiles)."""
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    aucs, accs = [], []
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(ix, len(ix), replace=True) for ix in by_class])
        p = prob[idx]
        aucs.append(roc_auc_score(y[idx], p[:, 1]) if p.shape[1] == 2 else
                    roc_auc_score(y[idx], p / p.sum(1, keepdims=True), multi_class="ovr", average="macro"))
        accs.append(float((p.argmax(1) == y[idx]).mean()))
    return {m: (float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))) for m, v in (("auc", aucs),
                                                                                       ("accuracy", accs))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--predictions", default="", help="a predictions CSV, or a folder of them (first 5 used)")
    ap.add_argument("--boot", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if args.predictions:
        p = Path(args.predictions)
        files = sorted(p.glob("*.csv"))[:5] if p.is_dir() else [p]
        runs = []
        for f in files:
            df = pd.read_csv(f)
            runs.append((df["label"].to_numpy(), df[[c for c in df.columns if c.startswith("prob_")]].to_numpy()))
    else:
        rng = np.random.default_rng(0)
        y = np.r_[np.zeros(234, int), np.ones(390, int)]  # the Kermany test split's class sizes
        s = np.round(np.clip(0.35 * y + rng.random(624) * 0.65, 0, 1), 2)
        runs = [(y, np.stack([1 - s, s], 1))]
    for name, fn in (("vectorised", lambda y, p: bootstrap_ci(y, p, args.boot, seed=0)),
                     ("scikit-learn loop", lambda y, p: loop_ci(y, p, args.boot, 0))):
        best = min(_timed(fn, runs) for _ in range(args.repeat))
        print(f"{name:<18} {best / len(runs):.3f} s per run ({args.boot} resamples, best of {args.repeat})")
    diff = max(abs(a - b) for y, p in runs for m in ("auc", "accuracy")
               for a, b in zip(bootstrap_ci(y, p, args.boot, seed=0)[m], loop_ci(y, p, args.boot, 0)[m]))
    print(f"largest difference between interval ends: {diff:.2e}")


def _timed(fn, runs) -> float:
    t = time.perf_counter()
    for y, p in runs:
        fn(y, p)
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
