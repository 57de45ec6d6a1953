"""Stage 3: few-shot fine-tuning of every arm (scratch, ImageNet transfer, meta-learned) on the same seeded
k-shot subsets; each (arm, k, seed) is a nested run; test predictions are made once per final model."""
from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pandas as pd
import torch

from pipeline import distributed
from pipeline.backbone import build_from_checkpoint, create_backbone, head_prefix, load_checkpoint, resolve_data_info
from pipeline.config import FinetuneConfig, PipelineConfig, parse_arm, replica_name
from pipeline.data import DataError, ImageDataset, load_target, sample_kshot
from pipeline.device import configure, device_name, resolve_device, use_channels_last
from pipeline.metrics import classification_metrics
from pipeline.predict import PREPROCESS_FILE, preprocess_spec
from pipeline.scratch import scratch_dir
from pipeline.tracking import download
from pipeline.train import fit, predict_proba, self_train_rounds, stack_inputs
from pipeline.transforms import AlbumentationsTransform, build_transform


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


def load_arms(cfg: PipelineConfig, inputs: dict) -> tuple[dict[str, dict | None], dict[str, int], dict]:
    """Arm name -> checkpoint (None: random init of the backbone's architecture), arm name -> replica number (0
    but for `<arm>.r<n>`), and the backbone checkpoint."""
    backbone = load_checkpoint(download(inputs["backbone"]["checkpoint_uri"]))
    meta = None
    arms: dict[str, dict | None] = {}
    replicas: dict[str, int] = {}
    for spec in cfg.finetune.arms:
        kind, rep = parse_arm(spec)
        if kind == "scratch":
            name, ckpt = "scratch", None
        elif kind == "transfer":
            name, ckpt = "transfer", backbone
        else:
            meta = meta or load_checkpoint(download(inputs["meta"]["checkpoint_uri"]))
            name, ckpt = f"meta-{inputs['meta'].get('algorithm', 'meta')}", meta
        name = replica_name(name, rep)
        arms[name], replicas[name] = ckpt, rep
    for rid in cfg.finetune.meta_from_runs:
        run = mlflow.get_run(rid)
        name = f"meta-{run.data.tags.get('algorithm', rid[:8])}-{rid[:6]}"
        arms[name], replicas[name] = load_checkpoint(download(f"{run.info.artifact_uri}/checkpoint/model.pt")), 0
    return arms, replicas, backbone


def job_seed(split_seed: int, replica: int) -> int:
    """The seed of a job's training randomness (head init, augmentation, batch order, dropout): the split seed for
    an arm itself (so earlier runs reproduce), a seed drawn from (split seed, r) for its replica r. The k-shot
    subsets always come from the split seed, so replicas stay paired with every other arm."""
    if replica == 0:
        return split_seed
    return int(np.random.SeedSequence([split_seed, replica]).generate_state(1)[0] % 2**31)


def selection_size(val_per_class: int, val_labels: np.ndarray) -> int:
    """Validation images per class for model selection: `val_per_class`, or the whole split's smallest class."""
    smallest = int(np.bincount(val_labels).min())
    return min(val_per_class or smallest, smallest)


def job_subsets(train_labels: np.ndarray, val_labels: np.ndarray, k: int, n_val: int, seed: int, s: int,
                source: str = "target") -> tuple[int, np.ndarray, np.ndarray]:
    """(split seed, k-shot train indices, selection indices) of seed `s`: one subset per (k, seed), shared by
    every arm, so comparisons are paired."""
    split_seed = seed * 1000 + s
    tr_idx = sample_kshot(train_labels, k, split_seed, f"{source} train split")
    va_idx = sample_kshot(val_labels, n_val, split_seed, f"{source} val split")
    return split_seed, tr_idx, va_idx


def plan_jobs(ft: FinetuneConfig, arms: list[str]) -> list[tuple[int, int, str]]:
    """Every (k, seed, arm) of the sweep, seeds first_seed .. first_seed + seeds - 1; a job's subsets and
    initialisation depend only on the pipeline seed and its seed number, so runs of disjoint seed ranges add up."""
    return [(k, s, arm) for k in ft.shots for s in range(ft.first_seed, ft.first_seed + ft.seeds) for arm in arms]


def build_arm_model(ckpt: dict | None, model_name: str, n_classes: int, split_seed: int) -> torch.nn.Module:
    """An arm's initial model (ckpt None: random init) with a head seeded from the job's split seed; also seeds
    the global RNG for the job's dropout, so callers wrap it in `torch.random.fork_rng`."""
    init_seed = split_seed * 7 + 1
    torch.manual_seed(init_seed + 1)
    if ckpt is None:
        return create_backbone(model_name, num_classes=n_classes, weights="none", seed=init_seed)[0]
    return build_from_checkpoint(ckpt, n_classes, seed=init_seed)


