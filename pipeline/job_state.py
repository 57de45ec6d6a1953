"""A fine-tune job's progress on disk, so that a job cut off mid-way continues where it stopped.

A job is a sequence of fits (phase 0: the fine-tune; phase r+1: self-training round r's student). The file holds the
last finished phase (its model and fit) and the fit in progress (weights, optimizer, early-stopping state, the data
order's generator), with every random stream the job draws from: torch's global generator (dropout, the loader's
base seed) and each albumentations transform's own generators. Loading it puts all of them back, so a resumed job
ends with the same weights as one never interrupted (on CPU, `num_workers=0`; docs/design.md). Writing is atomic and
at most every `every_s` seconds, at the end of an epoch; the file goes when the job's result is logged.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch

from .transforms import AlbumentationsTransform


def _random_objects(t: AlbumentationsTransform) -> list[Any]:
    """The compose and every transform inside it: each carries its own numpy and Python generators."""
    out, todo = [], [t.compose]
    while todo:
        o = todo.pop(0)
        out.append(o)
        todo += list(getattr(o, "transforms", []))
    return out


def transform_rng(t: AlbumentationsTransform) -> list[tuple[dict, tuple]]:
    return [(o.random_generator.bit_generator.state, o.py_random.getstate()) for o in _random_objects(t)]


def set_transform_rng(t: AlbumentationsTransform, state: list[tuple[dict, tuple]]) -> None:
    for o, (np_state, py_state) in zip(_random_objects(t), state, strict=True):
        o.random_generator.bit_generator.state = np_state
        o.py_random.setstate(py_state)


class JobState:
    """Save and find one job's progress. `path=None`: nothing is saved or found (the behaviour without resume)."""

    def __init__(self, path: Path | None, every_s: float = 60.0):
        self.path, self.every_s = path, every_s
        self.transforms: list[AlbumentationsTransform] = []
        self.done: dict | None = None  # the last finished phase, kept to be written beside the fit in progress
        self._saved_at = -float("inf")
        self._loaded: dict | None = None
        self._started = time.monotonic()
        self.seconds_before = 0.0  # the job's time up to the state loaded (the epochs not trained again)
        self.resumed_epochs = 0  # epochs in the state loaded

    def track(self, *transforms: AlbumentationsTransform) -> None:
        """Transforms whose random streams the job draws from (the same object twice counts once)."""
        for t in transforms:
            if all(t is not s for s in self.transforms):
                self.transforms.append(t)

    def load(self) -> dict | None:
        """The saved state, if a file is there (`{'done': ..., 'fit': ...}`); random streams are put back by `set_rng`."""
        if self.path is None or not self.path.exists():
            return None
        self._loaded = torch.load(self.path, map_location="cpu", weights_only=False)
        self.done, fit = self._loaded["done"], self._loaded["fit"]
        self.seconds_before = self._loaded["seconds"]
        self.resumed_epochs = len(self.done["history"]) if self.done else 0
        self.resumed_epochs += len(fit["best"].history) if fit else 0
        self._started = time.monotonic()
        return self._loaded

    def _rng(self) -> dict:
        out = {"torch": torch.get_rng_state(), "transforms": [transform_rng(t) for t in self.transforms]}
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # dropout on the GPU draws from its own
            out["cuda"] = torch.cuda.get_rng_state()
        return out

    def set_rng(self, rng: dict) -> None:
        """Put back torch's generators and the tracked transforms' streams as they were at a save."""
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        for t, s in zip(self.transforms, rng["transforms"], strict=True):
            set_transform_rng(t, s)

    def fit_state(self, phase: int) -> dict | None:
        """The saved fit in progress of `phase`, if that is where the job stopped."""
        fit = (self._loaded or {}).get("fit")
        return fit if fit is not None and fit["phase"] == phase else None

    def due(self) -> bool:
        return self.path is not None and time.monotonic() - self._saved_at >= self.every_s

    def save_fit(self, phase: int, fit: dict) -> None:
        """A fit in progress, at the end of an epoch (when `due`, which it never is without a path)."""
        self._write({"done": self.done, "fit": {"phase": phase, **fit, "rng": self._rng()}})

    def finish_phase(self, phase: int, done: dict) -> None:
        """A finished phase: what the next phase starts from (always written). Copied here: the job goes on using
        the model (`done['model']`, a state dict) and the lists, and later writes must not see those changes."""
        if self.path is None:  # nothing is saved: nothing to copy
            return
        model = {k: v.detach().to("cpu", copy=True) for k, v in done["model"].items()}
        self.done = {"phase": phase, **copy.deepcopy({k: v for k, v in done.items() if k != "model"}),
                     "model": model, "rng": self._rng()}
        self._write({"done": self.done, "fit": None})

    def _write(self, obj: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({**obj, "seconds": self.seconds_before + time.monotonic() - self._started}, tmp)
        tmp.replace(self.path)
        self._saved_at = time.monotonic()

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
