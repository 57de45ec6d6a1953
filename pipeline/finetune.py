"""The per-job machinery of the finetune stage, MLflow-free: job planning, seeds, paired subsets, arm models,
transforms and `train_job`, the one implementation of an (arm, k, seed) fine-tune (the stage and
`benchmarks/finetune_recipe.py` both call it).

A job's subsets and initialisation depend only on the pipeline seed and its seed number, so results do not depend
on which process trains a job or on the jobs before it (docs/design.md).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import nn

from .backbone import build_from_checkpoint, create_backbone, head_prefix, resolve_data_info
from .config import FinetuneConfig, PipelineConfig
from .data import DataError, ImageDataset, LabeledData, Split, sample_kshot
from .job_state import JobState
from .train import FitResult, fit, predict_proba, self_train_rounds, stack_inputs
from .transforms import AlbumentationsTransform, build_transform


class Job(NamedTuple):
    """One fine-tune of the sweep: arm `arm` on the k-shot subset of seed number `seed`."""

    k: int
    seed: int
    arm: str

    @property
    def name(self) -> str:
        return f"finetune/{self.arm}/k{self.k}/seed{self.seed}"


@dataclass
class Arm:
    """An arm's initial weights (None: random init of the architecture), its replica number (0 for the arm itself,
    n for `<arm>.r<n>`) and its timm model (whose preprocessing its `TargetInputs` use)."""

    checkpoint: dict | None
    replica: int = 0
    model: str = ""


@dataclass
class TargetInputs:
    """What every job of a stage shares: the target's splits, the preprocessing, and the validation (and, for the
    stage, test) images transformed once."""

    target: LabeledData
    model_name: str
    dinfo: dict  # the backbone's mean/std (timm's data config)
    size: int  # fine-tuning and test side length
    eval_t: AlbumentationsTransform
    x_val: torch.Tensor  # the whole validation split, eval-transformed
    x_test: torch.Tensor | None  # the test split, eval-transformed; None: no job reads the test split
    n_val: int  # validation images per class for model selection

    @property
    def n_classes(self) -> int:
        return len(self.target.class_names)

    def split(self, name: str) -> Split:
        return self.target.splits[name]


@dataclass
class JobResult:
    """A job's final model and what the stage logs of it."""

    job: Job
    model: nn.Module = field(repr=False)  # the final model (moved to the CPU to travel between processes)
    history: list[dict[str, float]]
    best_epoch: int  # in `history`'s numbering (0-based)
    first_epoch: int  # where the final model's own fit starts in `history` (self-training: the last student's)
    best_val_auc: float
    prob: np.ndarray | None  # test probabilities, the job's one test pass (None without `x_test`)
    val_prob: np.ndarray  # probabilities on the whole validation split: what candidates are chosen on
    n_train: int
    n_val: int
    seconds: float
    train_images: int
    extra: dict[str, float]  # teacher and round selection AUCs, pseudo-label figures


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


def plan_jobs(ft: FinetuneConfig, arms: list[str]) -> list[Job]:
    """Every (k, seed, arm) of the sweep, seeds first_seed .. first_seed + seeds - 1; a job's subsets and
    initialisation depend only on the pipeline seed and its seed number, so runs of disjoint seed ranges add up."""
    return [Job(k, s, arm) for k in ft.shots for s in range(ft.first_seed, ft.first_seed + ft.seeds) for arm in arms]


def queue_order(jobs: list[Job]) -> list[Job]:
    """The order torchrun ranks take `jobs` from their shared queue (`distributed.share_work`): the largest k
    first, as a job's cost grows with its k-shot set, so the sweep does not end on one rank training a slow job
    while the others wait; then by arm and seed."""
    return sorted(jobs, key=lambda j: (-j.k, j.arm, j.seed))


def build_arm_model(ckpt: dict | None, model_name: str, n_classes: int, split_seed: int) -> nn.Module:
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


def check_target(cfg: PipelineConfig, target: LabeledData) -> int:
    """What a sweep needs of the target, checked before any training: every class in validation, enough images
    of each class for every k of `finetune.shots` (and, with self-training, unlabelled images left over). Returns
    the validation images per class for model selection."""
    ft, C = cfg.finetune, len(target.class_names)
    tr, va = target.splits["train"], target.splits["val"]
    if len(np.unique(va.labels)) < C:
        raise DataError(f"{target.source}: the validation split lacks some of the classes {target.class_names}; "
                        f"model selection needs every class in val")
    n_val = selection_size(ft.val_per_class, va.labels)
    for k in ft.shots:
        job_subsets(tr.labels, va.labels, k, n_val, cfg.seed, 0, target.source)
    if ft.pseudo_per_class and (0 in ft.shots or max(ft.shots) * C >= len(tr.labels)):
        raise DataError(f"{target.source}: self-training needs unlabelled train images, but k="
                        f"{'all' if 0 in ft.shots else max(ft.shots)} uses all {len(tr.labels)}; lower finetune.shots "
                        f"or set finetune.pseudo_per_class=0")
    return n_val


