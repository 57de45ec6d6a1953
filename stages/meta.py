"""Stage 2: meta-pretrain the backbone on N-way K-shot tasks from the source pool (never the target); resumable
(`pipeline.meta.training`)."""
from __future__ import annotations

import mlflow

from pipeline import distributed
from pipeline.backbone import load_checkpoint, save_checkpoint
from pipeline.config import PipelineConfig
from pipeline.device import configure, device_name, resolve_device
from pipeline.meta.training import meta_train
from pipeline.scratch import scratch_dir
from pipeline.tracking import download


def run(cfg: PipelineConfig, inputs: dict) -> dict[str, str]:
    """Returns {'checkpoint_uri', 'algorithm'}: the best meta-validation weights, in the backbone's format."""
    m = cfg.meta
    dev = resolve_device(cfg.device)
    distributed.init(dev)
    dev = distributed.local_device(dev)
    configure(dev, cfg.cudnn_benchmark)
    mlflow.set_tags({"device": device_name(dev), "algorithm": m.algorithm, "backbone": cfg.backbone.model})
    # what "auto" became, beside the config's own `meta.outer_lr: auto` in the run's parameters
    mlflow.log_params({"meta.resolved_outer_lr": m.resolved_outer_lr(), "meta.resolved_head_init": m.resolved_head_init()})
    ckpt = load_checkpoint(download(inputs["backbone"]["checkpoint_uri"]))
    key = mlflow.active_run().data.tags.get("pipeline.stage_key", "")
    work = scratch_dir("meta-")
    res = meta_train(cfg, ckpt, dev, work, resume_key=key if inputs.get("resume", True) else "")
    path = work / "model.pt"
    save_checkpoint(path, res.model, ckpt["model_name"], {"info": ckpt.get("info", {}), "meta_algorithm": m.algorithm,
                                                            "meta_val_best_acc": res.best_acc})
    mlflow.log_artifact(str(path), "checkpoint")
    if summary := res.learner.summary():  # e.g. Meta-SGD's learned inner learning rates
        mlflow.log_metrics(summary)
    print(f"[meta] done: best meta-val accuracy {res.best_acc:.3f}"
          + (f" (before meta-training {res.start_acc:.3f})" if res.start_acc is not None else ""), flush=True)
    return {"checkpoint_uri": mlflow.get_artifact_uri("checkpoint/model.pt"), "algorithm": m.algorithm}
