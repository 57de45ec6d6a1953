"""Scratch space is one folder per process, removed by clean_scratch (and at exit), never a parent's from a fork."""
import os
import subprocess
import sys
from pathlib import Path

from pipeline.scratch import clean_scratch, scratch_dir


def test_scratch_dirs_share_one_root_that_clean_removes(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read $TMPDIR
    clean_scratch()
    a, b = scratch_dir("meta-"), scratch_dir("download-")
    assert a != b and a.parent == b.parent and a.parent.parent == tmp_path
    assert a.name.startswith("meta-") and a.is_dir() and not any(a.iterdir())
    (a / "last.pt").write_bytes(b"x" * 1000)
    clean_scratch()
    assert list(tmp_path.iterdir()) == []
    c = scratch_dir()  # a new root after cleaning
    assert c.is_dir() and c.parent.parent == tmp_path
    clean_scratch()


def test_forked_child_leaves_the_parents_scratch(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    mine = scratch_dir("parent-")
    pid = os.fork()
    if pid == 0:  # a data-loader worker, say: its own scratch and clean-up
        child = scratch_dir("child-")
        clean_scratch()
        os._exit(0 if not child.exists() and mine.exists() else 1)
    assert os.waitpid(pid, 0)[1] == 0 and mine.is_dir()
    clean_scratch()
    assert list(tmp_path.iterdir()) == []


def test_process_exit_removes_scratch(tmp_path):
    code = "from pipeline.scratch import scratch_dir; d = scratch_dir('x-'); (d / 'f').write_text('1'); print(d)"
    p = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TMPDIR": str(tmp_path)},
                       capture_output=True, text=True, check=True)
    assert p.stdout.strip().startswith(str(tmp_path)) and list(tmp_path.iterdir()) == []


def test_scratch_left_by_a_killed_process_is_removed_by_the_next(tmp_path):
    """SIGKILL skips every clean-up; the next process on the host removes the dead one's folder, not a live one's."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    code = ("import os, signal; from pipeline.scratch import scratch_dir; d = scratch_dir('meta-'); "
            "(d / 'last.pt').write_bytes(b'x' * 100); print(d, flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert p.returncode == -9
    dead = Path(p.stdout.strip()).parent
    assert dead.parent == tmp_path and (Path(p.stdout.strip()) / "last.pt").exists()  # left behind
    parts = dead.name.split("-")  # pipeline-<host>-<pid>-<random>
    parts[2] = str(os.getppid())
    live = tmp_path / "-".join(parts)  # same host, a live process
    live.mkdir()
    other = tmp_path / "pipeline-otherhost-1-abc"  # another host's (shared temp folder): not ours to judge
    other.mkdir()
    p = subprocess.run([sys.executable, "-c", "from pipeline.scratch import scratch_dir; print(scratch_dir())"],
                       env=env, capture_output=True, text=True, check=True)
    assert not dead.exists() and live.is_dir() and other.is_dir()
    assert sorted(d.name for d in tmp_path.iterdir()) == sorted([live.name, other.name])