def build_job_transform(ft: FinetuneConfig, size: int, dinfo: dict, split_seed: int,
                        strong: bool = False) -> AlbumentationsTransform:
    """A job's training transform: the recipe's augmentation (and flips, if asked), seeded by the split seed;
    `strong`: the noisy student's (`student_transform`)."""
    return build_transform(size, dinfo["mean"], dinfo["std"], train=ft.augment, seed=split_seed, hflip=ft.hflip,
                           strong=strong)


def student_transform(ft: FinetuneConfig, train_t: AlbumentationsTransform, size: int, dinfo: dict,
                      split_seed: int) -> AlbumentationsTransform:
    """The self-training student's transform: the teacher's own (its random stream continuing, as before the
    option existed) for `pseudo_augment=recipe`, a fresh strong one for `strong`."""
    return build_job_transform(ft, size, dinfo, split_seed, strong=True) if ft.pseudo_augment == "strong" else train_t


def run(cfg: PipelineConfig, inputs: dict) -> dict[str, str]:
    ft = cfg.finetune
    dev = resolve_device(cfg.device)
    distributed.init(dev)
    dev = distributed.local_device(dev)
    rank, world = distributed.world()
    configure(dev, cfg.cudnn_benchmark)
    channels_last = use_channels_last(cfg.channels_last, dev)
    mlflow.set_tags({"device": device_name(dev), "channels_last": str(channels_last), "compile": str(cfg.compile)})
    target = load_target(cfg)
    C = len(target.class_names)
    arms, replicas, backbone = load_arms(cfg, inputs)
    model_name = backbone["model_name"]
    dinfo = resolve_data_info(build_from_checkpoint(backbone, C))
    size = ft.image_size or cfg.data.image_size
    eval_t = build_transform(size, dinfo["mean"], dinfo["std"], train=False)
    tr, va, te = (target.splits[s] for s in ("train", "val", "test"))
    if len(np.unique(va.labels)) < C:
        raise DataError(f"{target.source}: the validation split lacks some of the classes {target.class_names}; "
                        f"model selection needs every class in val")
    mlflow.log_params({"target.classes": json.dumps(target.class_names), "target.source": target.source,
                       "target.n_test": len(te)})
    out_dir = scratch_dir("finetune-") / "predictions"
    out_dir.mkdir()
    spec = preprocess_spec(size, dinfo["mean"], dinfo["std"], target.class_names, model_name, tta=ft.tta)
    example = eval_t(te.images[0])[None].numpy()
    x_test = stack_inputs(ImageDataset(te.images, te.labels, eval_t), cfg.num_workers)
    x_val_all = stack_inputs(ImageDataset(va.images, va.labels, eval_t), cfg.num_workers)
    n_val = selection_size(ft.val_per_class, va.labels)
    t_start = time.time()

    def subsets(k: int, s: int) -> tuple[int, np.ndarray, np.ndarray]:
        return job_subsets(tr.labels, va.labels, k, n_val, cfg.seed, s, target.source)

    for k in ft.shots:  # fail on too-few-images before any training, on every rank
        subsets(k, 0)

    def train_job(k: int, s: int, arm: str, on_epoch=None) -> dict:
        """One (arm, k, seed) fine-tune and its one test pass; no tracking calls, so any rank can run it."""
        t0 = time.time()
        split_seed, tr_idx, va_idx = subsets(k, s)
        rs = job_seed(split_seed, replicas[arm])
        devs = [dev] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devs):  # dropout draws from a per-job seed: jobs are independent
            model = build_arm_model(arms[arm], model_name, C, rs)
            train_t = build_job_transform(ft, size, dinfo, rs)
            train_ds = ImageDataset([tr.images[i] for i in tr_idx], tr.labels[tr_idx], train_t)
            x_sel, y_sel = x_val_all[torch.from_numpy(va_idx)], va.labels[va_idx]
            res = fit(model, train_ds, x_sel, y_sel, ft, dev, seed=rs, head=head_prefix(model), n_classes=C,
                      on_epoch=on_epoch, num_workers=cfg.num_workers, channels_last=channels_last,
                      compile=cfg.compile)
            extra = {}

            def note_teacher(rnd: int, _teacher, teacher_fit) -> None:
                extra["teacher_val_auc" if rnd == 0 else f"round{rnd}_val_auc"] = teacher_fit.best_val_auc
            # self-training: the fine-tuned model becomes the teacher; its student (after the last round) is final
            model, res, history, seen, first, diag = self_train_rounds(
                model, res, lambda: build_arm_model(arms[arm], model_name, C, rs), ft, tr, tr_idx, eval_t,
                student_transform(ft, train_t, size, dinfo, rs),
                x_sel, y_sel, dev, seed=rs, n_classes=C, before_round=note_teacher, on_epoch=on_epoch,
                channels_last=channels_last, num_workers=cfg.num_workers, compile=cfg.compile)
            extra |= diag
            prob = predict_proba(model, x_test, dev, channels_last=channels_last, tta=ft.tta)  # the one test pass
        return {"history": history, "best_epoch": first + res.best_epoch, "best_val_auc": res.best_val_auc,
                "prob": prob, "n_train": len(tr_idx), "n_val": len(va_idx), "seconds": time.time() - t0,
                "train_images": seen, "extra": extra, "state": {n: v.cpu() for n, v in model.state_dict().items()}}

    index = []

    def log_job(k: int, s: int, arm: str, res: dict, live: bool) -> None:
        """The job's nested run (rank 0 only): params, curves (unless logged live), test metrics, files, model."""
        if not live:
            for e, rec in enumerate(res["history"]):
                mlflow.log_metrics(rec, step=e + 1)
        mlflow.log_params({"arm": arm, "k": k, "seed": s, "replica": replicas[arm], "n_train": res["n_train"],
                           "n_val": res["n_val"],
                           "epochs": ft.epochs, "lr_body": ft.lr_body, "lr_head": ft.lr_head,
                           "warmup_epochs": ft.warmup_epochs, "image_size": size, "hflip": ft.hflip,
                           "tta": ft.tta, "label_smoothing": ft.label_smoothing,
                           "pseudo_per_class": ft.pseudo_per_class, "pseudo_rounds": ft.pseudo_rounds,
                           "pseudo_augment": ft.pseudo_augment})
        fname = f"{arm}_k{k}_seed{s}.csv"
        df = pd.DataFrame(res["prob"], columns=[f"prob_{c}" for c in target.class_names])
        df.insert(0, "label", te.labels)
        df.insert(0, "index", np.arange(len(te)))
        df.to_csv(out_dir / fname, index=False)
        test = classification_metrics(te.labels, res["prob"])
        mlflow.log_metrics({"best_epoch": res["best_epoch"] + 1, "best_val_auc": res["best_val_auc"],
                            "seconds": res["seconds"], "train_images_per_s": res["train_images"] / res["seconds"],
                            **res["extra"],
                            **{f"test_{m}": v for m, v in test.items()}})
        mlflow.log_artifact(str(out_dir / fname), "predictions")
        model_uri = ""
        if ft.log_models:
            model, _, _ = create_backbone(model_name, num_classes=C, weights="none")
            model.load_state_dict(res["state"])
            model_uri = log_model(model, spec, example, out_dir.parent)
        index.append({"arm": arm, "k": k, "seed": s, "file": fname, "run_id": mlflow.active_run().info.run_id,
                      "best_epoch": res["best_epoch"] + 1, "best_val_auc": res["best_val_auc"],
                      "test_auc": test["auc"], "model_uri": model_uri})
        print(f"[finetune] finetune/{arm}/k{k}/seed{s}: val AUC {res['best_val_auc']:.3f} "
              f"(epoch {res['best_epoch'] + 1}), test AUC {test['auc']:.3f}, {res['seconds']:.1f}s", flush=True)

    def child_run(k: int, s: int, arm: str):
        return mlflow.start_run(run_name=f"finetune/{arm}/k{k}/seed{s}", nested=True,
                                tags={"pipeline.stage": "finetune-run", "arm": arm, "k": str(k), "seed": str(s),
                                      "backbone": model_name, "dataset": target.name})

    jobs = plan_jobs(ft, list(arms))
    if world == 1:  # curves go to MLflow live, epoch by epoch
        for job in jobs:
            with child_run(*job):
                log_job(*job, train_job(*job, on_epoch=lambda e, r: mlflow.log_metrics(r, step=e + 1)), live=True)
    else:  # each rank trains its share; rank 0 receives the results and logs every run, in job order
        mine = distributed.shard(jobs)
        print(f"[finetune] rank {rank}/{world} on {dev}: {len(mine)} of {len(jobs)} runs", flush=True)
        results = {job: train_job(*job) for job in mine}
        gathered = distributed.gather_to_main(results)
        if gathered is not None:
            results = {j: r for part in gathered for j, r in part.items()}
            for job in jobs:
                with child_run(*job):
                    log_job(*job, results[job], live=False)
    if rank != 0:
        return {}
    meta = {"class_names": target.class_names, "dataset": target.name, "source": target.source,
            "arms": list(arms), "shots": ft.shots, "seeds": ft.seeds,
            "first_seed": ft.first_seed, "runs": index}
    (out_dir / "index.json").write_text(json.dumps(meta, indent=1))
    mlflow.log_artifacts(str(out_dir), "predictions")  # the stage run holds the full set for evaluate
    mlflow.log_metric("finetune_seconds", time.time() - t_start)
    out = {"predictions_uri": mlflow.get_artifact_uri("predictions")}
    if ft.log_models and ft.registry_name:
        out |= {f"model.{arm}": uri for arm, uri in register_best(index, ft.registry_name).items()}
    return out
