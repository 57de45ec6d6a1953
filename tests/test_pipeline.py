"""End to end on the real data: `--stage all` with configs/smoke.yaml in a temporary MLflow store."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.metrics import classification_metrics

REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "configs" / "smoke.yaml")


def cli(args, cwd, uri, check=True, **kw):
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    p = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=900, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nSTDOUT:\n{p.stdout[-4000:]}\nSTDERR:\n{p.stderr[-4000:]}")
    return p


def runs(uri, experiment):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=1000) if exp else []


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, real_data):
    tmp = tmp_path_factory.mktemp("smoke")
    uri = f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"
    (tmp / "mlruns").mkdir()
    t0 = time.time()
    p = cli(["run", "--stage", "all", "--config", SMOKE, "--set", f"data.root={real_data}"], tmp, uri)
    return {"dir": tmp, "uri": uri, "stdout": p.stdout, "seconds": time.time() - t0, "root": real_data}


def test_all_stages_make_parent_and_four_finished_children(smoke):
    rs = runs(smoke["uri"], "fewshot-medmeta-smoke")
    parents = [r for r in rs if r.data.tags.get("pipeline.stage") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    pid = parents[0].info.run_id
    children = {r.data.tags["pipeline.stage"]: r for r in rs if r.data.tags.get("mlflow.parentRunId") == pid}
    assert set(children) == {"backbone", "meta", "finetune", "evaluate"}
    assert all(r.info.status == "FINISHED" for r in children.values())
    assert not [r for r in rs if r.info.status == "RUNNING"]
    for r in children.values():  # config, code version and git commit are logged on every stage
        assert r.data.params["meta.algorithm"] == "reptile"
        assert r.data.tags["pipeline.code_version"] and "mlflow.source.git.commit" in r.data.tags
    assert children["backbone"].data.tags["weights_sha256"].startswith("57934424")
    # one nested run per (arm, k, seed) under the finetune stage
    ft = [r for r in rs if r.data.tags.get("mlflow.parentRunId") == children["finetune"].info.run_id]
    names = {r.info.run_name for r in ft}
    assert names == {f"finetune/{a}/k{k}/seed{s}" for a in ("scratch", "transfer", "meta-reptile")
                     for k in (5, 20) for s in (0, 1)}
    assert "val_auc" in ft[0].data.metrics and "test_auc" in ft[0].data.metrics
    # summary metrics on the parent, lined up for the compare view
    assert {"auc_k20_transfer", "auc_k20_scratch", "auc_k5_meta-reptile"} <= set(parents[0].data.metrics)
    print(f"smoke --stage all took {smoke['seconds']:.1f}s")


def test_evaluate_artifacts_and_metrics_recompute_from_predictions(smoke):
    rs = runs(smoke["uri"], "fewshot-medmeta-smoke")
    ev = next(r for r in rs if r.data.tags.get("pipeline.stage") == "evaluate")
    mlflow.set_tracking_uri(smoke["uri"])
    d = Path(mlflow.artifacts.download_artifacts(run_id=ev.info.run_id, dst_path=str(smoke["dir"] / "ev")))
    for f in ("results.json", "report.md", "auc_vs_k.png", "roc_curves.png", "confusion_matrices.png"):
        assert (d / f).is_file(), f
    res = json.loads((d / "results.json").read_text())
    assert len(res["rows"]) == 12
    for row in res["rows"]:
        csv = d / "predictions" / f"{row['arm']}_k{row['k']}_seed{row['seed']}.csv"
        df = pd.read_csv(csv)
        assert list(df.columns) == ["index", "label", "prob_0", "prob_1"] and len(df) == 624
        m = classification_metrics(df.label.to_numpy(), df[["prob_0", "prob_1"]].to_numpy())
        for k in ("auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "f1"):
            assert row[k] == pytest.approx(m[k], abs=1e-12), (csv.name, k)
    agg = {(a["arm"], a["k"]): a for a in res["aggregates"]}
    rows = pd.DataFrame(res["rows"])
    a = agg[("transfer", 20)]
    assert a["auc"] == pytest.approx(rows[(rows.arm == "transfer") & (rows.k == 20)].auc.mean())
    assert "| transfer | 20 |" in (d / "report.md").read_text()


def test_rerun_reuses_finished_stages(smoke):
    p = cli(["run", "--stage", "all", "--config", SMOKE, "--set", f"data.root={smoke['root']}"],
            smoke["dir"], smoke["uri"])
    assert p.stdout.count("reusing finished run") == 4


def test_same_config_and_seed_give_identical_metrics(smoke):
    rs = runs(smoke["uri"], "fewshot-medmeta-smoke")
    first = next(r for r in rs if r.data.tags.get("pipeline.stage") == "evaluate")
    cli(["run", "--stage", "finetune,evaluate", "--force", "--config", SMOKE, "--set", f"data.root={smoke['root']}"],
        smoke["dir"], smoke["uri"])
    rs = runs(smoke["uri"], "fewshot-medmeta-smoke")
    evs = sorted([r for r in rs if r.data.tags.get("pipeline.stage") == "evaluate"], key=lambda r: r.info.start_time)
    assert len(evs) == 2 and evs[0].info.run_id == first.info.run_id
    keys = [k for k in first.data.metrics if k.startswith("auc_")]
    assert keys and all(evs[1].data.metrics[k] == first.data.metrics[k] for k in keys)


@pytest.mark.parametrize("override,msg", [
    ("finetune.shots=[5000]", "fewer than k=5000"),
    ("target.name=no_such_set", "no_such_set.npz not found"),
])
def test_bad_input_fails_cleanly_with_no_run_left_running(tmp_path, real_data, override, msg):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = cli(["run", "--stage", "backbone,finetune", "--config", SMOKE, "--set", f"data.root={real_data}",
             "--set", "finetune.arms=[transfer]", "--set", override], tmp_path, uri, check=False)
    assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr
    rs = runs(uri, "fewshot-medmeta-smoke")
    status = {r.data.tags.get("pipeline.stage"): r.info.status for r in rs}
    assert status == {"pipeline": "FAILED", "backbone": "FINISHED", "finetune": "FAILED"}
    failed = next(r for r in rs if r.data.tags.get("pipeline.stage") == "finetune")
    assert msg in failed.data.tags["error"]


def test_unknown_config_key_exits_nonzero(tmp_path):
    p = cli(["run", "--set", "meta.nope=1"], tmp_path, f"sqlite:///{tmp_path / 'm.db'}", check=False)
    assert p.returncode == 2 and "unknown config key 'meta.nope'" in p.stderr


META = ["--config", SMOKE, "--set", "meta.algorithm=fomaml", "--set", "meta.iterations=10",
        "--set", "meta.checkpoint_every=2", "--set", "meta.val_every=4"]


def final_meta_weights(uri, experiment):
    rs = [r for r in runs(uri, experiment) if r.data.tags.get("pipeline.stage") == "meta"
          and r.info.status == "FINISHED"]
    assert len(rs) == 1
    mlflow.set_tracking_uri(uri)
    path = mlflow.artifacts.download_artifacts(f"{rs[0].info.artifact_uri}/checkpoint/model.pt")
    return rs[0], torch.load(path, weights_only=False)["state_dict"]


def test_meta_interrupted_by_sigterm_resumes_to_the_same_weights(tmp_path, real_data):
    root = ["--set", f"data.root={real_data}"]
    uri_a = f"sqlite:///{tmp_path / 'a.db'}"
    cli(["run", "--stage", "backbone,meta", *META, *root], tmp_path, uri_a)
    _, full = final_meta_weights(uri_a, "fewshot-medmeta-smoke")

    uri_b = f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}"
    (tmp_path / "b").mkdir()
    cli(["run", "--stage", "backbone", *META, *root], tmp_path / "b", uri_b)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri_b}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--stage", "meta", *META, *root],
                            cwd=tmp_path / "b", env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if list((tmp_path / "b").glob("**/state/last.pt")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "meta finished before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    killed = [r for r in runs(uri_b, "fewshot-medmeta-smoke") if r.data.tags.get("pipeline.stage") == "meta"]
    assert [r.info.status for r in killed] == ["KILLED"]
    p = cli(["run", "--stage", "meta", *META, *root], tmp_path / "b", uri_b)
    assert "resuming run" in p.stdout
    run, resumed = final_meta_weights(uri_b, "fewshot-medmeta-smoke")
    assert run.data.tags["resumed_from"] == killed[0].info.run_id
    assert set(resumed) == set(full)
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=0, msg=k)
