"""MLflow helpers: the project store, run lifecycle (no run left RUNNING), config logging and run lookup."""
from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import socket
import subprocess
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import mlflow
import yaml
from mlflow.entities import Run

from .scratch import scratch_dir

log = logging.getLogger(__name__)
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else an SQLite store under ./mlruns (artifacts beside it)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlruns').resolve() / 'mlflow.db'}"


MAIN_STORE = {"uri": ""}  # the project's store; ranks > 0 of a torchrun job log elsewhere but read it


def main_store_uri() -> str:
    """The project's store (set by `setup_tracking`)."""
    return MAIN_STORE["uri"] or default_tracking_uri()


def local_state_dir() -> Path:
    """A folder beside the project's store for progress that must outlive a killed process (fine-tune jobs cut off
    mid-way): the store's own folder for an SQLite or file store, else ./mlruns."""
    uri = main_store_uri()
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).parent
    if uri.startswith("file:"):
        return Path(urlparse(uri).path)
    if "://" not in uri:
        return Path(uri)
    return Path("mlruns").resolve()


def main_client():
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=MAIN_STORE["uri"] or None)


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Serialise creating or migrating an SQLite store and creating experiments in it, across processes (a file
    lock beside the database): two processes starting on a store that does not exist yet otherwise race in MLflow's
    schema migration (`sqlite3.OperationalError: duplicate column name`)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def setup_tracking(experiment: str) -> str:
    """Point MLflow at the store and select (or create) the experiment; returns the experiment id."""
    uri = default_tracking_uri()
    MAIN_STORE["uri"] = uri
    mlflow.set_tracking_uri(uri)
    with store_lock(uri):
        return _select_experiment(uri, experiment)


def _select_experiment(uri: str, experiment: str) -> str:
    launched = os.environ.get("MLFLOW_RUN_ID")  # started by `mlflow run`: work inside that run's experiment
    if launched:
        exp_id = main_client().get_run(launched).info.experiment_id
        mlflow.set_experiment(experiment_id=exp_id)
        return exp_id
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is not None:
        exp_id = exp.experiment_id
    else:
        artifacts = None
        if uri.startswith("sqlite:///"):
            artifacts = (Path(uri[len("sqlite:///"):]).parent / "artifacts").resolve().as_uri()
        # MLflow 3's UI opens GenAI views unless the experiment says it is for model training
        exp_id = mlflow.create_experiment(experiment, artifact_location=artifacts,
                                          tags={"mlflow.experimentKind": "custom_model_development"})
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def _code_ast(source: str) -> str:
    """A module's syntax tree without docstrings (comments are not in it): what the code does, not how it is
    documented."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, include_attributes=False)


def code_version() -> str:
    """Hash of the pipeline's code (`pipeline/` and `stages/`): a finished stage is reused only under the same code.
    Each module counts by its syntax tree without docstrings, so editing comments or docstrings keeps every
    finished stage reusable, while any change to what the code does invalidates them."""
    h = hashlib.sha256()
    for pkg in ("pipeline", "stages"):
        for f in sorted((PROJECT_ROOT / pkg).rglob("*.py")):
            h.update(f.relative_to(PROJECT_ROOT).as_posix().encode())
            h.update(_code_ast(f.read_text()).encode())
    return h.hexdigest()[:16]


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, list) else v
    return out


def log_config(cfg_dict: dict[str, Any]) -> None:
    """The whole config as params and as config.yaml."""
    params = {k: str(v)[:500] for k, v in flatten(cfg_dict).items()}
    items = list(params.items())
    for i in range(0, len(items), 90):
        mlflow.log_params(dict(items[i:i + 90]))
    mlflow.log_text(yaml.safe_dump(cfg_dict, sort_keys=False), "config.yaml")


def _process_start(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), None if there is no such process."""
    import psutil
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:  # another user's live process
        return -1.0


def cpu_name() -> str:
    """The CPU as /proc/cpuinfo names it, with its family and model numbers (a virtual machine's name alone, such as
    "Intel(R) Xeon(R) Processor", does not tell two generations apart); "" where there is no /proc/cpuinfo."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    info: dict[str, str] = {}
    for line in lines:
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return f"{info.get('model name', '')} (family {info.get('cpu family', '?')}, model {info.get('model', '?')})"


def numeric_versions() -> str:
    """The versions of the packages a run's figures depend on, as `name=version` pairs."""
    from importlib.metadata import PackageNotFoundError, version
    pairs = []
    for name in ("torch", "timm", "numpy", "albumentations", "opencv-python-headless"):
        try:
            pairs.append(f"{name}={version(name)}")
        except PackageNotFoundError:
            pairs.append(f"{name}=none")
    return " ".join(pairs)


