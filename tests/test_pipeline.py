"""End to end on the real data: `--stage all` with configs/smoke.yaml in a temporary MLflow store."""
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.metrics import classification_metrics

REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "configs" / "smoke.yaml")


def cli(args, cwd, uri, check=True, env=None, **kw):
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, **(env or {})}
    p = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=900, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nSTDOUT:\n{p.stdout[-4000:]}\nSTDERR:\n{p.stderr[-4000:]}")
    return p


def leftovers(tmpdir: Path) -> list[str]:
    """What a pipeline process left in its $TMPDIR, but for torch's (empty, shared) inductor cache folder."""
    return sorted(str(p.relative_to(tmpdir)) for p in tmpdir.rglob("*") if not p.name.startswith("torchinductor_"))


def runs(uri, experiment):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=1000) if exp else []


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, real_data):
    tmp = tmp_path_factory.mktemp("smoke")
    uri = f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"
    (tmp / "mlruns").mkdir()
    (tmp / "tmpdir").mkdir()
    t0 = time.time()
    p = cli(["run", "--stage", "all", "--config", SMOKE, "--set", f"data.root={real_data}"], tmp, uri,
            env={"TMPDIR": str(tmp / "tmpdir")})
    return {"dir": tmp, "uri": uri, "stdout": p.stdout, "stderr": p.stderr, "seconds": time.time() - t0,
            "root": real_data,
            "tmpdir": tmp / "tmpdir"}


def test_console_keeps_to_the_stages_and_the_results(smoke):
    """MLflow's chatter (artifact progress bars, its INFO lines, the warnings every logged model repeats; about half
    of a smoke run's console before) is off unless -v, so the stages' lines and the results table stand out."""
    text = smoke["stdout"] + smoke["stderr"]
    assert "[evaluate] finished run" in text and "| k/class | chosen |" in text
    for noise in ("Downloading artifacts", " INFO mlflow", "Saving pytorch model by Pickle", "Passing a Python object"):
        assert noise not in text, noise


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
    # meta-validation before any meta-training is logged at step 0, the reference for the later checkpoints
    hist = MlflowClient(smoke["uri"]).get_metric_history(children["meta"].info.run_id, "meta_val_acc")
    assert [h.step for h in hist] == [0, 2, 4]
    assert children["meta"].data.metrics["meta_val_start_acc"] == hist[0].value
    # one nested run per (arm, k, seed) under the finetune stage
    ft = [r for r in rs if r.data.tags.get("mlflow.parentRunId") == children["finetune"].info.run_id]
    names = {r.info.run_name for r in ft}
    assert names == {f"finetune/{a}/k{k}/seed{s}" for a in ("scratch", "transfer", "meta-reptile",
                                                            "transfer@tf_efficientnet_lite2")
                     for k in (5, 20) for s in (0, 1)}
    assert "val_auc" in ft[0].data.metrics and "test_auc" in ft[0].data.metrics
    # summary metrics on the parent, lined up for the compare view
    summary = {"auc_k20_transfer", "auc_k20_scratch", "auc_k5_meta-reptile", "auc_k20_ensemble"}
    assert summary <= set(parents[0].data.metrics)
    # downloads, checkpoints and reports were written to scratch space and removed at the end (they once filled
    # the disk: gigabytes of meta checkpoints over a study)
    assert leftovers(smoke["tmpdir"]) == []
    print(f"smoke --stage all took {smoke['seconds']:.1f}s")


def test_evaluate_artifacts_and_metrics_recompute_from_predictions(smoke):
    rs = runs(smoke["uri"], "fewshot-medmeta-smoke")
    ev = next(r for r in rs if r.data.tags.get("pipeline.stage") == "evaluate")
    mlflow.set_tracking_uri(smoke["uri"])
    d = Path(mlflow.artifacts.download_artifacts(run_id=ev.info.run_id, dst_path=str(smoke["dir"] / "ev")))
    for f in ("results.json", "report.md", "auc_vs_k.png", "roc_curves.png", "confusion_matrices.png"):
        assert (d / f).is_file(), f
    res = json.loads((d / "results.json").read_text())
    assert len(res["rows"]) == 20  # 4 arms x 2 k x 2 seeds, plus the ensemble of the three pretrained arms
    assert res["arms"] == ["scratch", "transfer", "meta-reptile", "transfer@tf_efficientnet_lite2", "ensemble"]
    for k, s in [(5, 0), (5, 1), (20, 0), (20, 1)]:  # the ensemble is the mean of its members' probabilities
        ens, tr, me, l2 = (pd.read_csv(d / "predictions" / f"{a}_k{k}_seed{s}.csv")
                           for a in ("ensemble", "transfer", "meta-reptile", "transfer@tf_efficientnet_lite2"))
        np.testing.assert_allclose(ens.prob_1, (tr.prob_1 + me.prob_1 + l2.prob_1) / 3, rtol=1e-6)
        assert ens.label.equals(tr.label)
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


def test_candidates_chosen_on_validation_recompute_from_the_logged_csvs(smoke):
    """selection.json's choice per k recomputes from the evaluate run's val_predictions/ with scikit-learn (mean
    validation log-loss over seeds, lowest wins), every candidate has its validation CSVs, and the parent run leads
    with the chosen candidate's test AUC and CI."""
    from sklearn.metrics import log_loss
    rs = runs(smoke["uri"], "fewshot-medmeta-smoke")
    ev = next(r for r in rs if r.data.tags.get("pipeline.stage") == "evaluate")
    mlflow.set_tracking_uri(smoke["uri"])
    d = Path(mlflow.artifacts.download_artifacts(run_id=ev.info.run_id, dst_path=str(smoke["dir"] / "sel")))
    sel = json.loads((d / "selection.json").read_text())
    res = json.loads((d / "results.json").read_text())
    assert set(sel) == {"k5", "k20"}
    for key, s in sel.items():
        assert s["metric"] == "log_loss" and set(s["scores"]) == set(res["arms"])
        mine = {}
        for arm in res["arms"]:
            losses = []
            for seed in s["seeds"]:
                df = pd.read_csv(d / "val_predictions" / f"{arm}_{key}_seed{seed}.csv")
                assert list(df.columns[:2]) == ["index", "label"] and len(df) == 532  # the whole validation split
                prob = df.iloc[:, 2:].to_numpy()
                losses.append(log_loss(df.label, prob / prob.sum(1, keepdims=True), labels=[0, 1]))
            mine[arm] = np.mean(losses)
            assert mine[arm] == pytest.approx(s["scores"][arm], rel=1e-9)
        assert s["chosen"] == min(mine, key=mine.get)
        assert set(s["operating_point"]["thresholds"]) == {str(x) for x in s["seeds"]}
        chosen = res["chosen"][key]
        agg = next(a for a in res["aggregates"] if a["arm"] == s["chosen"] and f"k{a['k']}" == key)
        parent = next(r for r in rs if r.data.tags.get("pipeline.stage") == "pipeline")
        assert parent.data.metrics[f"auc_{key}_chosen"] == pytest.approx(agg["auc"]) == pytest.approx(chosen["auc"][0])
    assert "## Chosen on validation" in (d / "report.md").read_text()


