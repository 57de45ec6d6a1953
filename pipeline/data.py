"""Data sets: MedMNIST-style npz, image folders and CSVs, k-shot subsets and torch Datasets.

Every image is held as an HxWx3 uint8 array (grey is replicated to three channels), because every
backbone here is ImageNet-shaped; the transform resizes and normalises it.
"""
from __future__ import annotations

import csv
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".pgm", ".ppm"}


class DataError(ValueError):
    """A data set that is missing or cannot be used; the message names the file and the fix."""


@dataclass
class Split:
    images: list[np.ndarray] | np.ndarray  # each HxWx3 uint8
    labels: np.ndarray  # int64 (N,)
    files: list[str] = field(default_factory=list)  # where each image came from, for messages

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class LabeledData:
    """A data set with named classes and train/val/test splits."""

    name: str
    source: str  # file or folder it was read from
    class_names: list[str]
    splits: dict[str, Split]
    notes: list[str] = field(default_factory=list)  # warnings found while reading (skipped files ...)

    def counts(self, split: str) -> list[int]:
        return np.bincount(self.splits[split].labels, minlength=len(self.class_names)).tolist()


def resolve_data_root(root: str = "") -> Path:
    """Config value, else $PIPELINE_DATA_ROOT, else ./data."""
    return Path(root or os.environ.get("PIPELINE_DATA_ROOT") or "data").expanduser().resolve()


def resolve_dataset_path(name_or_path: str, root: str = "") -> Path:
    """A data set named `x` is `<root>/x.npz`; a path (with a suffix or a folder) is used as it is."""
    p = Path(name_or_path).expanduser()
    if p.suffix or p.is_absolute() or p.exists():
        return p
    return resolve_data_root(root) / f"{name_or_path}.npz"


def to_rgb_uint8(arr: np.ndarray) -> np.ndarray:
    """(H,W) or (H,W,1|3|4) uint8 -> (H,W,3) uint8."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif arr.shape[-1] == 4:
        arr = arr[..., :3]
    return np.ascontiguousarray(arr)


def read_image(path: Path) -> np.ndarray:
    """Any image PIL reads (8/16-bit grey, RGB, RGBA, palette), EXIF orientation applied, as HxWx3 uint8."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            a = np.asarray(im, dtype=np.float64)
            lo, hi = float(a.min()), float(a.max())
            a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
            return to_rgb_uint8(a.round().astype(np.uint8))
        if im.mode in ("RGBA", "LA", "P", "PA"):
            rgba = im.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))  # transparent -> black, as radiographs
            im = Image.alpha_composite(bg, rgba)
        if im.mode not in ("L", "RGB"):
            im = im.convert("RGB")
        return to_rgb_uint8(np.asarray(im))


