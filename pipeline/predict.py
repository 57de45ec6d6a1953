"""`python -m pipeline predict`: class probabilities from a logged model, with the preprocessing stored beside it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import mlflow
import mlflow.pyfunc
import mlflow.pytorch
import numpy as np
import pandas as pd
import torch

from .data import IMAGE_SUFFIXES, DataError, read_image
from .train import FlipTTA
from .transforms import build_transform

PREPROCESS_FILE = "preprocess.json"


def preprocess_spec(size: int, mean, std, class_names: list[str], model_name: str, tta: bool = False) -> dict:
    """What `predict` needs to rebuild the eval transform (and the flip TTA, if the model was scored with it)
    exactly; stored with every logged model."""
    return {"image_size": size, "mean": list(mean), "std": list(std), "class_names": list(class_names),
            "model_name": model_name, "channels": 3, "tta": bool(tta)}


def expand_inputs(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"{p} not found; give image files or folders of images")
    if not out:
        raise DataError(f"no images found in {paths}")
    return out


def download_model(uri: str) -> Path:
    """A local copy of a logged model (`models:/name/version`, `runs:/id/model`, a path)."""
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as e:
        raise DataError(f"cannot load model {uri!r} ({e}); use models:/<name>/<version> or runs:/<run_id>/model") \
            from e


def load_model(uri: str, local: Path | None = None) -> tuple[torch.nn.Module, dict]:
    """A logged fine-tuned model and its preprocessing spec (`local`: already downloaded from `uri`)."""
    local = local or download_model(uri)
    spec_file = next(iter(local.rglob(PREPROCESS_FILE)), None)
    if spec_file is None:
        raise DataError(f"model {uri} has no {PREPROCESS_FILE}; it was not logged by this pipeline")
    model = mlflow.pytorch.load_model(str(local), map_location="cpu")
    return model.eval(), json.loads(spec_file.read_text())


@torch.no_grad()
def predict_files(model: torch.nn.Module, spec: dict, files: list[Path], batch_size: int = 64) -> np.ndarray:
    t = build_transform(spec["image_size"], spec["mean"], spec["std"], train=False)
    net = FlipTTA(model) if spec.get("tta") else model  # as the finetune stage scored it
    out = []
    for i in range(0, len(files), batch_size):
        x = torch.stack([t(read_image(f)) for f in files[i:i + batch_size]])
        out.append(net(x).float().softmax(-1).numpy())
    return np.concatenate(out)


def load_predictor(uri: str) -> tuple[Callable[[list[Path]], pd.DataFrame], str]:
    """What `predict` calls for a model URI: image files -> a DataFrame of `prob_<class>` and `predicted`, and a line
    saying how the class is decided. A `<registry>-best` model (an MLflow pyfunc with `serving.json`: the members'
    mean, a threshold chosen on validation) or a single logged fine-tuned model (argmax)."""
    from .served import SERVING_FILE, probability_frame
    local = download_model(uri)
    serving = next(iter(local.rglob(SERVING_FILE)), None)
    if serving is not None:
        model, info = mlflow.pyfunc.load_model(str(local)), json.loads(serving.read_text())
        positive = info["class_names"][-1]
        rule = (f"{positive} when prob_{positive} >= {info['threshold']:.4f} ({info['rule']} on validation)"
                if info.get("threshold") is not None else "the most probable class")
        note = f"{info['candidate']} (k={info['k']}, seed {info['seed']}, members {info['members']}); predicted: {rule}"
        return (lambda files: model.predict([str(f) for f in files])), note
    net, spec = load_model(uri, local)
    return (lambda files: probability_frame(predict_files(net, spec, files), {"class_names": spec["class_names"]})), \
        "predicted: the most probable class"
