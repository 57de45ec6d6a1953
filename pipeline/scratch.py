"""Scratch space: downloaded artifacts, stage outputs before they are logged, checkpoints before upload.

Everything goes under one folder per process, removed when a pipeline run ends (`run_pipeline`) and, as a backstop,
when the process exits: a study of hundreds of stage runs must not leave gigabytes behind in the temp folder
(a full disk once failed CI here). `$TMPDIR` picks where the folder lives. A process killed outright (SIGKILL, the
out-of-memory killer) cannot clean up; the next process on the same host removes such folders, whose names carry
the host and the process id.
"""
from __future__ import annotations

import atexit
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

_root: dict[int, Path] = {}  # keyed by pid: a forked data-loader worker must not remove its parent's folder


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        pass
    return True


def remove_stale_scratch() -> None:
    """Remove scratch roots in the temp folder left by dead processes of this host."""
    pat = re.compile(rf"^pipeline-{re.escape(_host())}-(\d+)-")
    for d in Path(tempfile.gettempdir()).glob(f"pipeline-{_host()}-*"):
        m = pat.match(d.name)
        if m and d.is_dir() and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)


def scratch_dir(prefix: str = "") -> Path:
    """A new empty folder inside this process's scratch root."""
    pid = os.getpid()
    if pid not in _root:
        remove_stale_scratch()
        _root[pid] = Path(tempfile.mkdtemp(prefix=f"pipeline-{_host()}-{pid}-"))
    return Path(tempfile.mkdtemp(prefix=prefix, dir=_root[pid]))


def clean_scratch() -> None:
    """Remove this process's scratch root (paths handed out by `scratch_dir` stop existing)."""
    root = _root.pop(os.getpid(), None)
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)


atexit.register(clean_scratch)
