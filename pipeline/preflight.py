"""Checks that run before the first stage starts: every data set the requested stages will read, and the config
values that stages would otherwise find wrong late (the timm model name). A problem is a ConfigError or DataError
(exit 2) before any MLflow run exists, so bad input costs no training time and leaves no run behind."""
from __future__ import annotations

import difflib
from pathlib import Path

from .config import ConfigError, PipelineConfig, backbone_models
from .data import load_target

PLAIN = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # normalisation does not change what the checks read


def check_model_name(name: str, key: str = "backbone.model") -> None:
    """A timm model name (with or without a pretrained tag, e.g. `resnet50.a1_in1k`), else a ConfigError that
    names close matches and the config key `key` it came from."""
    import timm
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"close matches: {', '.join(close)}" if close else "no close match"
    raise ConfigError(f"config key '{key}': {name!r} is not a timm model ({hint}; "
                      f"`python -c \"import timm; print(timm.list_models('*lite*'))\"` lists names)")


def check_inputs(cfg: PipelineConfig, stages: list[str]) -> None:
    """Open and validate what `stages` will read: the backbone's name and weights file, the source pool and its
    tasks (meta), the target and its k-shot subsets (finetune)."""
    if "backbone" in stages:
        check_model_name(cfg.backbone.model)
        for model in backbone_models(cfg)[1:]:
            check_model_name(model, "finetune.arms")
        if cfg.backbone.weights_file and not Path(cfg.backbone.weights_file).expanduser().is_file():
            raise ConfigError(f"config key 'backbone.weights_file': {cfg.backbone.weights_file} not found")
    if "meta" in stages and cfg.meta.iterations:
        from .meta.training import build_samplers
        build_samplers(cfg, PLAIN)
    if "finetune" in stages:
        from .finetune import check_target
        check_target(cfg, load_target(cfg))
