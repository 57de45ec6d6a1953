"""Stage 3: few-shot fine-tuning of every arm (scratch, ImageNet transfer, meta-learned) on the same seeded
k-shot subsets; each (arm, k, seed) is a nested run; test predictions are made once per final model."""
from __future__ import annotations

import json
import time
from dataclasses import replace

import mlflow

from pipeline import distributed
from pipeline.config import PipelineConfig
from pipeline.data import load_target
from pipeline.device import configure, device_name, resolve_device, use_channels_last
from pipeline.finetune import job_rounds, plan_jobs, prepare_inputs, train_job
from pipeline.finetune_runs import JobLogger, finished_jobs, job_run, load_arms, log_epoch, register_best
from pipeline.scratch import scratch_dir


def run(cfg: PipelineConfig, inputs: dict) -> dict[str, str]:
    """Returns {'predictions_uri', 'model.<arm>' for each registered arm}."""
    ft = cfg.finetune
    dev = resolve_device(cfg.device)
    distributed.init(dev)
    dev = distributed.local_device(dev)
    rank, world = distributed.world()
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
    jobs = plan_jobs(ft, list(arms))
    t_start = time.time()
    todo = distributed.from_main([job for job in jobs if job not in done])
    if world > 1:  # one job per rank per round; rank 0 logs each round as it ends, so a killed run keeps those
        rounds = job_rounds(todo, world)
        print(f"[finetune] rank {rank}/{world} on {dev}: {sum(len(r) > rank for r in rounds)} of {len(jobs)} runs",
              flush=True)
        for batch in rounds:
            mine = {job: replace(train_job(data[arms[job.arm].model], ft, job, arms[job.arm], cfg.seed, **speed),
                                 model=None) for job in batch[rank:rank + 1]}
            for part in distributed.gather_to_main(mine) or []:  # None on ranks > 0
                for job, res in part.items():
                    with job_run(job, arms[job.arm].model, target.name, key):
                        logger.log(res, live=False)
        if rank > 0:
            return {}
        todo = []
    for job in jobs:  # in job order; one process trains here, its curves going to MLflow live, epoch by epoch
        if job in done:
            logger.keep(job, done[job])
        elif job in todo:
            arm = arms[job.arm]
            with job_run(job, arm.model, target.name, key):
                logger.log(train_job(data[arm.model], ft, job, arm, cfg.seed, on_epoch=log_epoch, **speed), live=True)
    logger.write_index(jobs)
    mlflow.log_metric("finetune_seconds", time.time() - t_start)
    out = {"predictions_uri": mlflow.get_artifact_uri("predictions"),
           "val_predictions_uri": mlflow.get_artifact_uri("val_predictions")}
    if ft.log_models and ft.registry_name:
        out |= {f"model.{arm}": uri for arm, uri in register_best(logger.index, ft.registry_name).items()}
    return out
