"""Stage 3: few-shot fine-tuning of every arm (scratch, ImageNet transfer, meta-learned) on the same seeded
k-shot subsets; each (arm, k, seed) is a nested run; test predictions are made once per final model."""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pandas as pd
import torch

from pipeline.backbone import build_from_checkpoint, create_backbone, head_prefix, load_checkpoint, resolve_data_info
from pipeline.config import PipelineConfig
from pipeline.data import DataError, ImageDataset, load_target, sample_kshot
from pipeline.device import configure, device_name, resolve_device
from pipeline.metrics import classification_metrics
from pipeline.predict import PREPROCESS_FILE, preprocess_spec
from pipeline.tracking import download
from pipeline.train import fit, predict_proba
from pipeline.transforms import build_transform


def log_model(model, spec: dict, example: np.ndarray, work: Path) -> str:
    """mlflow.pytorch model with signature, input example and the preprocessing spec; returns its URI."""
    from mlflow.models import infer_signature
    (work / PREPROCESS_FILE).write_text(json.dumps(spec, indent=1))
    model = model.cpu().eval()
    with torch.no_grad():
        out = model(torch.from_numpy(example)).softmax(-1).numpy()
    import timm
    reqs = [f"torch=={torch.__version__.split('+')[0]}", f"timm=={timm.__version__}"]  # skips slow inference
    info = mlflow.pytorch.log_model(model, name="model", signature=infer_signature(example, out),
                                    input_example=example, extra_files=[str(work / PREPROCESS_FILE)],
                                    pip_requirements=reqs, serialization_format="pickle")
    return info.model_uri


