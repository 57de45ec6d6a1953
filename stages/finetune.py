"""Stage 3: few-shot fine-tuning of every arm (scratch, ImageNet transfer, meta-learned) on the same seeded
k-shot subsets; each (arm, k, seed) is a nested run; test predictions are made once per final model."""
from __future__ import annotations

import json
import time

import mlflow

from pipeline import distributed
from pipeline.config import PipelineConfig
from pipeline.data import load_target
from pipeline.device import configure, device_name, resolve_device, use_channels_last
from pipeline.finetune import plan_jobs, prepare_inputs
from pipeline.finetune_runs import JobLogger, finished_jobs, load_arms, register_best, run_jobs
from pipeline.scratch import scratch_dir


def run(cfg: PipelineConfig, inputs: dict) -> dict[str, str]:
    """Returns {'predictions_uri', 'model.<arm>' for each registered arm}."""
    ft = cfg.finetune
    dev = resolve_device(cfg.device)
    distributed.init(dev)
    dev = distributed.local_device(dev)
    rank = distributed.world()[0]
    configure(dev, cfg.cudnn_benchmark)
    cl = use_channels_last(cfg.channels_last, dev)
    mlflow.set_tags({"device": device_name(dev), "channels_last": str(cl), "compile": str(cfg.compile)})
    target = load_target(cfg)
    arms, backbones = load_arms(cfg, inputs)
    data = {m: prepare_inputs(cfg, target, ckpt, num_workers=cfg.num_workers) for m, ckpt in backbones.items()}
    mlflow.log_params({"target.classes": json.dumps(target.class_names), "target.source": target.source,
                       "target.n_test": len(target.splits["test"])})
    out_dir = scratch_dir("finetune-") / "predictions"
    out_dir.mkdir()
    logger = JobLogger(data, ft, arms, out_dir)
    speed = {"dev": dev, "channels_last": cl, "num_workers": cfg.num_workers, "compile": cfg.compile}
    key = mlflow.active_run().data.tags.get("pipeline.stage_key", "")
    resume = inputs.get("resume", True) and rank == 0  # rank 0 reads the store; every rank gets its plan
    done = finished_jobs(key, out_dir, ft.log_models) if resume else {}
    t_start = time.time()
    if not run_jobs(plan_jobs(ft, list(arms)), done, logger, cfg.seed, speed, target.name, key, resume):
        return {}  # a torchrun rank > 0: rank 0 logged its jobs
    mlflow.log_metric("finetune_seconds", time.time() - t_start)
    out = {"predictions_uri": mlflow.get_artifact_uri("predictions"),
           "val_predictions_uri": mlflow.get_artifact_uri("val_predictions")}
    if ft.log_models and ft.registry_name:
        out |= {f"model.{arm}": uri for arm, uri in register_best(logger.index, ft.registry_name).items()}
    return out
