"""Scratch space: downloaded artifacts, stage outputs before they are logged, checkpoints before upload.

Everything goes under one folder per process, removed when a pipeline run ends (`run_pipeline`) and, as a backstop,
when the process exits: a study of hundreds of stage runs must not leave gigabytes behind in the temp folder
(a full disk once failed CI here). `$TMPDIR` picks where the folder lives.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

_root: dict[int, Path] = {}  # keyed by pid: a forked data-loader worker must not remove its parent's folder


def scratch_dir(prefix: str = "") -> Path:
    """A new empty folder inside this process's scratch root."""
    pid = os.getpid()
    if pid not in _root:
        _root[pid] = Path(tempfile.mkdtemp(prefix="pipeline-"))
    return Path(tempfile.mkdtemp(prefix=prefix, dir=_root[pid]))


def clean_scratch() -> None:
    """Remove this process's scratch root (paths handed out by `scratch_dir` stop existing)."""
    root = _root.pop(os.getpid(), None)
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)


atexit.register(clean_scratch)