def process_tags() -> dict[str, str]:
    """Tags that say which process owns a run (host, pid, process start time), so a later process can tell a run
    left RUNNING by a dead process from a live one (`close_dead_runs`), and what its figures depend on: on the CPU,
    reductions split by thread, so a run's figures are reproduced exactly only at the same thread count
    (`OMP_NUM_THREADS`; torchrun sets 1 per process), and kernels differ by CPU and instruction set (torch's
    `ATEN_CPU_CAPABILITY`) and by package version, so the CPU, the instruction set torch uses and the versions are
    recorded too."""
    return {"pipeline.host": socket.gethostname(), "pipeline.pid": str(os.getpid()),
            "pipeline.pid_start": f"{_process_start(os.getpid()):.3f}", **compute_tags()}


def compute_tags() -> dict[str, str]:
    """The part of `process_tags` that a run's figures depend on (threads, CPU, instruction set, versions): a job
    trained by another torchrun process carries its trainer's, and is tagged with them (`pipeline.trained_by`)."""
    import torch
    return {"pipeline.torch_threads": str(torch.get_num_threads()), "pipeline.cpu": cpu_name(),
            "pipeline.cpu_capability": torch.backends.cpu.get_cpu_capability(), "pipeline.versions": numeric_versions()}


def close_dead_runs(client=None) -> list[str]:
    """Mark KILLED every RUNNING run of this store whose owning process (by `process_tags`) was on this host and no
    longer exists (pid gone, or reused by a process that started later); its tag `pipeline.closed` says why. Runs
    of live processes, of other hosts and without those tags are left alone. Returns the closed run ids."""
    client = client or main_client()
    host, closed = socket.gethostname(), []
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    if not exp_ids:
        return closed
    running = client.search_runs(exp_ids, filter_string="attributes.status = 'RUNNING'", max_results=5000)
    for r in running:
        tags = r.data.tags
        if tags.get("pipeline.host") != host or "pipeline.pid" not in tags:
            continue
        pid, started = int(tags["pipeline.pid"]), float(tags.get("pipeline.pid_start", "0") or 0)
        now_started = _process_start(pid)
        if now_started is not None and (now_started < 0 or abs(now_started - started) < 1.0):
            continue  # the owner is alive
        client.set_tag(r.info.run_id, "pipeline.closed",
                       f"left RUNNING by process {pid} on {host}, which no longer exists; marked KILLED by process "
                       f"{os.getpid()} at {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
        client.set_terminated(r.info.run_id, "KILLED")
        closed.append(r.info.run_id)
    if closed:
        log.warning("marked %d run(s) of dead processes KILLED: %s", len(closed), ", ".join(closed))
    return closed


@contextmanager
def tracked_run(name: str, tags: dict[str, str], nested: bool = False, system_metrics: bool | None = True,
                parent_run_id: str | None = None) -> Iterator[Run]:
    """Start a run; end it FINISHED, or FAILED (exception) / KILLED (Ctrl-C, SIGTERM) with the error logged (MLflow's
    own `with start_run()` ends both FAILED). `tags` add to and override `process_tags` (a job trained by another
    torchrun process carries its trainer's); `parent_run_id`: nest under that run from a thread with no active one."""
    run = mlflow.start_run(run_name=name, nested=nested, parent_run_id=parent_run_id,
                           tags={**process_tags(), **tags}, log_system_metrics=system_metrics)
    try:
        yield run
    except BaseException as e:
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        try:
            mlflow.set_tag("error", f"{type(e).__name__}: {e}"[:4000])
            mlflow.log_text("".join(traceback.format_exception(e)), "error.txt")
        except Exception:  # the store may be the thing that failed; still end the run
            log.exception("could not log the error to MLflow")
        mlflow.end_run(status)
        raise
    mlflow.end_run("FINISHED")


def find_finished_run(experiment_id: str, stage: str, stage_key: str) -> Run | None:
    """Latest FINISHED run of `stage` whose stage key (config, code version, upstream runs) matches."""
    runs = main_client().search_runs(
        [experiment_id],
        filter_string=f"tags.`pipeline.stage` = '{stage}' and tags.`pipeline.stage_key` = '{stage_key}' "
                      f"and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def run_outputs(run: Run) -> dict[str, str]:
    """What a stage run handed downstream (tags `out.<name>`), plus its run id."""
    out = {k[4:]: v for k, v in run.data.tags.items() if k.startswith("out.")}
    out["run_id"] = run.info.run_id
    return out


def download(uri: str, dst: str | None = None) -> Path:
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst or str(scratch_dir("download-"))))
