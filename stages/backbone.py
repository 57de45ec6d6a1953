"""Stage 1: build the timm backbone with ImageNet weights and save it as a checkpoint artifact."""
from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path

import mlflow

from pipeline.backbone import backbone_info, create_backbone, save_checkpoint
from pipeline.config import PipelineConfig


def run(cfg: PipelineConfig, inputs: dict) -> dict[str, str]:
    """Returns {'checkpoint_uri': ...}; the checkpoint keeps timm's ImageNet head (later stages replace it)."""
    b = cfg.backbone
    model, source, sha = create_backbone(b.model, weights=b.weights, weights_file=b.weights_file, seed=cfg.seed)
    info = backbone_info(model, b.model, source, sha, cfg.data.image_size)
    mlflow.log_params({f"backbone_info.{k}": str(v)[:500] for k, v in asdict(info).items()})
    mlflow.set_tags({"backbone": b.model, "weight_source": source, "weights_sha256": sha})
    mlflow.log_metric("num_params", info.num_params)
    print(f"[backbone] {b.model}: {info.num_params / 1e6:.2f} M parameters, weights from {source} "
          f"(sha256 {sha[:12]}), mean={info.mean} std={info.std}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        save_checkpoint(path, model, b.model, {"info": asdict(info)})
        mlflow.log_artifact(str(path), "checkpoint")
    return {"checkpoint_uri": mlflow.get_artifact_uri("checkpoint/model.pt")}
