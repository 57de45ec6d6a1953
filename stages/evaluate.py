"""Stage 4: metrics with confidence intervals from the finetune stage's test predictions, paired comparisons
of arms, plots and a report (`pipeline.evaluate`); the report and summary metrics also go to the parent run."""
from __future__ import annotations

import json
import shutil
import time

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from pipeline.config import PipelineConfig, parse_ensemble
from pipeline.evaluate import add_ensemble, compute_results, make_plots, merge_predictions, summary_metrics, write_report
from pipeline.scratch import scratch_dir
from pipeline.tracking import download


def run(cfg: PipelineConfig, inputs: dict) -> dict[str, str]:
    ev = cfg.evaluate
    src = download(inputs["finetune"]["predictions_uri"])
    out = scratch_dir("evaluate-")
    pred_dir = out / "predictions"
    shutil.copytree(src, pred_dir)
    for other in inputs.get("merge", []):  # resolved and checked by the orchestrator (evaluate.merge_runs)
        merge_predictions(pred_dir, download(other["predictions_uri"]), source=f"finetune run {other['run_id']}",
                          tag=other.get("tag", ""))
    if ev.ensemble:
        add_ensemble(pred_dir, source=inputs["finetune"]["predictions_uri"])
    for spec in ev.ensembles:
        name, members = parse_ensemble(spec)
        add_ensemble(pred_dir, name, source=inputs["finetune"]["predictions_uri"], members=members)
    res = compute_results(pred_dir, ev.bootstrap, ev.ci, ev.reference_arm)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    text = write_report(res, cfg.to_dict(), out)
    plots = make_plots(res, pred_dir, out)
    summary = summary_metrics(res)
    mlflow.log_metrics(summary)
    parent = inputs.get("parent_run_id")
    client = MlflowClient()
    if parent:  # the parent run lines arms up in the compare view and shows the report
        client.log_batch(parent, metrics=[Metric(k, v, int(time.time() * 1000), 0) for k, v in summary.items()])
    for p in [out / "results.json", out / "report.md", *plots]:
        mlflow.log_artifact(str(p))
        if parent:
            client.log_artifact(parent, str(p))
    mlflow.log_artifacts(str(pred_dir), "predictions")
    print(text.split("\n## Config")[0], flush=True)
    return {"results_uri": mlflow.get_artifact_uri("results.json")}