def load_npz(path: Path, label_key: str = "labels", name: str | None = None) -> LabeledData:
    """A MedMNIST-style npz: `{split}_images` (N,H,W[,3]) uint8 and `{split}_{label_key}` (N,1)."""
    if not path.is_file():
        raise DataError(
            f"data set file {path} not found. Put the npz there, point the data root at its folder "
            f"(--set data.root=DIR or PIPELINE_DATA_ROOT=DIR), or pass target.path=FILE."
        )
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # zipfile.BadZipFile, ValueError, OSError
        raise DataError(f"{path} is not a readable npz file ({e}); re-download or re-create it") from e
    with z:
        keys = set(z.files)
        splits: dict[str, Split] = {}
        for s in SPLITS:
            ik, lk = f"{s}_images", f"{s}_{label_key}"
            if ik not in keys or lk not in keys:
                missing = [k for k in (ik, lk) if k not in keys]
                hint = ""
                if lk not in keys:
                    alts = sorted(k[len(s) + 1:] for k in keys if k.startswith(f"{s}_label"))
                    hint = f" Label keys present: {alts}; choose one with target.label_key=..." if alts else ""
                raise DataError(f"{path} lacks key(s) {missing}; a MedMNIST-style npz needs "
                                f"{{train,val,test}}_images and {{train,val,test}}_labels.{hint}")
            imgs, labels = z[ik], z[lk]
            if imgs.dtype != np.uint8 or imgs.ndim not in (3, 4) or (imgs.ndim == 4 and imgs.shape[-1] not in (1, 3)):
                raise DataError(f"{path}: {ik} must be uint8 (N,H,W) or (N,H,W,3), got {imgs.dtype} {imgs.shape}")
            if not np.issubdtype(labels.dtype, np.integer):
                raise DataError(f"{path}: {lk} must hold integer class ids, got dtype {labels.dtype}; "
                                f"map class names to 0..C-1 first (or use a CSV with a label column)")
            labels = labels.reshape(len(labels), -1)
            if labels.shape[1] != 1:
                raise DataError(f"{path}: {lk} has shape {z[lk].shape}; one label per image is needed "
                                f"(multi-label targets are not supported)")
            if len(labels) != len(imgs):
                raise DataError(f"{path}: {ik} has {len(imgs)} images but {lk} has {len(labels)} labels")
            if imgs.ndim == 3:
                imgs = imgs[..., None]
            if imgs.shape[-1] == 1:
                imgs = np.repeat(imgs, 3, axis=-1)
            splits[s] = Split(imgs, labels[:, 0].astype(np.int64), [f"{path}:{ik}[{i}]" for i in range(len(imgs))])
        n_classes = int(max(sp.labels.max() for sp in splits.values() if len(sp)) + 1)
        if "class_names" in keys and len(z["class_names"]) >= n_classes and label_key == "labels":
            class_names = [str(c) for c in z["class_names"]]
        else:
            class_names = [str(i) for i in range(n_classes)]
    return LabeledData(name or path.stem, str(path), class_names, splits)


def _stratified_split(labels: np.ndarray, groups: Sequence[str] | None, val_fraction: float,
                      test_fraction: float, seed: int) -> np.ndarray:
    """Assign 'train'/'val'/'test' per item, stratified by class and grouped (one group -> one split)."""
    rng = np.random.default_rng(seed)
    out = np.empty(len(labels), dtype=object)
    group_of = np.asarray(groups if groups is not None else [f"#{i}" for i in range(len(labels))], dtype=object)
    for c in np.unique(labels):
        # A group goes with the class of its first item, so every group lands in exactly one split.
        gs = list(dict.fromkeys(group_of[labels == c]))
        gs = [g for g in gs if out[group_of == g][0] is None]
        rng.shuffle(gs)
        n = len(gs)
        n_test = int(round(n * test_fraction))
        n_val = int(round(n * val_fraction))
        if n >= 3:
            n_test, n_val = max(n_test, 1 if test_fraction > 0 else 0), max(n_val, 1 if val_fraction > 0 else 0)
        for j, g in enumerate(gs):
            out[group_of == g] = "test" if j < n_test else "val" if j < n_test + n_val else "train"
    return out


