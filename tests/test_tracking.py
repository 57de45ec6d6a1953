"""The store's reliability with real processes: runs of dead processes are closed, live ones are not; a fresh store
survives processes that start on it at the same moment."""
import os
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parent.parent

OPEN_RUN = """
import os, sys, time, mlflow
from pipeline.tracking import setup_tracking, tracked_run
setup_tracking("dead-runs")
with tracked_run(sys.argv[1], {"pipeline.stage": "test"}, system_metrics=False) as run:
    print(run.info.run_id, flush=True)
    if sys.argv[1] == "dies":
        os._exit(0)  # no cleanup at all, as after SIGKILL: the run stays RUNNING
    time.sleep(600)
"""


def start(name, uri):
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    p = subprocess.Popen([sys.executable, "-c", OPEN_RUN, name], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    return p, p.stdout.readline().strip()


def tags_of_a_run(uri: str, **env: str) -> dict[str, str]:
    """The tags of a run opened by a fresh process with `env` added to its environment (an empty value unsets)."""
    full = {k: v for k, v in os.environ.items() if k not in env}
    full.update({"MLFLOW_TRACKING_URI": uri, **{k: v for k, v in env.items() if v}})
    p = subprocess.Popen([sys.executable, "-c", OPEN_RUN, "dies"], cwd=REPO, env=full, stdout=subprocess.PIPE,
                         text=True)
    run_id = p.stdout.readline().strip()
    p.wait(timeout=60)
    return MlflowClient(uri).get_run(run_id).data.tags


def test_runs_of_dead_processes_are_closed_and_live_ones_are_not(tmp_path):
    from pipeline.tracking import close_dead_runs
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    live, live_id = start("lives", uri)
    try:
        dead, dead_id = start("dies", uri)
        dead.wait(timeout=60)
        client = MlflowClient(uri)
        assert client.get_run(dead_id).info.status == "RUNNING"  # what a killed process leaves behind
        closed = close_dead_runs(client)
        assert closed == [dead_id]
        assert client.get_run(dead_id).info.status == "KILLED"
        assert "no longer exists" in client.get_run(dead_id).data.tags["pipeline.closed"]
        assert client.get_run(live_id).info.status == "RUNNING" and live.poll() is None
        assert close_dead_runs(client) == []  # nothing left to close; the live run is still not touched
        assert client.get_run(live_id).info.status == "RUNNING"
    finally:
        live.kill()
        live.wait(timeout=60)


START_TOGETHER = """
import sys, time
from pipeline.tracking import setup_tracking
t = float(sys.argv[1])
while time.time() < t:
    time.sleep(0.001)
print(setup_tracking(sys.argv[2]))
"""


def test_processes_starting_together_on_a_fresh_store_all_succeed(tmp_path):
    """Several processes create the same new SQLite store and experiment at the same moment (as torchrun ranks or
    two `python -m pipeline run` do); each gets the one experiment."""
    for attempt in range(2):
        uri = f"sqlite:///{tmp_path / f'store{attempt}' / 'mlflow.db'}"
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        go = time.time() + 8  # after every interpreter has imported mlflow
        procs = [subprocess.Popen([sys.executable, "-c", START_TOGETHER, str(go), "same-experiment"], cwd=REPO,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(4)]
        outs = [p.communicate(timeout=300) for p in procs]
        assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
        assert len({o[0].strip() for o in outs}) == 1


def test_runs_record_the_torch_thread_count_of_their_process(tmp_path):
    """CPU figures are exact only at the same thread count, so every run says which it had (OMP_NUM_THREADS)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    seen = {n: tags_of_a_run(uri, OMP_NUM_THREADS=n).get("pipeline.torch_threads") for n in ("1", "2")}
    assert seen == {"1": "1", "2": "2"}


def test_runs_record_the_cpu_instruction_set_and_versions_their_figures_depend_on(tmp_path):
    """The same command at one thread gives other figures on another CPU or with other kernels, so every run says
    which CPU, which of torch's instruction-set kernels (`ATEN_CPU_CAPABILITY` caps them) and which versions it had."""
    import torch
    from importlib.metadata import version
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    seen = {cap: tags_of_a_run(uri, ATEN_CPU_CAPABILITY=cap) for cap in ("default", "")}
    assert seen["default"]["pipeline.cpu_capability"] == "DEFAULT"
    assert seen[""]["pipeline.cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model\t"))
    assert seen[""]["pipeline.cpu"].endswith(f"model {model})")
    assert f"torch={version('torch')}" in seen[""]["pipeline.versions"].split()
    assert f"timm={version('timm')}" in seen[""]["pipeline.versions"].split()