def prepare_inputs(cfg: PipelineConfig, target: LabeledData, backbone: dict, with_test: bool = True,
                   num_workers: int = 0) -> TargetInputs:
    """The shared inputs of a sweep on `target` with the backbone checkpoint's preprocessing; checks, before any
    training, that validation has every class and that every k of `finetune.shots` has enough images."""
    ft = cfg.finetune
    dinfo = resolve_data_info(build_from_checkpoint(backbone, len(target.class_names)))
    size = ft.image_size or cfg.data.image_size
    eval_t = build_transform(size, dinfo["mean"], dinfo["std"], train=False)
    tr, va, te = (target.splits[s] for s in ("train", "val", "test"))
    n_val = check_target(cfg, target)
    x_test = stack_inputs(ImageDataset(te.images, te.labels, eval_t), num_workers) if with_test else None
    x_val = stack_inputs(ImageDataset(va.images, va.labels, eval_t), num_workers)
    return TargetInputs(target, backbone["model_name"], dinfo, size, eval_t, x_val, x_test, n_val)


def train_job(data: TargetInputs, ft: FinetuneConfig, job: Job, arm: Arm, seed: int, dev: torch.device,
              channels_last: bool = False, num_workers: int = 0, compile: bool = False,
              on_epoch: Callable[[int, dict], None] | None = None,
              before_round: Callable[[int, nn.Module, FitResult], None] | None = None,
              state: JobState | None = None) -> JobResult:
    """One (arm, k, seed) fine-tune, self-training rounds included, and its one test pass (when `data.x_test` is
    there). `seed` is the pipeline seed; `on_epoch(epoch, record)` sees every epoch's curve point and
    `before_round(round, teacher, its fit)` every self-training teacher. `state`: where the job saves its progress
    and, if an earlier attempt was cut off, continues from (same result). No tracking calls: any process can run it."""
    t0 = time.time()
    tr, va = data.split("train"), data.split("val")
    split_seed, tr_idx, va_idx = job_subsets(tr.labels, va.labels, job.k, data.n_val, seed, job.seed,
                                             data.target.source)
    rs = job_seed(split_seed, arm.replica)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):  # dropout: a per-job seed
        model = build_arm_model(arm.checkpoint, data.model_name, data.n_classes, rs)
        train_t = build_job_transform(ft, data.size, data.dinfo, rs)
        student_t = student_transform(ft, train_t, data.size, data.dinfo, rs)
        train_ds = ImageDataset([tr.images[i] for i in tr_idx], tr.labels[tr_idx], train_t)
        x_sel, y_sel = data.x_val[torch.from_numpy(va_idx)], va.labels[va_idx]
        head_inputs = None  # the k labelled images, as the eval transform makes them, for a prototype head
        if ft.head_init == "prototype":
            head_inputs = (stack_inputs(ImageDataset([tr.images[i] for i in tr_idx], tr.labels[tr_idx], data.eval_t)),
                           tr.labels[tr_idx])
        done = None
        if state:
            state.track(train_t, student_t)
            done = (state.load() or {}).get("done")
            if state.resumed_epochs:
                print(f"[finetune] {job.name}: continues after the {state.resumed_epochs} epoch(s) an earlier attempt "
                      f"saved", flush=True)
        if done:  # an earlier attempt finished this phase: its model, fit and random streams, its curve again
            model.load_state_dict(done["model"])
            res = done["fit"]
            state.set_rng(done["rng"])
            for e, rec in enumerate(done["history"] if on_epoch else []):
                on_epoch(e, rec)
        else:
            res = fit(model, train_ds, x_sel, y_sel, ft, dev, seed=rs, head=head_prefix(model),
                      n_classes=data.n_classes, on_epoch=on_epoch, num_workers=num_workers,
                      channels_last=channels_last, compile=compile, head_inputs=head_inputs, state=state)
            if state:
                state.finish_phase(0, {"model": model.state_dict(), "fit": res, "history": res.history,
                                       "seen": res.images_seen, "first": 0, "diag": {}, "teachers": []})
        # self-training: the fine-tuned model becomes the teacher; its student (after the last round) is final
        st = self_train_rounds(
            model, res, lambda: build_arm_model(arm.checkpoint, data.model_name, data.n_classes, rs), ft, tr, tr_idx,
            data.eval_t, student_t, x_sel, y_sel, dev, seed=rs, n_classes=data.n_classes,
            before_round=before_round, on_epoch=on_epoch, state=state, channels_last=channels_last,
            num_workers=num_workers, compile=compile, head_inputs=head_inputs)
        extra = {"teacher_val_auc" if r == 0 else f"round{r}_val_auc": auc for r, auc in enumerate(st.teacher_val_aucs)}
        extra |= st.diagnostics | ({"resumed_epochs": float(state.resumed_epochs)} if state and state.resumed_epochs
                                   else {})
        val_prob = predict_proba(st.model, data.x_val, dev, channels_last=channels_last, tta=ft.tta)
        prob = None
        if data.x_test is not None:  # the one test pass
            prob = predict_proba(st.model, data.x_test, dev, channels_last=channels_last, tta=ft.tta)
    return JobResult(job, st.model, st.history,
                     st.first_epoch + st.fit.best_epoch, st.first_epoch, st.fit.best_val_auc, prob, val_prob,
                     len(tr_idx), len(va_idx), time.time() - t0 + (state.seconds_before if state else 0.0),
                     st.images_seen, extra)