def _from_items(name: str, source: str, items: list[tuple[Path, str, str | None, str | None]],
                class_names_expected: list[str], val_fraction: float, test_fraction: float, seed: int,
                skip_corrupt: bool, min_size: int, notes: list[str]) -> LabeledData:
    """items: (file, class name, split or None, group or None) -> LabeledData."""
    if not items:
        raise DataError(f"{source}: no images found. Put images in one sub-folder per class "
                        f"(optionally under train/ val/ test/), or list them in a CSV with columns path,label")
    classes = sorted({c for _, c, _, _ in items})
    if class_names_expected:
        unexpected = sorted(set(classes) - set(class_names_expected))
        if unexpected:
            raise DataError(f"{source}: labels {unexpected} are not among the configured classes "
                            f"{class_names_expected}; fix the labels or set target.class_names")
        classes = list(class_names_expected)
    if len(classes) < 2:
        raise DataError(f"{source}: only one class ({classes}) found; a classifier needs at least two. "
                        f"Add a sub-folder (or CSV label) per class")
    images, labels, files, splits, groups = [], [], [], [], []
    skipped = 0
    for path, cname, split, group in items:
        try:
            img = read_image(path)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            if skip_corrupt:
                skipped += 1
                log.warning("skipping unreadable image %s (%s)", path, e)
                continue
            raise DataError(f"cannot read image {path} ({e}). Remove or replace it, or pass "
                            f"--set data.skip_corrupt=true to skip unreadable files") from e
        if min(img.shape[:2]) < min_size:
            raise DataError(f"image {path} is {img.shape[1]}x{img.shape[0]} px, smaller than data.min_image_size="
                            f"{min_size}; remove it or lower data.min_image_size")
        images.append(img)
        labels.append(classes.index(cname))
        files.append(str(path))
        splits.append(split)
        groups.append(group)
    if skipped:
        notes.append(f"skipped {skipped} unreadable image(s)")
    labels_a = np.asarray(labels, dtype=np.int64)
    given = [s for s in splits if s]
    if given and len(given) != len(splits):
        raise DataError(f"{source}: some images have a split and some do not; give every image a split or none")
    if given:
        bad = sorted(set(given) - set(SPLITS))
        if bad:
            raise DataError(f"{source}: unknown split names {bad}; use train, val, test")
        split_a = np.asarray(splits, dtype=object)
        if "test" not in given or "train" not in given:
            raise DataError(f"{source}: given splits must include train and test (val is optional)")
        if "val" not in given:  # carve val out of train, grouped and stratified
            tr = np.flatnonzero(split_a == "train")
            g = [groups[i] or f"#{i}" for i in tr]
            sub = _stratified_split(labels_a[tr], g, val_fraction / (1 - test_fraction), 0.0, seed)
            split_a[tr] = sub
    else:
        g = [gr or f"#{i}" for i, gr in enumerate(groups)]
        split_a = _stratified_split(labels_a, g, val_fraction, test_fraction, seed)
    out: dict[str, Split] = {}
    for s in SPLITS:
        idx = np.flatnonzero(split_a == s)
        out[s] = Split([images[i] for i in idx], labels_a[idx], [files[i] for i in idx])
    return LabeledData(name, source, classes, out, notes)


def patient_groups(files: list[Path], pattern: str) -> tuple[list[str | None], int]:
    """Each file's group (e.g. patient id): the first group of regex `pattern` searched in the file name (None where
    it does not match, or without a pattern). Returns the groups and how many files matched no pattern."""
    if not pattern:
        return [None] * len(files), 0
    rx = re.compile(pattern)
    groups = [(m.group(1) if (m := rx.search(f.name)) else None) for f in files]
    return groups, sum(g is None for g in groups)


def crossing_groups(groups: list[str | None], splits: list[str | None]) -> dict[str, list[str]]:
    """Groups (patients) whose images lie in more than one of the given splits: group -> its splits."""
    seen: dict[str, set[str]] = {}
    for g, sp in zip(groups, splits):
        if g is not None and sp:
            seen.setdefault(g, set()).add(sp)
    return {g: sorted(v, key=SPLITS.index) for g, v in seen.items() if len(v) > 1}


