"""N-way K-shot Q-query episodes from the source pool, seeded per episode (so a resumed run sees the same tasks)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .data import DataError, LabeledData
from .transforms import AlbumentationsTransform

ClassRef = tuple[int, int]  # (data set index in the pool, class id)


def split_classes(pool: list[LabeledData], val_fraction: float, seed: int) -> tuple[set[ClassRef], set[ClassRef]]:
    """Hold out a seeded share of each data set's classes for meta-validation (disjoint classes)."""
    rng = np.random.default_rng(seed)
    train, val = set(), set()
    for d, data in enumerate(pool):
        classes = rng.permutation(len(data.class_names)).tolist()
        n_val = max(1, int(round(len(classes) * val_fraction))) if len(classes) >= 4 else 0
        val |= {(d, c) for c in classes[:n_val]}
        train |= {(d, c) for c in classes[n_val:]}
    return train, val


@dataclass
class Episodes:
    """Stacked meta-batch: support (T, N*K, C, H, W), labels (T, N*K), query (T, N*Q, ...), labels (T, N*Q), and
    `classes` (T, N): the pool-wide class number of each task's label 0..N-1 (what `multitask` trains on)."""

    xs: torch.Tensor
    ys: torch.Tensor
    xq: torch.Tensor
    yq: torch.Tensor
    classes: torch.Tensor | None = None

    def to(self, device: torch.device, channels_last: bool = False) -> "Episodes":
        """On `device`; with `channels_last` each task's image stack (xs[t], xq[t]) is NHWC in memory."""
        def images(x: torch.Tensor) -> torch.Tensor:
            x = x.to(device, non_blocking=True)
            return x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3) if channels_last else x
        return Episodes(images(self.xs), self.ys.to(device, non_blocking=True), images(self.xq),
                        self.yq.to(device, non_blocking=True),
                        None if self.classes is None else self.classes.to(device, non_blocking=True))


class EpisodeSampler:
    """Episodes from one split of a data set pool; the episode at index i depends only on (seed, i).

    mode='within': a task's N classes come from one data set (like the target: one modality);
    mode='across': from any classes of the pool.
    """

    def __init__(self, pool: list[LabeledData], split: str, ways: int, shots: int, queries: int,
                 transform: AlbumentationsTransform, mode: str = "within", seed: int = 0,
                 classes: set[ClassRef] | None = None):
        self.pool, self.split, self.ways, self.shots, self.queries = pool, split, ways, shots, queries
        self.transform, self.mode, self.seed = transform, mode, seed
        need = shots + queries
        self.index: dict[ClassRef, np.ndarray] = {}
        for d, data in enumerate(pool):
            labels = data.splits[split].labels
            for c in range(len(data.class_names)):
                idx = np.flatnonzero(labels == c)
                if len(idx) >= need and (classes is None or (d, c) in classes):
                    self.index[(d, c)] = idx
        if mode == "within":
            by_set: dict[int, list[ClassRef]] = {}
            for ref in self.index:
                by_set.setdefault(ref[0], []).append(ref)
            self.groups = [sorted(v) for v in by_set.values() if len(v) >= ways]
        else:
            self.groups = [sorted(self.index)] if len(self.index) >= ways else []
        self.class_ids = {ref: i for i, ref in enumerate(sorted(self.index))}  # pool-wide class numbers
        if not self.groups:
            names = [d.name for d in pool]
            raise DataError(
                f"no {ways}-way task can be drawn from the {split} splits of {names} with {need} images per "
                f"class (mode={mode}); lower meta.ways/meta.shots/meta.queries or use meta.task_mode=across")

    def describe(self) -> str:
        sets = sorted({self.pool[d].name for g in self.groups for d, _ in g})
        return f"{len(self.index)} classes usable from {sets} ({self.split} split, mode={self.mode})"

    @property
    def n_classes(self) -> int:
        """Classes of the pool this sampler draws from (the size of a head over all of them)."""
        return len(self.index)

    def episode(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Support images, labels, query images, labels of episode `index`."""
        return self._episode(index)[:4]

    def _episode(self, index: int) -> tuple[torch.Tensor, ...]:
        rng = np.random.default_rng([self.seed, index])
        group = self.groups[rng.integers(len(self.groups))]
        chosen = [group[i] for i in rng.choice(len(group), self.ways, replace=False)]
        self.transform.compose.set_random_seed(int(rng.integers(2**31)))  # augmentation seeded per episode
        xs, ys, xq, yq = [], [], [], []
        for label, (d, c) in enumerate(chosen):
            images = self.pool[d].splits[self.split].images
            pick = rng.choice(self.index[(d, c)], self.shots + self.queries, replace=False)
            ims = [self.transform(images[i]) for i in pick]
            xs += ims[: self.shots]
            xq += ims[self.shots:]
            ys += [label] * self.shots
            yq += [label] * self.queries
        return (torch.stack(xs), torch.tensor(ys), torch.stack(xq), torch.tensor(yq),
                torch.tensor([self.class_ids[ref] for ref in chosen]))

    def batch(self, first_index: int, n_tasks: int, share: range | None = None) -> Episodes:
        """Episodes first_index .. first_index+n_tasks-1, or only those at positions `share` of them."""
        eps = [self._episode(first_index + t) for t in (share if share is not None else range(n_tasks))]
        return Episodes(*(torch.stack([e[j] for e in eps]) for j in range(5)))
