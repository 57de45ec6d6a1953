"""Stage 1: build each timm backbone the run needs (`backbone.model`, and every model an arm names) with ImageNet
weights and save each as a checkpoint artifact."""
from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path

import mlflow

from pipeline.backbone import backbone_info, create_backbone, save_checkpoint, state_dict_sha256
from pipeline.config import PipelineConfig, backbone_models


def run(cfg: PipelineConfig, inputs: dict) -> dict[str, str]:
    """Returns {'checkpoint_uri', 'checkpoint_sha256'} of `backbone.model` and {'checkpoint_uri.<model>'} of each
    other model; the checkpoints keep timm's ImageNet head (later stages replace it)."""
    b, out = cfg.backbone, {}
    for i, name in enumerate(backbone_models(cfg)):
        model, source, sha = create_backbone(name, weights=b.weights, weights_file=b.weights_file if i == 0 else "",
                                             seed=cfg.seed)
        info = backbone_info(model, name, source, sha, cfg.data.image_size)
        prefix = "backbone_info" if i == 0 else f"backbone_info.{name}"
        mlflow.log_params({f"{prefix}.{k}": str(v)[:500] for k, v in asdict(info).items()})
        if i == 0:
            mlflow.set_tags({"backbone": name, "weight_source": source, "weights_sha256": sha})
            mlflow.log_metric("num_params", info.num_params)
        print(f"[backbone] {name}: {info.num_params / 1e6:.2f} M parameters, weights from {source} "
              f"(sha256 {sha[:12]}), mean={info.mean} std={info.std}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name / "model.pt"
            save_checkpoint(path, model, name, {"info": asdict(info)})
            mlflow.log_artifact(str(path), f"checkpoint/{name}" if i else "checkpoint")
        if i == 0:  # what the meta stage depends on: these weights, whatever other bodies the run also built
            out |= {"checkpoint_uri": mlflow.get_artifact_uri("checkpoint/model.pt"),
                    "checkpoint_sha256": state_dict_sha256(model.state_dict())}
        else:
            out[f"checkpoint_uri.{name}"] = mlflow.get_artifact_uri(f"checkpoint/{name}/model.pt")
    return out
