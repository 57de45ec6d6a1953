"""Stage 4: metrics with confidence intervals from the finetune stage's test predictions, paired comparisons
of arms, plots and a report (`pipeline.evaluate`); the report and summary metrics also go to the parent run."""
from __future__ import annotations

import json
import shutil
import time

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from pipeline.config import PipelineConfig
from pipeline.evaluate import evaluate_predictions, make_plots, summary_metrics, val_dir, write_report
from pipeline.scratch import scratch_dir
from pipeline.served import register_best
from pipeline.tracking import download


def run(cfg: PipelineConfig, inputs: dict) -> dict[str, str]:
    """Returns {'results_uri', 'selection_uri'}; the report, results and plots also go to the parent run."""
    ev, ft_out = cfg.evaluate, inputs["finetune"]
    out = scratch_dir("evaluate-")
    pred_dir = out / "predictions"
    shutil.copytree(download(ft_out["predictions_uri"]), pred_dir)
    if ft_out.get("val_predictions_uri"):  # runs from before validation predictions were logged have none
        shutil.copytree(download(ft_out["val_predictions_uri"]), val_dir(pred_dir), dirs_exist_ok=True)
    merges = [(download(o["predictions_uri"]), download(o["val_predictions_uri"]) if o.get("val_predictions_uri")
               else None, f"finetune run {o['run_id']}", o.get("tag", "")) for o in inputs.get("merge", [])]
    res = evaluate_predictions(pred_dir, ev, merges, source=ft_out["predictions_uri"])
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "selection.json").write_text(json.dumps(res["selection"], indent=1))
    text = write_report(res, cfg.to_dict(), out)
    plots = make_plots(res, pred_dir, out)
    summary = summary_metrics(res)
    mlflow.log_metrics(summary)
    parent = inputs.get("parent_run_id")
    client = MlflowClient()
    if parent:  # the parent run lines arms up in the compare view and shows the report
        client.log_batch(parent, metrics=[Metric(k, v, int(time.time() * 1000), 0) for k, v in summary.items()])
    for p in [out / "results.json", out / "selection.json", out / "report.md", *plots]:
        mlflow.log_artifact(str(p))
        if parent:
            client.log_artifact(parent, str(p))
    mlflow.log_artifacts(str(pred_dir), "predictions")
    mlflow.log_artifacts(str(val_dir(pred_dir)), "val_predictions")
    print(text.split("\n## Config")[0], flush=True)
    registered = {}
    if cfg.finetune.log_models and cfg.finetune.registry_name:  # the chosen candidate per k, as one servable model
        registered = register_best(res, json.loads((pred_dir / "index.json").read_text()), val_dir(pred_dir),
                                   cfg.finetune.registry_name, out / "best")
    return {"results_uri": mlflow.get_artifact_uri("results.json"),
            "selection_uri": mlflow.get_artifact_uri("selection.json"), **registered}