def register_best(index: list[dict], registry: str) -> dict[str, str]:
    """Register each arm's run with the best validation AUC (never test) as `<registry>-<arm>`."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient()
    out = {}
    for arm in dict.fromkeys(r["arm"] for r in index):
        best = max((r for r in index if r["arm"] == arm and r.get("model_uri")), key=lambda r: r["best_val_auc"],
                   default=None)
        if best is None:
            continue
        mv = mlflow.register_model(best["model_uri"], f"{registry}-{arm}")
        for key in ("k", "seed", "best_val_auc", "test_auc", "run_id"):
            client.set_model_version_tag(mv.name, mv.version, key, str(best[key]))
        out[arm] = f"models:/{mv.name}/{mv.version}"
        print(f"[finetune] registered {out[arm]} (k={best['k']}, seed={best['seed']}, "
              f"val AUC {best['best_val_auc']:.3f})", flush=True)
    return out


def load_arms(cfg: PipelineConfig, inputs: dict) -> tuple[dict[str, dict | None], dict]:
    """Arm name -> checkpoint (None: random init of the backbone's architecture)."""
    backbone = load_checkpoint(download(inputs["backbone"]["checkpoint_uri"]))
    arms: dict[str, dict | None] = {}
    for arm in cfg.finetune.arms:
        if arm == "scratch":
            arms["scratch"] = None
        elif arm == "transfer":
            arms["transfer"] = backbone
        elif arm == "meta":
            arms[f"meta-{inputs['meta'].get('algorithm', 'meta')}"] = load_checkpoint(
                download(inputs["meta"]["checkpoint_uri"]))
    for rid in cfg.finetune.meta_from_runs:
        run = mlflow.get_run(rid)
        arms[f"meta-{run.data.tags.get('algorithm', rid[:8])}-{rid[:6]}"] = load_checkpoint(
            download(f"{run.info.artifact_uri}/checkpoint/model.pt"))
    return arms, backbone


def run(cfg: PipelineConfig, inputs: dict) -> dict[str, str]:
    ft = cfg.finetune
    dev = resolve_device(cfg.device)
    configure(dev)
    mlflow.set_tag("device", device_name(dev))
    target = load_target(cfg)
    C = len(target.class_names)
    arms, backbone = load_arms(cfg, inputs)
    model_name = backbone["model_name"]
    dinfo = resolve_data_info(build_from_checkpoint(backbone, C))
    size = cfg.data.image_size
    eval_t = build_transform(size, dinfo["mean"], dinfo["std"], train=False)
    tr, va, te = (target.splits[s] for s in ("train", "val", "test"))
    if len(np.unique(va.labels)) < C:
        raise DataError(f"{target.source}: the validation split lacks some of the classes {target.class_names}; "
                        f"model selection needs every class in val")
    test_ds = ImageDataset(te.images, te.labels, eval_t)
    mlflow.log_params({"target.classes": json.dumps(target.class_names), "target.source": target.source,
                       "target.n_test": len(te)})
    out_dir = Path(tempfile.mkdtemp(prefix="finetune-")) / "predictions"
    out_dir.mkdir()
    spec = preprocess_spec(size, dinfo["mean"], dinfo["std"], target.class_names, model_name)
    example = eval_t(te.images[0])[None].numpy()
    index = []
    t_start = time.time()
    for k in ft.shots:
        for s in range(ft.seeds):
            split_seed = cfg.seed * 1000 + s  # one subset per (k, seed), shared by every arm: paired comparisons
            tr_idx = sample_kshot(tr.labels, k, split_seed, f"{target.source} train split")
            n_val = ft.val_per_class or int(np.bincount(va.labels).min())
            va_idx = sample_kshot(va.labels, min(n_val, int(np.bincount(va.labels).min())), split_seed,
                                  f"{target.source} val split")
            val_ds = ImageDataset([va.images[i] for i in va_idx], va.labels[va_idx], eval_t)
            for arm, ckpt in arms.items():
                name = f"finetune/{arm}/k{k}/seed{s}"
                with mlflow.start_run(run_name=name, nested=True,
                                      tags={"pipeline.stage": "finetune-run", "arm": arm, "k": str(k),
                                            "seed": str(s), "backbone": model_name,
                                            "dataset": target.name}) as child:
                    t0 = time.time()
                    init_seed = split_seed * 7 + 1
                    if ckpt is None:
                        model, _, _ = create_backbone(model_name, num_classes=C, weights="none", seed=init_seed)
                    else:
                        model = build_from_checkpoint(ckpt, C, seed=init_seed)
                    train_t = build_transform(size, dinfo["mean"], dinfo["std"], train=ft.augment, seed=split_seed)
                    train_ds = ImageDataset([tr.images[i] for i in tr_idx], tr.labels[tr_idx], train_t)
                    mlflow.log_params({"arm": arm, "k": k, "seed": s, "n_train": len(tr_idx), "n_val": len(va_idx),
                                       "epochs": ft.epochs, "lr_body": ft.lr_body, "lr_head": ft.lr_head,
                                       "warmup_epochs": ft.warmup_epochs, "image_size": size})
                    res = fit(model, train_ds, val_ds, ft, dev, seed=split_seed, head=head_prefix(model),
                              n_classes=C, num_workers=cfg.num_workers,
                              on_epoch=lambda e, r: mlflow.log_metrics(r, step=e + 1))
                    prob = predict_proba(model, test_ds, dev, num_workers=cfg.num_workers)  # the one test pass
                    fname = f"{arm}_k{k}_seed{s}.csv"
                    df = pd.DataFrame(prob, columns=[f"prob_{c}" for c in target.class_names])
                    df.insert(0, "label", te.labels)
                    df.insert(0, "index", np.arange(len(te)))
                    df.to_csv(out_dir / fname, index=False)
                    test = classification_metrics(te.labels, prob)
                    mlflow.log_metrics({"best_epoch": res.best_epoch + 1, "best_val_auc": res.best_val_auc,
                                        "seconds": time.time() - t0, **{f"test_{m}": v for m, v in test.items()}})
                    mlflow.log_artifact(str(out_dir / fname), "predictions")
                    model_uri = log_model(model, spec, example, out_dir.parent) if ft.log_models else ""
                    index.append({"arm": arm, "k": k, "seed": s, "file": fname, "run_id": child.info.run_id,
                                  "best_epoch": res.best_epoch + 1, "best_val_auc": res.best_val_auc,
                                  "test_auc": test["auc"], "model_uri": model_uri})
                print(f"[finetune] {name}: val AUC {res.best_val_auc:.3f} (epoch {res.best_epoch + 1}), "
                      f"test AUC {test['auc']:.3f}, {time.time() - t0:.1f}s", flush=True)
    meta = {"class_names": target.class_names, "dataset": target.name, "source": target.source,
            "arms": list(arms), "shots": ft.shots, "seeds": ft.seeds, "runs": index}
    (out_dir / "index.json").write_text(json.dumps(meta, indent=1))
    mlflow.log_artifacts(str(out_dir), "predictions")  # the stage run holds the full set for evaluate
    mlflow.log_metric("finetune_seconds", time.time() - t_start)
    out = {"predictions_uri": mlflow.get_artifact_uri("predictions")}
    if ft.log_models and ft.registry_name:
        out |= {f"model.{arm}": uri for arm, uri in register_best(index, ft.registry_name).items()}
    return out
