"""Wall time, peak GPU memory and throughput of each stage run of the latest `--stage all` pipeline run in an
MLflow store (what docs/gpu.md's tables report). With --standalone: the latest top-level run of each stage
instead, for stages run one at a time (e.g. meta and finetune under torchrun). With --run: that run (a pipeline
run: its stage runs; a stage run: it alone), for any run of the store, not only the latest.

    python benchmarks/stage_times.py [--experiment fewshot-medmeta-gpu] [--tracking-uri sqlite:///mlruns/mlflow.db]
                                     [--standalone | --run RUN_ID]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.tracking import default_tracking_uri  # noqa: E402

SHOW = ("peak_gpu_memory_mib", "meta_tasks_per_s", "meta_seconds", "finetune_seconds", "meta_val_best_acc")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="fewshot-medmeta-gpu")
    ap.add_argument("--tracking-uri", default="")
    ap.add_argument("--standalone", action="store_true", help="latest top-level run of each stage, no parent run")
    ap.add_argument("--run", default="", help="this pipeline or stage run instead of the latest (any experiment)")
    args = ap.parse_args()
    client = MlflowClient(args.tracking_uri or default_tracking_uri())
    if args.run:
        try:
            chosen = client.get_run(args.run)
        except Exception as e:  # unknown id: MLflow's RESOURCE_DOES_NOT_EXIST
            sys.exit(f"no run {args.run!r} in {client.tracking_uri} ({e})")
        exp_id = chosen.info.experiment_id
    else:
        exp = client.get_experiment_by_name(args.experiment)
        if exp is None:
            sys.exit(f"no experiment {args.experiment!r} in {client.tracking_uri}")
        exp_id = exp.experiment_id
    runs = client.search_runs([exp_id], max_results=5000, order_by=["attributes.start_time DESC"])
    if args.run:
        parent = chosen if chosen.data.tags.get("pipeline.stage") == "pipeline" else None
        stages = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == args.run] if parent else [chosen]
        if not stages:
            sys.exit(f"pipeline run {args.run} has no stage runs")
    elif args.standalone:
        parent = None
        top = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        stages = [r for r in (next((r for r in top if r.data.tags.get("pipeline.stage") == s), None)
                              for s in ("backbone", "meta", "finetune", "evaluate")) if r is not None]
        if not stages:
            sys.exit("no top-level stage runs found")
    else:
        parent = next((r for r in runs if r.data.tags.get("pipeline.stage") == "pipeline"), None)
        stages = [r for r in runs if parent and r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        if parent is None or not stages:
            sys.exit("no pipeline run with stage runs found")
    total = 0.0
    for r in sorted(stages, key=lambda r: r.info.start_time):
        secs = ((r.info.end_time or r.info.start_time) - r.info.start_time) / 1000
        total += secs
        extra = ", ".join(f"{k}={r.data.metrics[k]:.4g}" for k in SHOW if k in r.data.metrics)
        children = [c for c in runs if c.data.tags.get("mlflow.parentRunId") == r.info.run_id]
        if children:  # fine-tune jobs: training images per second, mean over jobs
            rates = [c.data.metrics["train_images_per_s"] for c in children if "train_images_per_s" in c.data.metrics]
            if rates:
                extra += f", {len(children)} runs, train_images_per_s mean={sum(rates) / len(rates):.1f}"
            fit_s = sorted(c.data.metrics["seconds"] for c in children if "seconds" in c.data.metrics)
            if fit_s:  # each job's own training time, on whichever process trained it
                extra += (f", seconds per run min/median/max={fit_s[0]:.1f}/{fit_s[len(fit_s) // 2]:.1f}/"
                          f"{fit_s[-1]:.1f} (sum {sum(fit_s):.1f})")
        print(f"{r.data.tags['pipeline.stage']:<9} {r.info.status:<9} {secs:8.1f} s  {r.data.tags.get('device', '')}  "
              f"{extra}")
    if parent is None:
        first = min(r.info.start_time for r in stages)
        last = max(r.info.end_time or r.info.start_time for r in stages)
        span = (last - first) / 1000
        print(f"{'stages':<19} {span:8.1f} s from the first start to the last end (stages {total:.1f} s)")
        return
    p = parent.info
    seconds = ((p.end_time or p.start_time) - p.start_time) / 1000
    print(f"pipeline  {p.status:<9} {seconds:8.1f} s (stages {total:.1f} s)")


if __name__ == "__main__":
    main()
