"""`python -m pipeline data check`: what is in each configured data set, and what is wrong with it."""
from __future__ import annotations

import numpy as np

from .config import PipelineConfig
from .data import SPLITS, DataError, LabeledData, duplicate_report, load_npz, load_target, resolve_dataset_path


def _shape_summary(data: LabeledData, split: str) -> str:
    ims = data.splits[split].images
    if isinstance(ims, np.ndarray):
        return f"{ims.shape[1]}x{ims.shape[2]}x{ims.shape[3]} {ims.dtype}"
    sizes = sorted({(im.shape[1], im.shape[0]) for im in ims})
    return f"{len(sizes)} size(s) {sizes[0][0]}x{sizes[0][1]}..{sizes[-1][0]}x{sizes[-1][1]} uint8" if sizes else "-"


def describe(data: LabeledData, role: str) -> list[str]:
    rows = []
    for s in SPLITS:
        counts = data.counts(s)
        rows.append(f"{role:<7} {data.name:<24} {s:<5} {len(data.splits[s]):>6}  {_shape_summary(data, s):<28} "
                    f"{counts}")
    return rows


def check_all(cfg: PipelineConfig) -> int:
    """Print a table of every data set; return 0 when the target and all sources can be used, else 1."""
    problems: list[str] = []
    print(f"{'role':<7} {'data set':<24} {'split':<5} {'images':>6}  {'image shape':<28} class counts")
    try:
        target = load_target(cfg)
        for line in describe(target, "target"):
            print(line)
        print(f"        classes: {target.class_names}  (from {target.source})")
        dup = duplicate_report(target)
        print("        exact duplicates: " + ", ".join(f"{k}={v}" for k, v in dup.items()))
        for note in target.notes:
            print(f"        note: {note}")
        low = min(target.counts("train"))
        print(f"        largest k-shot possible from train: {low} per class")
        if low < max(cfg.finetune.shots):
            problems.append(f"target: finetune.shots={cfg.finetune.shots} but the smallest train class has "
                            f"{min(target.counts('train'))} images")
    except DataError as e:
        problems.append(f"target: {e}")
    for name in cfg.data.sources:
        try:
            if name == cfg.target.name:
                raise DataError(f"{name} is the target and must not be a source")
            data = load_npz(resolve_dataset_path(name, cfg.data.root), "labels", name)
            for line in describe(data, "source"):
                print(line)
        except DataError as e:
            problems.append(f"source {name}: {e}")
    if problems:
        print("\nPROBLEMS:")
        for p in problems:
            print(f"  - {p}")
        return 1
    print("\nall data sets usable")
    return 0