def test_replica_arm_merged_run_and_named_ensemble(smoke):
    """A second transfer arm (`transfer.r1`) run on its own, scored together with the smoke run's arms
    (evaluate.merge_runs; the smoke run a second time under a tag, as another backbone's run would be) and averaged
    with transfer in a named ensemble (evaluate.ensembles)."""
    rs = runs(smoke["uri"], "fewshot-medmeta-smoke")
    ft_id, bb_id = (next(r.info.run_id for r in rs if r.data.tags.get("pipeline.stage") == st)
                    for st in ("finetune", "backbone"))
    exp = "fewshot-medmeta-smoke-replica"
    base = ["run", "--config", SMOKE, "--set", f"data.root={smoke['root']}", "--set", f"experiment={exp}",
            "--set", "finetune.arms=[transfer.r1]", "--set", "finetune.shots=[5]",
            "--set", "finetune.log_models=false", "--set", f"finetune.backbone_run={bb_id}"]
    bad = cli(base + ["--stage", "finetune,evaluate", "--set", f"evaluate.merge_runs=[{ft_id[:12]}]"],
              smoke["dir"], smoke["uri"], check=False)
    assert bad.returncode == 2 and "evaluate.merge_runs" in bad.stderr, bad.stderr[-2000:]
    assert not [r for r in runs(smoke["uri"], exp) if r.info.status == "RUNNING"]
    cli(base + ["--stage", "evaluate", "--set", f"evaluate.merge_runs=[{ft_id},again={ft_id}]",  # tagged: again.*
                "--set", "evaluate.ensembles=[two-transfer=transfer+transfer.r1]"], smoke["dir"], smoke["uri"])
    ev = next(r for r in runs(smoke["uri"], exp) if r.data.tags.get("pipeline.stage") == "evaluate"
              and r.info.status == "FINISHED")
    mlflow.set_tracking_uri(smoke["uri"])
    d = Path(mlflow.artifacts.download_artifacts(run_id=ev.info.run_id, dst_path=str(smoke["dir"] / "ev-replica")))
    res = json.loads((d / "results.json").read_text())
    assert res["arms"] == ["transfer.r1", "scratch", "transfer", "meta-reptile", "transfer@tf_efficientnet_lite2",
                           "again.scratch", "again.transfer", "again.meta-reptile",
                           "again.transfer@tf_efficientnet_lite2", "ensemble", "two-transfer"]
    pd.testing.assert_frame_equal(pd.read_csv(d / "predictions" / "again.transfer_k20_seed0.csv"),
                                  pd.read_csv(d / "predictions" / "transfer_k20_seed0.csv"))
    p = {a: pd.read_csv(d / "predictions" / f"{a}_k5_seed1.csv") for a in ("transfer", "transfer.r1", "two-transfer")}
    assert not np.allclose(p["transfer"].prob_1, p["transfer.r1"].prob_1)  # another seed, another model
    np.testing.assert_allclose(p["two-transfer"].prob_1, (p["transfer"].prob_1 + p["transfer.r1"].prob_1) / 2,
                               rtol=1e-6)
    ks = {(r["arm"], r["k"]) for r in res["rows"]}
    assert ("two-transfer", 5) in ks and ("two-transfer", 20) not in ks  # no replica at k=20
    assert ("transfer", 20) in ks and ("ensemble", 20) in ks  # the merged run's arms are all scored


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
    """Caught before the first stage starts: no stage ran, no run was opened."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "tmpdir").mkdir()
    p = cli(["run", "--stage", "backbone,finetune", "--config", SMOKE, "--set", f"data.root={real_data}",
             "--set", "finetune.arms=[transfer]", "--set", override], tmp_path, uri, check=False,
            env={"TMPDIR": str(tmp_path / "tmpdir")})
    assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr
    assert "starting" not in p.stdout and leftovers(tmp_path / "tmpdir") == []
    assert runs(uri, "fewshot-medmeta-smoke") == []


def test_a_failing_stage_ends_its_runs_failed_with_the_error(tmp_path, real_data):
    """An error that only a stage can find (here: the backbone's weights file is not a state dict) ends the stage
    run and the parent FAILED, the error logged; nothing stays RUNNING."""
    bad = tmp_path / "weights.pt"
    bad.write_text("not a checkpoint")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = cli(["run", "--stage", "backbone,meta", "--config", SMOKE, "--set", f"data.root={real_data}",
             "--set", f"backbone.weights_file={bad}"], tmp_path, uri, check=False)
    assert p.returncode == 2 and "weights.pt" in p.stderr and "Traceback" not in p.stderr
    status = {r.data.tags.get("pipeline.stage"): r.info.status for r in runs(uri, "fewshot-medmeta-smoke")}
    assert status == {"pipeline": "FAILED", "backbone": "FAILED"}


@pytest.mark.parametrize("override,msg", [
    ("backbone.model=resnet999", "'resnet999' is not a timm model (close matches: resnet50"),
    ("finetune.epochs=-1", "'finetune.epochs' must be >= 0"),
    ("finetune.epochs=0", "set finetune.head_init=prototype (the nearest-class-mean classifier"),
    ("meta.ways=9", "no 9-way task can be drawn"),
])
def test_config_and_source_problems_stop_before_any_stage(tmp_path, real_data, override, msg):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = cli(["run", "--stage", "all", "--config", SMOKE, "--set", f"data.root={real_data}", "--set", override],
            tmp_path, uri, check=False)
    assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "starting" not in p.stdout and runs(uri, "fewshot-medmeta-smoke") == []


@pytest.mark.parametrize("problem", ["one class", "truncated jpeg"])
def test_unusable_target_folder_stops_before_backbone_and_meta(tmp_path, real_data, problem):
    """A user's folder that cannot be used is reported before the backbone and meta stages run."""
    from PIL import Image
    z = np.load(real_data / "kermany_pneumonia_64.npz")
    names = ["normal"] if problem == "one class" else ["normal", "pneumonia"]
    for c, name in enumerate(names):
        for i in np.flatnonzero(z["train_labels"][:, 0] == c)[:30]:
            p = tmp_path / "xrays" / name / f"{i}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(z["train_images"][i]).save(p, quality=95)
    if problem == "truncated jpeg":
        broken = next((tmp_path / "xrays" / "pneumonia").iterdir())
        broken.write_bytes(broken.read_bytes()[:200])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = cli(["run", "--stage", "all", "--config", SMOKE, "--set", f"data.root={real_data}",
             "--set", f"target.path={tmp_path / 'xrays'}"], tmp_path, uri, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert ("class" in p.stderr) if problem == "one class" else (broken.name in p.stderr)
    assert "starting" not in p.stdout and runs(uri, "fewshot-medmeta-smoke") == []


def test_self_training_runs_a_student_after_the_teacher(tmp_path, real_data):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cli(["run", "--stage", "backbone,finetune", "--config", SMOKE, "--set", f"data.root={real_data}",
         "--set", "finetune.arms=[transfer]", "--set", "finetune.shots=[5]", "--set", "finetune.seeds=1",
         "--set", "finetune.pseudo_per_class=6", "--set", "finetune.pseudo_pool=80",
         "--set", "finetune.pseudo_epochs=2", "--set", "finetune.pseudo_rounds=2",
         "--set", "finetune.pseudo_warmup_epochs=1", "--set", "finetune.patience=100"], tmp_path, uri)
    run = next(r for r in runs(uri, "fewshot-medmeta-smoke") if r.data.tags.get("pipeline.stage") == "finetune-run")
    m = run.data.metrics
    assert run.data.params["pseudo_per_class"] == "6" and run.data.params["pseudo_rounds"] == "2"
    assert run.data.params["pseudo_augment"] == "strong"  # the default: a noisy student
    assert 1 <= m["pseudo_images"] <= 12 and 0.0 <= m["pseudo_label_accuracy"] <= 1.0
    assert 0.0 <= m["teacher_val_auc"] <= 1.0 and 0.0 <= m["round1_val_auc"] <= 1.0
    # the students' curves continue the teacher's: 3 teacher epochs, then 2 epochs for each round's student, and the
    # final model is the second student
    steps = [h.step for h in MlflowClient(uri).get_metric_history(run.info.run_id, "val_auc")]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6, 7] and m["best_epoch"] in (6, 7)


def test_unknown_config_key_exits_nonzero(tmp_path):
    p = cli(["run", "--set", "meta.nope=1"], tmp_path, f"sqlite:///{tmp_path / 'm.db'}", check=False)
    assert p.returncode == 2 and "unknown config key 'meta.nope'" in p.stderr


def test_torchrun_with_fewer_meta_tasks_than_processes_is_a_clear_error(tmp_path):
    """Found on an H200 (4 processes, smoke meta_batch 2): processes without a task crashed inside torch.stack."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    env = {"WORLD_SIZE": "4", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4"}  # as torchrun sets them
    p = cli(["run", "--stage", "meta", "--config", SMOKE], tmp_path, uri, check=False, env=env)
    assert p.returncode == 2 and "meta.meta_batch=2 is smaller than the 4 torchrun processes" in p.stderr
    assert "Traceback" not in p.stderr and runs(uri, "fewshot-medmeta-smoke") == []


META = ["--config", SMOKE, "--set", "meta.algorithm=fomaml", "--set", "meta.iterations=10",
        "--set", "meta.checkpoint_every=2", "--set", "meta.val_every=2"]  # a validated best in every state


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
    run_a, full = final_meta_weights(uri_a, "fewshot-medmeta-smoke")

    uri_b = f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}"
    (tmp_path / "b").mkdir()
    cli(["run", "--stage", "backbone", *META, *root], tmp_path / "b", uri_b)
    (tmp_path / "tmpdir").mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri_b, "TMPDIR": str(tmp_path / "tmpdir")}
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
    assert leftovers(tmp_path / "tmpdir") == []  # the checkpoint written before the signal is not left behind
    killed = [r for r in runs(uri_b, "fewshot-medmeta-smoke") if r.data.tags.get("pipeline.stage") == "meta"]
    assert [r.info.status for r in killed] == ["KILLED"]
    p = cli(["run", "--stage", "meta", *META, *root], tmp_path / "b", uri_b)
    assert "resuming run" in p.stdout
    run, resumed = final_meta_weights(uri_b, "fewshot-medmeta-smoke")
    assert run.data.tags["resumed_from"] == killed[0].info.run_id
    assert set(resumed) == set(full)
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=0, msg=k)
    # the resumed run carries the step-0 reference and the best so far, as the uninterrupted run does
    at = int(re.search(r"resuming run \w+ at iteration (\d+)/", p.stdout).group(1))
    for key in ("meta_val_start_acc", "meta_val_best_acc"):
        assert run.data.metrics[key] == run_a.data.metrics[key], key
    best = MlflowClient(uri_b).get_metric_history(run.info.run_id, "meta_val_best_acc")
    assert at in [h.step for h in best]
    for key in ("meta_val_acc", "meta_val_loss"):  # step 0 of each validation curve, as the uninterrupted run's
        step0 = [h.value for h in MlflowClient(uri_b).get_metric_history(run.info.run_id, key) if h.step == 0]
        assert step0 == [h.value for h in MlflowClient(uri_a).get_metric_history(run_a.info.run_id, key)
                         if h.step == 0], key
    assert f"(before meta-training {run_a.data.metrics['meta_val_start_acc']:.3f})" in p.stdout
    assert 0 < run.data.metrics["meta_seconds"]


FT = ["--config", SMOKE, "--set", "finetune.arms=[scratch,transfer]", "--set", "finetune.seeds=2"]  # 8 jobs


def evaluate_results(uri, tmp_path, name):
    ev = next(r for r in runs(uri, "fewshot-medmeta-smoke") if r.data.tags.get("pipeline.stage") == "evaluate")
    mlflow.set_tracking_uri(uri)
    return json.loads(Path(mlflow.artifacts.download_artifacts(f"{ev.info.artifact_uri}/results.json",
                                                               dst_path=str(tmp_path / name))).read_text())


def test_finetune_killed_by_sigkill_keeps_finished_jobs_and_ends_as_uninterrupted(tmp_path, real_data):
    """SIGKILL the finetune stage after some of its jobs finished; the same command again keeps those jobs' runs as
    they are, trains only the missing ones, closes the killed process's runs as KILLED, and gives the results.json
    of an uninterrupted run."""
    root = ["--set", f"data.root={real_data}"]
    uri_a = f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}"
    (tmp_path / "a").mkdir()
    cli(["run", "--stage", "backbone,finetune,evaluate", *FT, *root], tmp_path / "a", uri_a)
    full = evaluate_results(uri_a, tmp_path, "full")

    b = tmp_path / "b"
    b.mkdir()
    uri_b = f"sqlite:///{b / 'mlflow.db'}"
    cli(["run", "--stage", "backbone", *FT, *root], b, uri_b)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri_b}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--stage", "finetune,evaluate", *FT, *root],
                            cwd=b, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    # job.json is a job's last artifact, logged just before its run ends; jobs run one after another, so once the
    # fourth job.json exists at least three job runs have ended.
    while time.time() < deadline and proc.poll() is None and len(list(b.glob("**/job.json"))) < 4:
        time.sleep(0.05)
    assert proc.poll() is None, "finetune finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    before = {r.info.run_id: r for r in runs(uri_b, "fewshot-medmeta-smoke")}
    kept = {r.info.run_id for r in before.values() if r.data.tags.get("pipeline.stage") == "finetune-run"
            and r.info.status == "FINISHED"}
    stuck = {r.info.run_id for r in before.values() if r.info.status == "RUNNING"}
    assert len(kept) >= 3 and len(stuck) >= 2  # parent, stage (and the job in flight, if it had started)

    p = cli(["run", "--stage", "finetune,evaluate", *FT, *root], b, uri_b)
    assert p.stdout.count("kept from run") == len(kept)
    after = {r.info.run_id: r for r in runs(uri_b, "fewshot-medmeta-smoke")}
    for rid in stuck:  # the killed process's runs are closed, saying why
        assert after[rid].info.status == "KILLED" and "no longer exists" in after[rid].data.tags["pipeline.closed"]
    jobs = [r for r in after.values() if r.data.tags.get("pipeline.stage") == "finetune-run"
            and r.info.status == "FINISHED"]
    assert len(jobs) == 8  # the kept ones were not trained again nor copied into new runs
    assert all(after[rid].info.end_time == before[rid].info.end_time for rid in kept)
    assert evaluate_results(uri_b, tmp_path, "resumed") == full


MID_JOB = ["--config", SMOKE, "--set", "finetune.arms=[scratch,transfer]", "--set", "finetune.shots=[20]",
           "--set", "finetune.seeds=1", "--set", "finetune.epochs=6", "--set", "finetune.patience=6",
           "--set", "finetune.pseudo_per_class=4", "--set", "finetune.pseudo_pool=60", "--set", "finetune.pseudo_epochs=3",
           "--set", "finetune.checkpoint_seconds=0"]  # 2 self-trained jobs, their progress saved every epoch


def test_finetune_killed_mid_job_continues_that_job_and_ends_as_uninterrupted(tmp_path, real_data):
    """SIGKILL the finetune stage while its first job is part-way, its progress saved beside the store; the same
    command again continues that job from the saved epochs (it says so and logs `resumed_epochs`), leaves no saved
    progress behind, and gives the results.json of an uninterrupted run."""
    root = ["--set", f"data.root={real_data}"]
    a = tmp_path / "a"
    a.mkdir()
    uri_a = f"sqlite:///{a / 'mlflow.db'}"
    other = a / "job-states" / "another-configuration" / "transfer_k5_seed0.pt"  # a job cut off under other settings
    other.parent.mkdir(parents=True)
    other.write_bytes(b"\0" * 2**20)
    p = cli(["run", "--stage", "backbone,finetune,evaluate", *MID_JOB, *root], a, uri_a)
    full = evaluate_results(uri_a, tmp_path, "full")
    # nothing of this configuration left beside the store once every job is logged; the other one's kept and named
    assert sorted(a.glob("job-states/*/*")) == [other]
    assert f"1 job(s) cut off under other finetune configurations kept their progress (1 MiB) in {a / 'job-states'}, a folder per" \
        in p.stdout, p.stdout[-3000:]

    b = tmp_path / "b"
    b.mkdir()
    uri_b = f"sqlite:///{b / 'mlflow.db'}"
    cli(["run", "--stage", "backbone", *MID_JOB, *root], b, uri_b)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri_b}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--stage", "finetune,evaluate", *MID_JOB,
                             *root], cwd=b, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not list(b.glob("job-states/*/*.pt")):
        time.sleep(0.02)
    assert proc.poll() is None, "finetune finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not list(b.glob("**/job.json"))  # killed inside the first job

    p = cli(["run", "--stage", "finetune,evaluate", *MID_JOB, *root], b, uri_b)
    assert re.search(r"finetune/\S+/k20/seed0: continues after the [1-9]\d* epoch\(s\) an earlier attempt saved",
                     p.stdout), p.stdout[-3000:]
    jobs = [r for r in runs(uri_b, "fewshot-medmeta-smoke") if r.data.tags.get("pipeline.stage") == "finetune-run"]
    assert sorted(r.info.status for r in jobs) == ["FINISHED", "FINISHED", "KILLED"]
    resumed = [r for r in jobs if "resumed_epochs" in r.data.metrics]
    assert len(resumed) == 1 and resumed[0].info.status == "FINISHED" and resumed[0].data.metrics["resumed_epochs"] >= 1
    assert not (b / "job-states").exists()
    assert evaluate_results(uri_b, tmp_path, "resumed") == full


def test_own_jpeg_folder_three_classes_end_to_end(tmp_path, real_data):
    """A real folder of JPEGs (made from the Kermany npz, 3 classes: normal/bacterial/viral) runs through
    finetune and evaluate, with class names kept in order and macro AUC."""
    from PIL import Image
    z = np.load(real_data / "kermany_pneumonia_64.npz")
    names = ["normal", "bacterial", "viral"]
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 6), ("test", 10)):
        labels = z[f"{split}_labels3"][:, 0]
        for c, name in enumerate(names):
            for i in rng.choice(np.flatnonzero(labels == c), n, replace=False):
                p = tmp_path / "xrays" / split / name / f"{i}.jpg"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(z[f"{split}_images"][i]).save(p, quality=95)
    (tmp_path / "xrays" / "train" / "normal" / "README.txt").write_text("not an image")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--config", SMOKE, "--set", f"data.root={real_data}", "--set", f"target.path={tmp_path / 'xrays'}",
            "--set", "target.class_names=[normal,bacterial,viral]", "--set", "finetune.arms=[scratch,transfer]",
            "--set", "finetune.shots=[4]", "--set", "finetune.val_per_class=0"]
    chk = cli(["data", "check", *args], tmp_path, uri)
    assert "ignored 1 non-image file(s)" in chk.stdout and "[12, 12, 12]" in chk.stdout
    cli(["run", "--stage", "backbone,finetune,evaluate", *args], tmp_path, uri)
    ev = next(r for r in runs(uri, "fewshot-medmeta-smoke") if r.data.tags.get("pipeline.stage") == "evaluate")
    mlflow.set_tracking_uri(uri)
    d = Path(mlflow.artifacts.download_artifacts(run_id=ev.info.run_id, dst_path=str(tmp_path / "ev")))
    res = json.loads((d / "results.json").read_text())
    assert res["class_names"] == names and len(res["rows"]) == 4
    df = pd.read_csv(d / "predictions" / "transfer_k4_seed0.csv")
    assert list(df.columns) == ["index", "label", "prob_normal", "prob_bacterial", "prob_viral"] and len(df) == 30
    m = classification_metrics(df.label.to_numpy(), df.iloc[:, 2:].to_numpy())
    row = next(r for r in res["rows"] if r["arm"] == "transfer" and r["seed"] == 0)
    assert row["auc"] == pytest.approx(m["auc"], abs=1e-12)


def test_torchrun_two_processes_gloo_equal_single_process(tmp_path, real_data):
    """Meta-batch tasks split over 2 gloo processes with all-reduced meta-gradients give the weights of one
    process running all tasks."""
    root = ["--set", f"data.root={real_data}"]
    # One outer step: every iteration after it starts from weights that differ by rounding (the all-reduce sums
    # in another order), and this smoke-sized MAML (32 px, BatchNorm over 1x1 maps of 6 images) amplifies
    # rounding; one step checks the split of tasks, the all-reduce and the identical update on every rank.
    args = ["--config", SMOKE, "--set", "meta.algorithm=maml", "--set", "meta.iterations=1",
            "--set", "meta.meta_batch=4", "--set", "meta.val_every=1", *root]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cli(["run", "--stage", "backbone", *args], tmp_path, uri)
    # one thread, like each torchrun worker: tiny 32 px tasks make BatchNorm amplify the rounding differences
    # between thread counts, and this test is about the split of tasks, not about threads
    cli(["run", "--stage", "meta", *args], tmp_path, uri, env={"OMP_NUM_THREADS": "1"})
    run1, single = final_meta_weights(uri, "fewshot-medmeta-smoke")
    uri2 = f"sqlite:///{tmp_path / 'two' / 'mlflow.db'}"
    (tmp_path / "two").mkdir()
    cli(["run", "--stage", "backbone", *args], tmp_path / "two", uri2)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri2, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "pipeline", "run", "--stage", "meta", *args], cwd=tmp_path / "two", env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "rank 1/2 takes tasks [2, 3]" in p.stdout + p.stderr
    run2, two = final_meta_weights(uri2, "fewshot-medmeta-smoke")  # exactly one finished meta run: rank 0's
    for k in single:
        torch.testing.assert_close(two[k], single[k], rtol=1e-4, atol=1e-5, msg=k)
    # the 2 validation tasks are split too (one per process) and their sums all-reduced: the logged validation
    # loss is the mean over both tasks, as one process gets it (rank 0's task alone would give about half of it);
    # 2% because validation follows the outer step, whose rounding this tiny BatchNorm setting amplifies (0.2%)
    assert run2.data.metrics["meta_val_loss"] == pytest.approx(run1.data.metrics["meta_val_loss"], rel=0.02)


def test_torchrun_runs_every_stage_under_one_parent(tmp_path, real_data, smoke):
    """`torchrun --nproc_per_node 2 -m pipeline run --stage all`: rank 0 alone runs backbone and evaluate, both ranks
    join meta and finetune, the project's store holds one parent run with its four stage runs, and the fine-tune
    jobs' predictions cover the same files as a single process's (the smoke run)."""
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "pipeline", "run", "--stage", "all", "--config", SMOKE, "--set", f"data.root={real_data}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout + p.stderr
    assert "rank 1/2 takes tasks" in out and "[finetune] rank 1/2" in out
    assert out.count("[backbone] starting") == 1 and out.count("[evaluate] starting") == 1
    rs = runs(uri, "fewshot-medmeta-smoke")
    parents = [r for r in rs if r.data.tags.get("pipeline.stage") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    stages = {r.data.tags["pipeline.stage"]: r for r in rs
              if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(stages) == {"backbone", "meta", "finetune", "evaluate"}
    assert all(r.info.status == "FINISHED" for r in stages.values())
    # the evaluate stage scored rank 0's finetune run, which holds every job of the sweep (equality with one process
    # is checked stage by stage in the two tests above and below, with one thread per process as under torchrun)
    assert stages["evaluate"].data.tags["pipeline.upstream.finetune"] == stages["finetune"].info.run_id
    two = finetune_predictions(uri, "fewshot-medmeta-smoke")
    one = finetune_predictions(smoke["uri"], "fewshot-medmeta-smoke")
    assert len(two) == 1 and set(two[0]) == set(one[0])
    jobs = [r for r in rs if r.data.tags.get("pipeline.stage") == "finetune-run"]
    assert len(jobs) == len(one[0]) and all(r.info.status == "FINISHED" for r in jobs)


def finetune_predictions(uri: str, experiment: str) -> list[dict[str, pd.DataFrame]]:
    """Test-set predictions of every finished finetune stage run, oldest first."""
    out = []
    for r in sorted(runs(uri, experiment), key=lambda r: r.info.start_time):
        if r.data.tags.get("pipeline.stage") == "finetune" and r.info.status == "FINISHED":
            d = Path(mlflow.artifacts.download_artifacts(f"{r.info.artifact_uri}/predictions", tracking_uri=uri))
            out.append({f.name: pd.read_csv(f) for f in sorted(d.glob("*.csv"))})
    return out


def test_torchrun_finetune_spreads_runs_and_equals_single_process(tmp_path, real_data):
    """Independent (arm, k, seed) fine-tunes dealt over 2 gloo processes give the predictions of one process
    running them all, and rank 0 logs every nested run."""
    args = ["--config", SMOKE, "--set", f"data.root={real_data}", "--set", "finetune.arms=[scratch,transfer]",
            "--set", "finetune.shots=[5]", "--set", "finetune.seeds=2"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cli(["run", "--stage", "backbone", *args], tmp_path, uri)
    cli(["run", "--stage", "finetune", *args], tmp_path, uri, env={"OMP_NUM_THREADS": "1"})  # as each worker
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "pipeline", "run", "--stage", "finetune", "--force", *args], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    counts = [int(re.search(rf"rank {r}/2 trained (\d) of 4 runs", p.stdout).group(1)) for r in (0, 1)]
    assert sum(counts) == 4 and min(counts) >= 1, counts  # a shared queue: each rank trains while jobs are left
    single, two = finetune_predictions(uri, "fewshot-medmeta-smoke")
    assert sorted(two) == sorted(single) == sorted(f"{a}_k5_seed{s}.csv" for a in ("scratch", "transfer")
                                                    for s in (0, 1))
    for name in single:
        np.testing.assert_allclose(two[name].values, single[name].values, rtol=0, atol=1e-6, err_msg=name)
    children = [r for r in runs(uri, "fewshot-medmeta-smoke") if r.data.tags.get("pipeline.stage") == "finetune-run"]
    assert len(children) == 8 and all(r.info.status == "FINISHED" for r in children)
    assert all("test_auc" in r.data.metrics and "val_auc" in r.data.metrics for r in children)
    # each torchrun job names the process that trained it (the single process's jobs name none); rank 0 logged all
    ddp = [r for r in children if "pipeline.trained_by" in r.data.tags]
    assert sorted(r.data.tags["pipeline.trained_by"].split(" on ")[0] for r in ddp) == (
        ["rank 0"] * counts[0] + ["rank 1"] * counts[1])
    assert len({r.data.tags["pipeline.pid"] for r in ddp}) == 1


def test_torchrun_finetune_killed_by_sigkill_keeps_logged_jobs_and_equals_single_process(tmp_path, real_data):
    """SIGKILL a 2-process torchrun finetune (launcher and workers) once rank 0 has logged two jobs and a job in flight
    has saved part of its fit; the same torchrun command again keeps those jobs' runs, continues the cut-off job from
    its saved epochs, trains only the rest, and gives the predictions of one process running every job
    uninterrupted."""
    args = ["--config", SMOKE, "--set", f"data.root={real_data}", "--set", "finetune.arms=[scratch,transfer]",
            "--set", "finetune.shots=[5]", "--set", "finetune.seeds=3", "--set", "finetune.epochs=6",
            "--set", "finetune.patience=6", "--set", "finetune.checkpoint_seconds=0"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cli(["run", "--stage", "backbone", *args], tmp_path, uri)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "pipeline", "run", "--stage", "finetune", *args]
    proc = subprocess.Popen(torchrun, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.time() + 600
    # job.json is a job's last artifact, written by rank 0 as the job's result arrives

    def mid_fit() -> bool:  # a job in flight has saved a fit in progress (written atomically: a whole file or none)
        for f in tmp_path.glob("job-states/*/*.pt"):
            with contextlib.suppress(FileNotFoundError):  # its job was logged meanwhile
                if torch.load(f, weights_only=False)["fit"] is not None:
                    return True
        return False
    while time.time() < deadline and proc.poll() is None and not (
            len(list(tmp_path.glob("**/job.json"))) >= 2 and mid_fit()):
        time.sleep(0.05)
    assert proc.poll() is None, "finetune finished before it could be killed"
    # torch's launcher starts each worker in a session of its own: kill the whole tree, as a lost machine would
    launcher = psutil.Process(proc.pid)
    for victim in [launcher, *launcher.children(recursive=True)]:
        victim.kill()
    proc.communicate(timeout=60)
    before = {r.info.run_id: r for r in runs(uri, "fewshot-medmeta-smoke")}
    kept = {rid for rid, r in before.items() if r.data.tags.get("pipeline.stage") == "finetune-run"
            and r.info.status == "FINISHED"}
    assert 1 <= len(kept) < 6

    p = subprocess.run(torchrun, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("kept from run") == len(kept)
    assert "continues after the" in p.stdout, p.stdout[-3000:]
    trained = [int(n) for n in re.findall(rf"rank [01]/2 trained (\d) of {6 - len(kept)} runs", p.stdout)]
    assert len(trained) == 2 and sum(trained) == 6 - len(kept)
    after = {r.info.run_id: r for r in runs(uri, "fewshot-medmeta-smoke")}
    assert all(after[rid].info.end_time == before[rid].info.end_time for rid in kept)
    assert sum(r.data.tags.get("pipeline.stage") == "finetune-run" and r.info.status == "FINISHED"
               for r in after.values()) == 6
    cli(["run", "--stage", "finetune", "--force", *args], tmp_path, uri, env={"OMP_NUM_THREADS": "1"})
    resumed, single = finetune_predictions(uri, "fewshot-medmeta-smoke")
    assert sorted(resumed) == sorted(single) == sorted(f"{a}_k5_seed{s}.csv" for a in ("scratch", "transfer")
                                                       for s in (0, 1, 2))
    for name in single:
        np.testing.assert_allclose(resumed[name].values, single[name].values, rtol=0, atol=1e-6, err_msg=name)


def test_torchrun_workers_stop_when_their_launcher_is_killed(tmp_path, real_data):
    """torchrun starts its workers in sessions of their own, so a SIGKILL of the launcher alone used to leave them
    meta-training (and a rerun trained beside them). Now each worker notices, ends its runs and exits."""
    args = ["--config", SMOKE, "--set", f"data.root={real_data}", "--set", "meta.iterations=100000",
            "--set", "meta.val_every=1000", "--set", "meta.checkpoint_every=1000", "--set", "meta.compile=false"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cli(["run", "--stage", "backbone", *args], tmp_path, uri)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "torchrun.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", "-m", "pipeline", "run", "--stage", "meta", *args], cwd=tmp_path, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and log.read_text().count("before meta-training") < 2:
        time.sleep(0.1)
    assert proc.poll() is None, log.read_text()[-3000:]
    launcher = psutil.Process(proc.pid)
    workers = launcher.children()
    assert len(workers) == 2
    launcher.kill()  # the launcher alone, as `kill -9 <torchrun pid>` does
    proc.wait(timeout=60)
    try:
        _, alive = psutil.wait_procs(workers, timeout=120)
        alive = [w for w in alive if w.status() != psutil.STATUS_ZOMBIE]
        assert alive == [], log.read_text()[-3000:]
    finally:
        for w in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                w.kill()
    assert log.read_text().count(f"the torchrun launcher (pid {proc.pid}) is gone; stopping") == 2
    meta = [r for r in runs(uri, "fewshot-medmeta-smoke") if r.data.tags.get("pipeline.stage") == "meta"]
    assert [r.info.status for r in meta] == ["KILLED"]


def test_predict_with_registered_model_matches_test_predictions(smoke):
    """`predict` on a registered model, with the preprocessing stored beside it, reproduces the finetune
    stage's own test-set probabilities for the same images."""
    from PIL import Image
    rs = runs(smoke["uri"], "fewshot-medmeta-smoke")
    ft = next(r for r in rs if r.data.tags.get("pipeline.stage") == "finetune")
    uri = ft.data.tags["out.model.transfer"]
    assert uri.startswith("models:/fewshot-medmeta-transfer/")
    client = MlflowClient(smoke["uri"])
    name, version = uri[len("models:/"):].split("/")
    mv = client.get_model_version(name, version)
    child = client.get_run(mv.tags["run_id"])
    z = np.load(smoke["root"] / "kermany_pneumonia_64.npz")
    imgs = smoke["dir"] / "imgs"
    imgs.mkdir(exist_ok=True)
    for i in range(5):
        Image.fromarray(z["test_images"][i]).save(imgs / f"{i}.png")
    p = cli(["predict", "--model", uri, str(imgs)], smoke["dir"], smoke["uri"])
    lines = p.stdout.strip().splitlines()
    assert lines[0] == "image,prob_0,prob_1,predicted" and len(lines) == 6
    got = np.array([[float(v) for v in line.split(",")[1:3]] for line in lines[1:]])
    mlflow.set_tracking_uri(smoke["uri"])
    k, s = child.data.params["k"], child.data.params["seed"]
    assert child.data.params["image_size"] == "40"  # smoke.yaml's finetune.image_size, not data.image_size (32)
    csv = mlflow.artifacts.download_artifacts(run_id=ft.info.run_id,
                                              artifact_path=f"predictions/transfer_k{k}_seed{s}.csv")
    expected = pd.read_csv(csv)[["prob_0", "prob_1"]].to_numpy()[:5]
    np.testing.assert_allclose(got, expected, atol=2e-4)
    assert mv.tags["best_val_auc"] and float(mv.tags["test_auc"]) > 0


def check_best_model(uri, store, workdir, root):
    """`predict` and `mlflow.pyfunc.load_model` on a `-best` version reproduce its candidate's test probabilities
    (the evaluate run's CSV of that k and seed), and `predicted` is the class at the stored threshold."""
    from PIL import Image
    client = MlflowClient(store)
    name, version = uri[len("models:/"):].split("/")
    tags = client.get_model_version(name, version).tags
    z = np.load(root / "kermany_pneumonia_64.npz")
    imgs = workdir / "imgs"
    imgs.mkdir(parents=True, exist_ok=True)
    for i in range(6):
        Image.fromarray(z["test_images"][i]).save(imgs / f"{i}.png")
    p = cli(["predict", "--model", uri, str(imgs)], workdir, store)
    lines = p.stdout.strip().splitlines()
    assert lines[0] == "image,prob_0,prob_1,predicted" and len(lines) == 7
    got = np.array([[float(v) for v in line.split(",")[1:3]] for line in lines[1:]])
    mlflow.set_tracking_uri(store)
    ev = next(r for r in sorted(runs(store, "fewshot-medmeta-smoke"), key=lambda r: -r.info.start_time)
              if r.data.tags.get("pipeline.stage") == "evaluate" and f"out.model.best_k{tags['k']}" in r.data.tags
              and r.data.tags[f"out.model.best_k{tags['k']}"] == uri)
    csv = mlflow.artifacts.download_artifacts(run_id=ev.info.run_id, dst_path=str(workdir / f"csv{version}"),
                                              artifact_path=f"predictions/{tags['candidate']}_k{tags['k']}"
                                                            f"_seed{tags['seed']}.csv")
    expected = pd.read_csv(csv)[["prob_0", "prob_1"]].to_numpy()[:6]
    np.testing.assert_allclose(got, expected, atol=2e-4)
    t = float(tags["threshold"])
    assert [line.split(",")[3] for line in lines[1:]] == [str(int(v >= t)) for v in got[:, 1]]
    model = mlflow.pyfunc.load_model(uri)
    df = model.predict([str(imgs / f"{i}.png") for i in range(6)])
    np.testing.assert_allclose(df[["prob_0", "prob_1"]].to_numpy(), expected, atol=2e-4)
    return tags


def test_best_model_is_registered_and_predict_reproduces_it(smoke, tmp_path):
    """Each k's chosen candidate is registered as fewshot-medmeta-best; an ensemble candidate (forced here with
    evaluate.candidates=[ensemble]) is one model whose output is the mean of its members'."""
    rs = runs(smoke["uri"], "fewshot-medmeta-smoke")
    ev = next(r for r in rs if r.data.tags.get("pipeline.stage") == "evaluate")
    sel = {key: ev.data.tags[f"out.model.best_{key}"] for key in ("k5", "k20")}
    for key, uri in sel.items():
        tags = check_best_model(uri, smoke["uri"], tmp_path / key, smoke["root"])
        assert tags["k"] == key[1:] and tags["selection_metric"] == "log_loss" and tags["rule"] == "youden"
    cli(["run", "--stage", "evaluate", "--config", SMOKE, "--set", f"data.root={smoke['root']}",
         "--set", "evaluate.candidates=[ensemble]"], smoke["dir"], smoke["uri"])
    ev2 = max((r for r in runs(smoke["uri"], "fewshot-medmeta-smoke") if r.data.tags.get("pipeline.stage") ==
               "evaluate"), key=lambda r: r.info.start_time)
    tags = check_best_model(ev2.data.tags["out.model.best_k20"], smoke["uri"], tmp_path / "ens", smoke["root"])
    assert tags["candidate"] == "ensemble"  # members on two backbones, each with its own preprocessing
    assert tags["members"] == "transfer+meta-reptile+transfer@tf_efficientnet_lite2"


def test_arms_on_two_backbones_in_one_run(smoke):
    """smoke.yaml's `transfer@tf_efficientnet_lite2`: the backbone run builds both bodies, the arm trains on Lite2
    with the same paired subsets as the Lite0 arms, and the evaluate run scores it under an MLflow-safe key."""
    rs = sorted(runs(smoke["uri"], "fewshot-medmeta-smoke"), key=lambda r: -r.info.start_time)
    by = {r.data.tags.get("pipeline.stage"): r for r in rs}  # the first run of each stage (later tests add more)
    bb = by["backbone"].data
    assert bb.tags["out.checkpoint_uri.tf_efficientnet_lite2"].endswith("checkpoint/tf_efficientnet_lite2/model.pt")
    assert bb.params["backbone_info.tf_efficientnet_lite2.num_params"] != bb.params["backbone_info.num_params"]
    jobs = [r for r in rs if r.data.tags.get("mlflow.parentRunId") == by["finetune"].info.run_id]
    lite2 = [r for r in jobs if r.data.params["arm"] == "transfer@tf_efficientnet_lite2"]
    assert len(lite2) == 4 and {r.data.params["model"] for r in lite2} == {"tf_efficientnet_lite2"}
    assert {r.data.tags["backbone"] for r in lite2} == {"tf_efficientnet_lite2"}
    assert {r.data.params["model"] for r in jobs if r.data.params["arm"] == "transfer"} == {"tf_efficientnet_lite0"}
    assert "auc_k20_transfer.tf_efficientnet_lite2" in by["evaluate"].data.metrics
    mlflow.set_tracking_uri(smoke["uri"])
    sel = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=by["evaluate"].info.run_id,
                                                              artifact_path="selection.json")).read_text())
    assert "transfer@tf_efficientnet_lite2" in sel["k20"]["scores"]


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_ui_in_headless_chromium(smoke, tmp_path):
    """`mlflow server` on 127.0.0.1 over the smoke store; headless Chromium opens the experiment, sees the
    parent and child runs, opens the compare view of the finetune runs with their AUC, and saves a screenshot."""
    import shutil
    import urllib.request
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromium-driver are missing; .ci/run installs them")
        pytest.skip("apt-get install chromium chromium-driver to run the browser test")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    client = MlflowClient(smoke["uri"])
    exp = client.get_experiment_by_name("fewshot-medmeta-smoke")
    ft = [r for r in runs(smoke["uri"], exp.name) if r.data.tags.get("pipeline.stage") == "finetune-run"]
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", smoke["uri"],
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1600,1000",
              f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        opts.add_argument(a)
    driver = None
    try:
        deadline = time.time() + 90
        while True:
            try:
                if urllib.request.urlopen(f"{base}/health", timeout=2).read().strip() == b"OK":
                    break
            except OSError:
                pass
            assert time.time() < deadline and server.poll() is None, "mlflow server did not come up"
            time.sleep(0.5)
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
        wait = WebDriverWait(driver, 60)
        driver.get(f"{base}/#/experiments/{exp.experiment_id}/runs")
        wait.until(EC.presence_of_element_located((By.XPATH, "//*[contains(text(), 'pipeline')]")))
        driver.save_screenshot(str(tmp_path / "experiment.png"))
        ids = ",".join(f'"{r.info.run_id}"' for r in ft)
        driver.get(f'{base}/#/compare-runs?runs=[{ids}]&experiments=["{exp.experiment_id}"]')
        wait.until(EC.presence_of_element_located((By.XPATH, "//*[contains(text(), 'test_auc')]")))
        wait.until(EC.presence_of_element_located((By.XPATH, "//*[contains(text(), 'finetune/transfer/k20/seed0')]")))
        time.sleep(2)  # let the charts settle before the picture
        shot = tmp_path / "compare_view.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get("PIPELINE_SCREENSHOT_DIR"):
            shutil.copy(shot, Path(os.environ["PIPELINE_SCREENSHOT_DIR"]) / "compare_view.png")
    finally:
        if driver is not None:
            driver.quit()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_mlflow_run_entry_point(tmp_path, real_data):
    """`mlflow run . -e backbone` with the local environment runs the stage inside the project run."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PIPELINE_DATA_ROOT": str(real_data)}
    p = subprocess.run([sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "backbone", "-P", f"config={SMOKE}",
                        "--env-manager", "local", "--experiment-name", "mlproject-test"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rs = runs(uri, "mlproject-test")
    assert len(rs) == 1 and rs[0].info.status == "FINISHED"
    assert rs[0].data.tags["pipeline.stage"] == "backbone" and "weights_sha256" in rs[0].data.tags


@pytest.mark.parametrize("algorithm,extra", [("anil", []), ("metasgd", []), ("maml", ["meta.unroll=true"]),
                                            ("protonet", [])])
def test_meta_stage_runs_each_algorithm(tmp_path, real_data, algorithm, extra):
    """maml (reverse sweep), fomaml and reptile go through the meta stage in the tests above; anil, metasgd,
    protonet and maml through the unrolled inner loop here; every meta run logs where it started and its best."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = [a for e in extra for a in ("--set", e)]
    p = cli(["run", "--stage", "backbone,meta", "--config", SMOKE, "--set", f"data.root={real_data}",
             "--set", f"meta.algorithm={algorithm}", "--set", "meta.iterations=2", *sets], tmp_path, uri)
    assert f"[meta] {algorithm}:" in p.stdout
    run, weights = final_meta_weights(uri, "fewshot-medmeta-smoke")
    assert run.data.tags["algorithm"] == algorithm and "meta_val_acc" in run.data.metrics
    assert {"meta_val_start_acc", "meta_val_best_acc"} <= set(run.data.metrics)
    if algorithm == "metasgd":
        assert run.data.metrics["metasgd_lr_std"] > 0  # the per-parameter learning rates were learned
    assert run.data.params.get("meta.unroll", "False") == str("meta.unroll=true" in extra)
    # the config's "auto" and what it resolved to for this algorithm, both in the run's parameters
    assert run.data.params["meta.outer_lr"] == "auto"
    assert float(run.data.params["meta.resolved_outer_lr"]) == (3e-3 if algorithm == "protonet" else 1e-3)
    assert run.data.params["meta.resolved_head_init"] == "default"