def load_folder(root: Path, class_names: list[str], val_fraction: float, test_fraction: float, seed: int,
                skip_corrupt: bool = False, min_size: int = 8, group_pattern: str = "") -> LabeledData:
    """`root/<class>/*.png` or `root/{train,val,test}/<class>/*.png`. `group_pattern`: a regex whose first group,
    searched in each file name, is the patient id: splits the pipeline makes keep a patient's images together."""
    if not root.is_dir():
        raise DataError(f"image folder {root} not found")
    notes: list[str] = []
    split_dirs = [d for d in root.iterdir() if d.is_dir() and d.name in SPLITS]
    layout = [(d, d.name) for d in sorted(split_dirs)] if split_dirs else [(root, None)]
    items: list[tuple[Path, str, str | None, str | None]] = []
    ignored = 0
    for base, split in layout:
        class_dirs = sorted(d for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
        for cd in class_dirs:
            files = sorted(f for f in cd.rglob("*") if f.is_file() and not f.name.startswith("."))
            imgs = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
            ignored += len(files) - len(imgs)
            if not imgs:
                raise DataError(f"class folder {cd} holds no images; add images or remove the folder")
            items += [(f, cd.name, split, None) for f in imgs]
    if ignored:
        notes.append(f"ignored {ignored} non-image file(s)")
        log.warning("%s: ignored %d non-image file(s)", root, ignored)
    groups, unmatched = patient_groups([f for f, _, _, _ in items], group_pattern)
    items = [(f, c, sp, g) for (f, c, sp, _), g in zip(items, groups)]
    if group_pattern:
        notes.append(f"{len(set(g for g in groups if g is not None))} patients by target.group_pattern"
                     + (f"; {unmatched} file(s) match no pattern and count as a patient each" if unmatched else ""))
        crossing = crossing_groups(groups, [sp for _, _, sp, _ in items])
        if crossing:
            examples = ", ".join(f"{g} in {'+'.join(v)}" for g, v in list(crossing.items())[:5])
            notes.append(f"LEAK: {len(crossing)} patient(s) have images in more than one of the given split folders "
                         f"({examples}); move each patient's images into one split")
    return _from_items(root.name, str(root), items, class_names, val_fraction, test_fraction, seed,
                       skip_corrupt, min_size, notes)


def load_csv(path: Path, class_names: list[str], val_fraction: float, test_fraction: float, seed: int,
             skip_corrupt: bool = False, min_size: int = 8) -> LabeledData:
    """CSV with columns `path,label` and optional `split`, `group`; paths relative to the CSV's folder."""
    if not path.is_file():
        raise DataError(f"CSV file {path} not found")
    base = path.parent.resolve()
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or [])
        missing = {"path", "label"} - cols
        if missing:
            raise DataError(f"{path}: missing column(s) {sorted(missing)}; the CSV needs a header with "
                            f"path,label (and optionally split,group)")
        items = []
        for line, row in enumerate(reader, start=2):
            rel = (row["path"] or "").strip()
            label = (row["label"] or "").strip()
            if not rel or not label:
                raise DataError(f"{path} line {line}: empty path or label")
            p = (base / rel).resolve()
            if not p.is_relative_to(base):
                raise DataError(f"{path} line {line}: path {rel!r} escapes the CSV's folder {base}; "
                                f"keep images under the CSV's folder")
            if not p.is_file():
                raise DataError(f"{path} line {line}: image {p} not found")
            split = (row.get("split") or "").strip() or None
            group = (row.get("group") or "").strip() or None
            items.append((p, label, split, group))
    return _from_items(path.stem, str(path), items, class_names, val_fraction, test_fraction, seed,
                       skip_corrupt, min_size, [])


def load_target(cfg) -> LabeledData:
    """The target data set named by `cfg.target` (a PipelineConfig)."""
    t = cfg.target
    if t.path:
        p = Path(t.path).expanduser()
        if not p.exists():
            raise DataError(f"target.path {p} not found; give a folder of class sub-folders, a CSV or an npz")
        if p.is_dir():
            data = load_folder(p, t.class_names, t.val_fraction, t.test_fraction, t.split_seed,
                               cfg.data.skip_corrupt, cfg.data.min_image_size, t.group_pattern)
        elif p.suffix.lower() == ".csv":
            data = load_csv(p, t.class_names, t.val_fraction, t.test_fraction, t.split_seed,
                            cfg.data.skip_corrupt, cfg.data.min_image_size)
        elif p.suffix.lower() == ".npz":
            data = load_npz(p, t.label_key)
            data.class_names = _name_npz_classes(data, t.class_names)
        else:
            raise DataError(f"target.path {p}: unsupported file type {p.suffix!r}; use a folder, .csv or .npz")
    else:
        data = load_npz(resolve_dataset_path(t.name, cfg.data.root), t.label_key, t.name)
        data.class_names = _name_npz_classes(data, t.class_names)
    check_usable(data)
    return data