def test_rezero_head_meta_learns_the_body_only(tmp_path, real_data):
    """meta.rezero_head=true: the N-way head is zero after every outer step, so the checkpoint's head is zero while
    its body has moved from ImageNet's; without it Reptile moves the head too."""
    heads = {}
    for flag in ("true", "false"):
        d = tmp_path / flag
        d.mkdir()
        uri = f"sqlite:///{d / 'mlflow.db'}"
        cli(["run", "--stage", "backbone,meta", "--config", SMOKE, "--set", f"data.root={real_data}",
             "--set", "meta.iterations=2", "--set", f"meta.rezero_head={flag}",
             "--set", "meta.head_init=default"], d, uri)  # a prototype head (reptile's default) is never learned
        run, w = final_meta_weights(uri, "fewshot-medmeta-smoke")
        heads[flag] = [w[k] for k in w if k.startswith("classifier.")]
        if flag == "true":
            bb = next(r for r in runs(uri, "fewshot-medmeta-smoke") if r.data.tags.get("pipeline.stage") == "backbone")
            path = mlflow.artifacts.download_artifacts(f"{bb.info.artifact_uri}/checkpoint/model.pt")
            start = torch.load(path, weights_only=False)["state_dict"]
            assert not torch.equal(w["conv_stem.weight"], start["conv_stem.weight"])  # the body was meta-learned
    assert heads["true"] and all(torch.count_nonzero(h) == 0 for h in heads["true"])
    assert any(torch.count_nonzero(h) > 0 for h in heads["false"])


def test_protonet_meta_arm_with_a_prototype_head_end_to_end(tmp_path, real_data):
    """meta.algorithm=protonet and finetune.head_init=prototype through backbone, meta and finetune at smoke size:
    the meta-protonet arm fine-tunes from a head built of the k-shot class means."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = cli(["run", "--stage", "backbone,meta,finetune", "--config", SMOKE, "--set", f"data.root={real_data}",
             "--set", "meta.algorithm=protonet", "--set", "finetune.head_init=prototype",
             "--set", "finetune.arms=[transfer,meta]", "--set", "finetune.shots=[5]", "--set", "finetune.seeds=1"],
            tmp_path, uri)
    assert "[meta] protonet:" in p.stdout
    jobs = {r.data.tags["arm"]: r for r in runs(uri, "fewshot-medmeta-smoke")
            if r.data.tags.get("pipeline.stage") == "finetune-run"}
    assert set(jobs) == {"transfer", "meta-protonet"} and all(r.info.status == "FINISHED" for r in jobs.values())
    ft = next(r for r in runs(uri, "fewshot-medmeta-smoke") if r.data.tags.get("pipeline.stage") == "finetune")
    assert ft.data.params["finetune.head_init"] == "prototype"
    assert all(0.0 <= r.data.metrics["test_auc"] <= 1.0 for r in jobs.values())


def test_multitask_control_becomes_an_arm_and_never_reads_the_target(tmp_path, real_data):
    """meta.algorithm=multitask end to end at smoke size: one head over every meta-train source class (the
    sampler's classes, none of them the target's), saved like a meta checkpoint, fine-tuned as arm meta-multitask."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = cli(["run", "--stage", "backbone,meta,finetune", "--config", SMOKE, "--set", f"data.root={real_data}",
             "--set", "meta.algorithm=multitask", "--set", "finetune.arms=[meta]", "--set", "finetune.shots=[5]",
             "--set", "finetune.seeds=1"], tmp_path, uri)
    assert "[meta] multitask:" in p.stdout
    rs = runs(uri, "fewshot-medmeta-smoke")
    meta = next(r for r in rs if r.data.tags.get("pipeline.stage") == "meta")
    assert {"meta_val_start_acc", "meta_val_best_acc", "meta_train_loss"} <= set(meta.data.metrics)
    mlflow.set_tracking_uri(uri)
    tasks = Path(mlflow.artifacts.download_artifacts(run_id=meta.info.run_id, artifact_path="tasks.txt")).read_text()
    assert "kermany" not in tasks and "pneumonia" not in tasks  # the source pool only
    state = torch.load(mlflow.artifacts.download_artifacts(run_id=meta.info.run_id, artifact_path="state/last.pt"),
                       weights_only=False)["learner"]
    from pipeline.config import load_config
    from pipeline.data import load_sources
    cfg = load_config(SMOKE, [f"data.root={real_data}"])
    n_classes = sum(len(d.class_names) for d in load_sources(cfg))  # every class has enough images here
    assert state["pooled_head.weight"].shape[0] == n_classes and torch.count_nonzero(state["pooled_head.weight"])
    ckpt = torch.load(mlflow.artifacts.download_artifacts(run_id=meta.info.run_id, artifact_path="checkpoint/model.pt"),
                      weights_only=False)
    assert ckpt["meta_algorithm"] == "multitask" and not any(k.startswith("pooled_head") for k in ckpt["state_dict"])
    jobs = [r for r in rs if r.data.tags.get("pipeline.stage") == "finetune-run"]
    assert {r.data.tags["arm"] for r in jobs} == {"meta-multitask"} and all(r.info.status == "FINISHED" for r in jobs)