def _name_npz_classes(data: LabeledData, names: Sequence[str]) -> list[str]:
    """target.class_names name an npz's label ids 0..C-1 in order."""
    if names and len(names) != len(data.class_names):
        raise DataError(f"{data.source}: labels have {len(data.class_names)} classes but target.class_names "
                        f"lists {len(names)} ({list(names)}); fix target.class_names (or target.label_key)")
    return list(names) if names else data.class_names


def check_usable(data: LabeledData) -> None:
    """Raise DataError if the data set cannot train and evaluate a classifier (expected class names are
    checked where the classes are read: `_from_items` and `_name_npz_classes`)."""
    for s in SPLITS:
        counts = data.counts(s)
        if len(data.splits[s]) == 0:
            raise DataError(f"{data.source}: the {s} split is empty; add images or adjust the split fractions")
        if s != "val" and sum(c > 0 for c in counts) < 2:
            raise DataError(f"{data.source}: the {s} split has only one class ({counts}); "
                            f"both train and test need at least two classes")


def load_sources(cfg) -> list[LabeledData]:
    """The meta-training source pool; refuses any source that is the target."""
    target_files = {resolve_dataset_path(cfg.target.name, cfg.data.root).resolve()}
    if cfg.target.path:
        target_files.add(Path(cfg.target.path).expanduser().resolve())
    out = []
    for name in cfg.data.sources:
        p = resolve_dataset_path(name, cfg.data.root)
        if p.resolve() in target_files or name == cfg.target.name:
            raise DataError(f"source data set {name} is the target; remove it from data.sources "
                            f"(target data must never enter meta-training)")
        out.append(load_npz(p, "labels", name))
    if not out:
        raise DataError("data.sources is empty; meta-training needs at least one source data set")
    return out


def sample_kshot(labels: np.ndarray, k: int, seed: int, where: str = "train split") -> np.ndarray:
    """k indices per class, seeded; subsets are nested in k for a fixed seed (k=5 within k=10); k=0: every index
    (`finetune.shots: [all]`)."""
    if k == 0:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    out = []
    for c in range(int(labels.max()) + 1):
        idx = np.flatnonzero(labels == c)
        if len(idx) < k:
            raise DataError(f"{where}: class {c} has {len(idx)} images, fewer than k={k}; "
                            f"lower finetune.shots or add images of that class")
        out.append(rng.permutation(idx)[:k])
    return np.sort(np.concatenate(out))


class ImageDataset(torch.utils.data.Dataset):
    """(image, label) pairs through a callable transform (medmnist/MONAI style)."""

    def __init__(self, images: Sequence[np.ndarray] | np.ndarray, labels: np.ndarray,
                 transform: Callable[[np.ndarray], torch.Tensor]):
        self.images, self.labels, self.transform = images, np.asarray(labels), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), int(self.labels[i])


def duplicate_report(data: LabeledData) -> dict[str, int]:
    """Exact duplicate images within each split and across split pairs (by content hash)."""
    import hashlib

    hashes = {s: [hashlib.sha1(np.ascontiguousarray(im).tobytes()).hexdigest() for im in data.splits[s].images]
              for s in SPLITS}
    out = {f"within_{s}": sum(n - 1 for n in Counter(h).values() if n > 1) for s, h in hashes.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        out[f"{a}_{b}"] = len(set(hashes[a]) & set(hashes[b]))
    return out