CHAINED = '''
import sys
from pipeline.config import load_config
from pipeline.orchestrate import run_pipeline
config, over = sys.argv[1], sys.argv[2:]
meta = run_pipeline(load_config(config, over), ["backbone", "meta"])["meta"]["run_id"]
cfg = load_config(config, [*over, "finetune.arms=[transfer]", f"finetune.meta_from_runs=[{meta}]"])
print("finetune run", run_pipeline(cfg, ["backbone", "finetune"])["finetune"]["run_id"], flush=True)
'''


def test_torchrun_chained_pipelines_fine_tune_a_meta_run_named_by_id(tmp_path, real_data):
    """Two run_pipeline calls in one torchrun process (as benchmarks chain them), the second fine-tuning the first's
    meta run through `finetune.meta_from_runs`: every rank finds that run in the project's store, and rank 0 logs
    the meta arm's jobs there."""
    script = tmp_path / "chained.py"
    script.write_text(CHAINED)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    over = [f"data.root={real_data}", "meta.iterations=1", "meta.meta_batch=2", "finetune.shots=[5]",
            "finetune.seeds=1"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), SMOKE, *over], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "rank 1/2 on cpu: takes the next of 2 runs" in p.stdout and "rank 1/2 trained" in p.stdout
    rs = runs(uri, "fewshot-medmeta-smoke")
    meta = [r for r in rs if r.data.tags.get("pipeline.stage") == "meta"]
    ft = [r for r in rs if r.data.tags.get("pipeline.stage") == "finetune"]
    assert len(meta) == 1 and len(ft) == 1 and ft[0].info.status == "FINISHED"  # other ranks logged elsewhere
    jobs = {r.data.tags["arm"] for r in rs if r.data.tags.get("pipeline.stage") == "finetune-run"
            and r.info.status == "FINISHED" and "test_auc" in r.data.metrics}
    assert jobs == {"transfer", f"meta-{meta[0].data.tags['algorithm']}-{meta[0].info.run_id[:6]}"}
